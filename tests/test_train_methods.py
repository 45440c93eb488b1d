"""The trainer with the real objectives (tiny ResNet-18, 32 px, batch 8, synthetic data)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import (assert_same_update, run_on_devices, sigterm_at, one_step, small_config,
                     synthetic_batches)


def test_detcon_b_trains_and_its_encoder_loads_back(tmp_path):
  config = small_config("detcon_b")
  summary = loop.train(config, str(tmp_path), batches=synthetic_batches())
  assert summary["status"] == "done" and len(summary["losses"]) == 3
  assert all(np.isfinite(v) for v in summary["losses"].values())
  loaded_config, model, variables = checkpointing.load_encoder(str(tmp_path))
  assert loaded_config.method == "detcon_b" and loaded_config.model.width == 0.125
  images = jnp.zeros((2, 32, 32, 3))
  out = model.apply(variables, images, train=False)
  assert not loaded_config.model.stem_pool and not model.stem_pool   # the demo's stride 16
  assert out["stage4"].shape[:3] == (2, 2, 2)


def real_one_step(method, out_path):
  config = small_config(method)
  config.optimizer.warmup_steps = 0
  from detcon_jax.objectives import registry
  one_step(registry.get_objective(method), config, out_path)


def real_one_steps(methods, out_dir):
  for method in methods:
    real_one_step(method, os.path.join(out_dir, f"{method}.npz"))


def _one_vs_eight(tmp_path, methods):
  one, eight = tmp_path / "one", tmp_path / "eight"
  one.mkdir(), eight.mkdir()
  real_one_steps(methods, str(one))
  last = str(eight / f"{methods[-1]}.npz")       # one subprocess for every method
  run_on_devices(f"import test_train_methods as m; m.real_one_steps({methods!r}, "
                     f"{str(eight)!r})", last)
  for method in methods:
    assert_same_update(dict(np.load(one / f"{method}.npz")), dict(np.load(eight / f"{method}.npz")),
             rtol=2e-4, atol=1e-6)


@pytest.mark.slow   # 77 s; .ci/run runs it after the default suite
def test_objectives_8_devices_equal_1_device(tmp_path):
  """Batch norm, negatives and queues over the global batch: 8 shards change nothing
  (a mask-based and a queue-based method; the others in the next test, for time)."""
  _one_vs_eight(tmp_path, ["detcon_b", "moco_v2"])


@pytest.mark.slow
def test_other_objectives_8_devices_equal_1_device(tmp_path):
  """The same for Sinkhorn over the global batch with multi-crop (SwAV), boxes (MaskCo)
  and the rest."""
  _one_vs_eight(tmp_path, ["swav", "maskco", "simclr", "byol", "detcon_s"])


@pytest.mark.slow   # 41 s for moco_v2; .ci/run runs that case after the default suite
@pytest.mark.parametrize("method", ["moco_v2", "swav"])
def test_stop_and_resume_equals_a_straight_run_queue_included(tmp_path, method):
  """SIGTERM mid-run, then resume: the same loss curve, and the same queue and params."""
  config = small_config(method, steps=6)
  config.checkpoint.every_steps = 2
  if method == "swav":
    config.swav.update(queue_size=8, queue_start_step=1, freeze_prototypes_steps=2)
  straight = loop.train(config, str(tmp_path / "straight"), batches=synthetic_batches())
  first = loop.train(config, str(tmp_path / "cut"), batches=synthetic_batches(
      on_step=sigterm_at(5)))   # the input runs up to 4 batches ahead of the step
  assert first["status"] == "preempted" and 0 < first["step"] < 6
  resumed = loop.train(config, str(tmp_path / "cut"), batches=synthetic_batches())
  assert resumed["start_step"] == first["step"] and resumed["step"] == 6
  assert {**first["losses"], **resumed["losses"]} == straight["losses"]
  final = [checkpointing.make_manager(str(tmp_path / d), read_only=True).restore(6)
           for d in ("straight", "cut")]
  assert "queue" in final[0]["state"]
  jax.tree.map(np.testing.assert_array_equal, final[0]["state"], final[1]["state"])
  jax.tree.map(np.testing.assert_array_equal, final[0]["params"], final[1]["params"])
