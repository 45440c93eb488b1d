"""Objectives: known answers of the contrastive math, and the four objectives end to end."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import batch as B
from detcon_jax.objectives import byol, common, registry
from detcon_jax.objectives.contrastive import detcon_nce, nt_xent
from harness import ENV, tiny_preset_config

TAU = 0.1


# --- Straightforward numpy references ------------------------------------------

def _unit(x):
  return np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True)


def _first(ids_row, m):
  return int(np.flatnonzero(np.asarray(ids_row) == m)[0])


def detcon_reference(o1, o2, t1, t2, ids1, ids2, tau=TAU, num_shards=1):
  """Loops over anchors; each (image, id) once; sum over the two directions."""
  online, target, ids = (o1, o2), (t1, t2), (np.asarray(ids1), np.asarray(ids2))
  b = len(ids1)
  shard = lambda i: i // (b // num_shards)
  total = 0.0
  for v in (0, 1):
    w = 1 - v
    losses = []
    for i in range(b):
      for m in np.unique(ids[v][i]):
        if m not in ids[w][i]:
          continue                                            # no positive: contributes nothing
        q = _unit(online[v][i, _first(ids[v][i], m)])
        pos = q @ _unit(target[w][i, _first(ids[w][i], m)]) / tau
        logits = []
        for j in range(b):
          if shard(j) != shard(i):
            continue
          for n in np.unique(ids[w][j]):                      # other view, positive included
            logits.append(q @ _unit(target[w][j, _first(ids[w][j], n)]) / tau)
          for n in np.unique(ids[v][j]):                      # same view, self excluded
            if not (j == i and n == m):
              logits.append(q @ _unit(target[v][j, _first(ids[v][j], n)]) / tau)
        losses.append(np.log(np.sum(np.exp(logits))) - pos)
    total += np.mean(losses)
  return total


def nt_xent_reference(o1, o2, t1, t2, tau=TAU):
  online, target = (o1, o2), (t1, t2)
  total = 0.0
  for v in (0, 1):
    w = 1 - v
    losses = []
    for i in range(len(o1)):
      q = _unit(online[v][i])
      logits = [q @ _unit(target[w][j]) / tau for j in range(len(o1))]
      logits += [q @ _unit(target[v][j]) / tau for j in range(len(o1)) if j != i]
      losses.append(np.log(np.sum(np.exp(logits))) - logits[i])
    total += np.mean(losses)
  return total


def consistent_latents(rng, ids1, ids2, dim, num_ids):
  """Latents as mask pooling makes them: one vector per (image, view, id), copied per slot."""
  b = len(ids1)
  table = rng.normal(size=(2, b, num_ids, dim)).astype(np.float32)
  gather = lambda v, ids: table[v][np.arange(b)[:, None], np.asarray(ids)]
  return gather(0, ids1), gather(1, ids2)


def random_case(seed, b=4, k=5, num_ids=6, dim=3, bootstrap=True):
  rng = np.random.default_rng(seed)
  ids1 = rng.integers(0, num_ids, (b, k)).astype(np.int32)
  ids2 = rng.integers(0, num_ids, (b, k)).astype(np.int32)
  o1, o2 = consistent_latents(rng, ids1, ids2, dim, num_ids)
  t1, t2 = consistent_latents(rng, ids1, ids2, dim, num_ids) if bootstrap else (o1, o2)
  return o1, o2, t1, t2, ids1, ids2


def loss_of(o1, o2, t1, t2, ids1, ids2, num_shards=1):
  """The dedup form, which detcon_reference describes (the default form: test_detcon_reference)."""
  return float(detcon_nce(*map(jnp.asarray, (o1, o2, t1, t2, ids1, ids2)), temperature=TAU,
                          num_shards=num_shards, form="dedup")[0])


# --- DetCon loss math -------------------------------------------------------------

def test_tiny_hand_case_matches_reference():
  # 2 images x 2 masks, 2-D latents; image 1's id 4 is absent from its view 2.
  ids1 = np.array([[1, 2], [3, 4]], np.int32)
  ids2 = np.array([[2, 1], [3, 5]], np.int32)
  o1 = np.array([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [-1.0, 0.2]]], np.float32)
  o2 = np.array([[[0.8, 0.6], [0.9, -0.1]], [[0.1, 1.0], [0.3, -0.9]]], np.float32)
  # DetCon-S: 3 anchors with a positive per view (1, 2 of image 0; 3 of image 1).
  np.testing.assert_allclose(loss_of(o1, o2, o1, o2, ids1, ids2),
                             detcon_reference(o1, o2, o1, o2, ids1, ids2), rtol=1e-5)
  t1, t2 = o1[:, ::-1] * 0.5, o2 * np.array([1.0, -1.0], np.float32)
  np.testing.assert_allclose(loss_of(o1, o2, t1, t2, ids1, ids2),
                             detcon_reference(o1, o2, t1, t2, ids1, ids2), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_with_duplicates_and_absences_match_reference(seed):
  case = random_case(seed)
  np.testing.assert_allclose(loss_of(*case), detcon_reference(*case), rtol=1e-5)


def test_one_global_mask_is_nt_xent():
  rng = np.random.default_rng(3)
  b, k, d = 6, 4, 8
  o1, o2, t1, t2 = (rng.normal(size=(b, d)).astype(np.float32) for _ in range(4))
  ids = np.zeros((b, k), np.int32)                       # K copies of the whole-image mask
  rep = lambda x: np.repeat(x[:, None], k, axis=1)
  nt = float(nt_xent(o1, o2, temperature=TAU))
  np.testing.assert_allclose(nt, nt_xent_reference(o1, o2, o1, o2), rtol=1e-5)
  # DetCon-S (target = online) reduces to SimCLR's NT-Xent.
  np.testing.assert_allclose(loss_of(rep(o1), rep(o2), rep(o1), rep(o2), ids, ids), nt,
                             atol=1e-5)
  # DetCon-B reduces to NT-Xent between online predictions and target projections.
  nt_b = float(nt_xent(o1, o2, t1, t2, temperature=TAU))
  np.testing.assert_allclose(nt_b, nt_xent_reference(o1, o2, t1, t2), rtol=1e-5)
  np.testing.assert_allclose(loss_of(rep(o1), rep(o2), rep(t1), rep(t2), ids, ids), nt_b,
                             atol=1e-5)


def test_invariant_to_permuting_images():
  case = random_case(4, b=6)
  perm = np.random.default_rng(0).permutation(6)
  np.testing.assert_allclose(loss_of(*[x[perm] for x in case]), loss_of(*case), rtol=1e-6)


def test_duplicated_masks_do_not_change_the_loss():
  rng = np.random.default_rng(5)
  ids1 = np.array([[0, 1, 2], [3, 4, 5], [0, 2, 4]], np.int32)
  ids2 = np.array([[2, 1, 0], [5, 3, 6], [4, 0, 1]], np.int32)
  o1, o2 = consistent_latents(rng, ids1, ids2, 4, 7)
  t1, t2 = consistent_latents(rng, ids1, ids2, 4, 7)
  base = loss_of(o1, o2, t1, t2, ids1, ids2)
  # Duplicate slots unevenly (as sampling with replacement does), per image and view.
  slots1 = np.array([0, 0, 0, 1, 2, 2])
  slots2 = np.array([2, 1, 0, 1, 1, 0])
  dup = (o1[:, slots1], o2[:, slots2], t1[:, slots1], t2[:, slots2],
         ids1[:, slots1], ids2[:, slots2])
  np.testing.assert_allclose(loss_of(*dup), base, rtol=1e-5)


def test_anchor_without_positive_contributes_nothing():
  o1, o2, t1, t2, ids1, ids2 = random_case(6, bootstrap=True)
  ids1[0, 0] = 99                                        # absent from every view 2
  o1_moved = o1.copy()
  o1_moved[0, 0] = -10.0 * o1[0, 0] + 3.0                # an online anchor only: no effect
  np.testing.assert_allclose(loss_of(o1_moved, o2, t1, t2, ids1, ids2),
                             loss_of(o1, o2, t1, t2, ids1, ids2), rtol=1e-6)
  # A row with no positive anywhere gives a finite, zero loss and no NaN gradient.
  none = (o1[:1], o2[:1], t1[:1], t2[:1], ids1[:1] + 100, ids2[:1])
  value, grad = jax.value_and_grad(lambda o: detcon_nce(
      o, *map(jnp.asarray, none[1:]), temperature=TAU, form="dedup")[0])(jnp.asarray(o1[:1]))
  assert float(value) == 0.0 and bool(jnp.isfinite(grad).all())


def test_local_negatives():
  case = random_case(7, b=6)
  # One shard is the global loss; several shards match the reference restricted per block.
  np.testing.assert_allclose(loss_of(*case, num_shards=1), loss_of(*case), rtol=0)
  for shards in (2, 3):
    np.testing.assert_allclose(loss_of(*case, num_shards=shards),
                               detcon_reference(*case, num_shards=shards), rtol=1e-5)
  o1, o2 = case[0][:, 0], case[1][:, 0]
  halves = [float(nt_xent(o1[s], o2[s], temperature=TAU)) for s in (slice(0, 3), slice(3, 6))]
  np.testing.assert_allclose(float(nt_xent(o1, o2, temperature=TAU, num_shards=2)),
                             np.mean(halves), rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of the device count"):
    loss_of(*case, num_shards=4)


def test_local_negatives_on_8_sharded_devices():
  """Under jit on a batch sharded over 8 devices, local negatives = per-device blocks."""
  code = textwrap.dedent("""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      import ml_collections
      from detcon_jax.objectives.common import negative_shards
      from detcon_jax.objectives.contrastive import detcon_nce
      from test_objectives import random_case, detcon_reference, TAU
      assert jax.device_count() == 8
      cfg = ml_collections.ConfigDict(dict(loss=dict(local_negatives=True)))
      case = random_case(8, b=16)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sharded = [jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data"))) for x in case]
      f = jax.jit(lambda *a: detcon_nce(*a, temperature=TAU, num_shards=negative_shards(cfg),
                                        form="dedup")[0])
      np.testing.assert_allclose(float(f(*sharded)), detcon_reference(*case, num_shards=8),
                                 rtol=1e-5)
      g = jax.jit(lambda *a: detcon_nce(*a, temperature=TAU, form="dedup")[0])
      np.testing.assert_allclose(float(g(*sharded)), detcon_reference(*case), rtol=1e-5)
      print("ok")
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_byol_regression_known_answers():
  x = jnp.asarray([[1.0, 2.0], [3.0, -1.0]])
  np.testing.assert_allclose(byol.regression_loss(x, 5.0 * x), 0.0, atol=1e-6)
  np.testing.assert_allclose(byol.regression_loss(x, -x), 4.0, atol=1e-6)
  np.testing.assert_allclose(byol.regression_loss(jnp.asarray([[1.0, 0.0]]),
                                                  jnp.asarray([[0.0, 2.0]])), 2.0, atol=1e-6)


# --- The objectives end to end (tiny ResNet-18) -----------------------------------

@pytest.fixture(scope="module")
def bootstrap_init():
  """One init for every test below (initialisers compile slowly on CPU)."""
  batch = B.synthetic_train_batch(4, 32, num_masks=4, grid=2, seed=0)
  params, state = registry.get_objective("detcon_b").init(jax.random.key(0),
                                                          tiny_preset_config("detcon_b"), batch)
  return batch, params, state


def test_detcon_s_with_one_global_mask_equals_simclr(bootstrap_init):
  batch, params, state = bootstrap_init
  params = {k: params[k] for k in (common.ENCODER, common.PROJECTOR)}
  state = {common.BATCH_STATS: {k: state[common.BATCH_STATS][k] for k in params}}
  whole = dict(batch)
  for key in (B.MASKS1, B.MASKS2, B.MASK_IDS1, B.MASK_IDS2):
    whole[key] = np.full_like(batch[key], 7)              # one global mask, 4 copies
  def run(method, b):
    config = tiny_preset_config(method)
    config.loss.detcon_form = "dedup"                     # where 4 copies are one mask
    return jax.jit(lambda p, s, b: registry.get_objective(method).loss(
        p, s, b, None, 0, config))(params, state, b)
  simclr_loss, (_, simclr_state) = run("simclr", batch)
  detcon_loss, (metrics, detcon_state) = run("detcon_s", whole)
  np.testing.assert_allclose(float(detcon_loss), float(simclr_loss), rtol=1e-5)
  assert float(metrics["positive_fraction"]) == 1.0
  np.testing.assert_allclose(detcon_state[common.BATCH_STATS][common.ENCODER]["bn1"]["mean"],
                             simclr_state[common.BATCH_STATS][common.ENCODER]["bn1"]["mean"],
                             rtol=1e-5, atol=1e-7)


def test_detcon_b_step_layout_and_gradients(bootstrap_init):
  batch, params, state = bootstrap_init
  assert set(params) == {"encoder", "projector", "predictor"}
  assert set(state) == {"batch_stats", "target"}
  assert jax.tree.structure(state["target"]) == jax.tree.structure(
      {k: params[k] for k in ("encoder", "projector")})
  objective = registry.get_objective("detcon_b")
  fn = jax.jit(jax.value_and_grad(
      lambda p, s, b: objective.loss(p, s, b, jax.random.key(1), 0, tiny_preset_config("detcon_b")),
      has_aux=True))
  (value, (metrics, new_state)), grads = fn(params, state, batch)
  assert np.isfinite(float(value)) and set(metrics) == {"loss", "positive_fraction", "tau", "chance"}
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert new_state["target"] is not None and all(
      bool((a == b).all()) for a, b in zip(jax.tree.leaves(new_state["target"]),
                                           jax.tree.leaves(state["target"])))
  assert not all(bool((a == b).all()) for a, b in zip(
      jax.tree.leaves(new_state["batch_stats"]), jax.tree.leaves(state["batch_stats"])))
  for part in ("encoder", "projector", "predictor"):
    leaves = jax.tree.leaves(grads[part])
    assert all(bool(jnp.isfinite(g).all()) for g in leaves) and any(bool(g.any()) for g in leaves)
  # The EMA of after_update (tau0 at step 0) and the backbone view.
  moved = jax.tree.map(lambda x: x + 1.0, params)
  cfg = tiny_preset_config("detcon_b")
  cfg.ema.tau0 = 0.75
  _, updated = objective.after_update(moved, state, 0, cfg)
  np.testing.assert_allclose(updated["target"]["encoder"]["conv1"]["kernel"],
                             state["target"]["encoder"]["conv1"]["kernel"] + 0.25, rtol=1e-6)
  enc = registry.encoder_variables(params, state)
  assert set(enc) == {"params", "batch_stats"} and "layer4_1" in enc["params"]


def test_byol_loss_runs(bootstrap_init):
  batch, params, state = bootstrap_init
  value, (metrics, _) = jax.jit(lambda p, s, b: registry.get_objective("byol").loss(
      p, s, b, None, 0, tiny_preset_config("byol")))(params, state, batch)
  assert 0.0 <= float(value) <= 8.0 and float(metrics["loss"]) == float(value)


def test_registry_and_batch_errors():
  assert set(registry.OBJECTIVES) == {"simclr", "byol", "detcon_s", "detcon_b", "moco_v2", "swav",
                                     "cast", "maskco", "supervised"}
  with pytest.raises(ValueError, match=r"'mocov2': unknown method; choose one of \['byol', 'cast', "
                                       r"'detcon_b', 'detcon_s', 'maskco', 'moco_v2'"):
    registry.get_objective("mocov2")
  batch = B.synthetic_train_batch(2, 32, num_masks=4)
  no_masks = {k: v for k, v in batch.items() if k != B.MASKS2}
  with pytest.raises(ValueError, match="view2/masks"):
    registry.get_objective("detcon_s").init(jax.random.key(0), tiny_preset_config("detcon_s"), no_masks)
  cfg = tiny_preset_config("detcon_s")
  cfg.loss.num_masks = 16
  with pytest.raises(ValueError, match="num_masks"):
    registry.get_objective("detcon_s").init(jax.random.key(0), cfg, batch)
