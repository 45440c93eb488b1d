"""Frozen features: inference-mode BN, padding of ragged batches, 8 devices == 1 device.

jax fixes its device count at import, so the 8-device side runs in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""
import os
import subprocess
import sys

import numpy as np
from harness import ROOT, TESTS

SIZE = 32


def features_of(out_path: str) -> None:
  """Random-init ResNet-18/4 features of two ragged batches (5 and 3 images), saved as npz."""
  from detcon_jax.evaluate import features
  from detcon_jax.models.resnet import ResNet, normalize_images
  model = ResNet(depth=18, width=0.25)
  variables = features.random_init_variables(model, SIZE, seed=3)
  rng = np.random.default_rng(0)
  batches = [{"image": rng.random((n, SIZE, SIZE, 3), dtype=np.float32),
              "label": np.arange(n, dtype=np.int32)} for n in (5, 3)]
  feats, kept = features.extract_features(model, {"a": variables}, batches, keep=("label",))
  # Inference-mode batch norm: an image's features do not depend on its batch.
  alone = model.apply(variables, normalize_images(batches[1]["image"][:1]), train=False)
  np.savez(out_path, **feats["a"], label=kept["label"],
           alone=np.asarray(alone["stage4"]).mean((1, 2))[0])


def test_features_match_direct_apply_and_eight_devices(tmp_path):
  one = tmp_path / "one.npz"
  features_of(str(one))
  eight = tmp_path / "eight.npz"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
  code = ("import jax; assert jax.device_count() == 8; "
          f"import test_eval_features as t; t.features_of({str(eight)!r})")
  subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)

  a, b = np.load(one), np.load(eight)
  assert a["pooled"].shape == (8, 128) and a["spatial"].shape == (8, 1, 1, 128)
  np.testing.assert_array_equal(a["label"], [0, 1, 2, 3, 4, 0, 1, 2])  # padding dropped, order kept
  np.testing.assert_allclose(b["pooled"], a["pooled"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a["alone"], a["pooled"][5], rtol=1e-5, atol=1e-5)
