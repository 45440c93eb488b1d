"""detcon_nce's default form against the public DetCon code's semantics (byol_nce_detcon).

The known answer is a float64 loop written from the reference's definition:
B*K anchor rows per direction, every sampled copy its own candidate, labels
spread over the other view's copies of the anchor's id, the same view's copies
excluded, row weight [has a positive] / (copies of the id among its image's
K), the mean over all B*K rows, the two directions summed.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common as config_common
from data_pipelines import batch as B
from detcon_jax.objectives.contrastive import DETCON_FORMS, detcon_nce, nt_xent
from detcon_jax.objectives.detcon import detcon_criterion
from detcon_numpy import TAU, jax_loss, random_case, reference_loss
from harness import ENV

def test_forms_and_config_choices():
  assert DETCON_FORMS == ("reference", "dedup")
  with pytest.raises(ValueError, match="reference"):
    jax_loss(*random_case(0), form="paper")


@pytest.mark.parametrize("seed,bootstrap,tau", [(0, True, TAU), (1, False, TAU), (2, True, 0.5)])
@pytest.mark.parametrize("same_image_negatives", [True, False])
def test_default_matches_reference(seed, bootstrap, tau, same_image_negatives):
  case = random_case(seed, bootstrap=bootstrap)
  ids1, ids2 = case[4:]
  # The case has duplicated ids, anchors without a positive, ids differing between views.
  assert any(len(set(r)) < len(r) for r in ids1) and (ids1 != ids2).any()
  assert any(m not in ids2[i] for i in range(len(ids1)) for m in ids1[i])
  np.testing.assert_allclose(
      jax_loss(*case, tau=tau, same_image_negatives=same_image_negatives),
      reference_loss(*case, tau=tau, same_image_negatives=same_image_negatives), rtol=1e-5)


@pytest.mark.parametrize("same_image_negatives", [True, False])
def test_gradients_match_central_differences(same_image_negatives):
  case = random_case(3, b=3, k=3, num_ids=3)
  kw = dict(same_image_negatives=same_image_negatives)
  grads = jax.grad(lambda *x: detcon_nce(*x, *map(jnp.asarray, case[4:]), temperature=TAU,
                                         **kw)[0], argnums=(0, 1, 2, 3))(
                                             *map(jnp.asarray, case[:4]))
  latents, h = [np.asarray(x, np.float64) for x in case[:4]], 1e-5
  for a, grad in enumerate(grads):
    numeric = np.zeros_like(latents[a])
    for idx in np.ndindex(latents[a].shape):
      shifted = []
      for step in (h, -h):
        moved = [x.copy() for x in latents]
        moved[a][idx] += step
        shifted.append(reference_loss(*moved, *case[4:], **kw))
      numeric[idx] = (shifted[0] - shifted[1]) / (2 * h)
    assert np.abs(numeric).max() > 0.1
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-4, atol=1e-4)


def test_one_global_mask():
  """K=1 is NT-Xent exactly; K copies of it give (NT-Xent + 2 log K) / K."""
  rng = np.random.default_rng(4)
  b, d = 6, 8
  o1, o2, t1, t2 = (rng.normal(size=(b, d)).astype(np.float32) for _ in range(4))
  for online, target in (((o1, o2), (o1, o2)), ((o1, o2), (t1, t2))):   # DetCon-S, DetCon-B
    nt = float(nt_xent(*online, *target, temperature=TAU))
    for k in (1, 4):
      rep = lambda x: np.repeat(x[:, None], k, axis=1)
      ids = np.zeros((b, k), np.int32)
      np.testing.assert_allclose(jax_loss(*map(rep, online + target), ids, ids),
                                 (nt + 2 * np.log(k)) / k, rtol=1e-5)
      np.testing.assert_allclose(jax_loss(*map(rep, online + target), ids, ids, form="dedup"),
                                 nt, rtol=1e-5)


def test_local_negatives_and_positive_fraction():
  case = random_case(5, b=6)
  for shards in (2, 3):
    for same_image_negatives in (True, False):
      np.testing.assert_allclose(
          jax_loss(*case, num_shards=shards, same_image_negatives=same_image_negatives),
          reference_loss(*case, num_shards=shards, same_image_negatives=same_image_negatives),
          rtol=1e-5)
  fractions = [float(detcon_nce(*map(jnp.asarray, case), temperature=TAU, form=form)[1][
      "positive_fraction"]) for form in DETCON_FORMS]
  assert fractions[0] == fractions[1] and 0.0 < fractions[0] < 1.0


def test_objective_reads_the_config():
  case = random_case(6)
  batch = {B.MASK_IDS1: jnp.asarray(case[4]), B.MASK_IDS2: jnp.asarray(case[5])}
  latents = [jnp.asarray(x) for x in case[:4]]
  loss = lambda **kw: float(detcon_criterion(*latents, batch, ml_collections.ConfigDict(
      dict(loss=dict(temperature=TAU, local_negatives=False, **kw))))[0])
  for method in ("detcon_s", "detcon_b"):
    assert config_common.method_config(method).loss.detcon_form == "reference"
    assert config_common.method_config(method).loss.detcon_same_image_negatives is True
  assert "detcon_form" not in config_common.method_config("simclr").loss
  np.testing.assert_allclose(loss(), reference_loss(*case), rtol=1e-5)
  np.testing.assert_allclose(loss(detcon_form="reference", detcon_same_image_negatives=False),
                             reference_loss(*case, same_image_negatives=False), rtol=1e-5)
  np.testing.assert_allclose(loss(detcon_form="dedup"), jax_loss(*case, form="dedup"), rtol=1e-6)


def test_8_sharded_devices_equal_one():
  """Under jit on a batch sharded over 8 devices: the unsharded loss and gradients."""
  code = textwrap.dedent("""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from detcon_jax.objectives.contrastive import detcon_nce
      from detcon_numpy import random_case, reference_loss, TAU
      assert jax.device_count() == 8
      case = [jnp.asarray(x) for x in random_case(8, b=16, k=4, num_ids=5, dim=8)]
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in case]
      for kw in (dict(), dict(same_image_negatives=False), dict(num_shards=8),
                 dict(form="dedup", num_shards=8)):
        fn = jax.value_and_grad(lambda *a: detcon_nce(*a, temperature=TAU, **kw)[0],
                                argnums=(0, 1, 2, 3))
        value, grads = jax.jit(fn)(*sharded)
        value1, grads1 = fn(*case)
        np.testing.assert_allclose(float(value), float(value1), rtol=1e-6)
        for g, g1 in zip(grads, grads1):
          np.testing.assert_allclose(np.asarray(g), np.asarray(g1), rtol=1e-5, atol=1e-7)
        if kw.get("form") != "dedup":
          np.testing.assert_allclose(float(value), reference_loss(*case, **kw), rtol=1e-5)
      print("ok")
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
