"""MoCo v2 and SwAV: known answers of their math, the queue, and their after_update hooks."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon_jax.core.validation import validate
from detcon_jax.errors import ConfigError
from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.objectives import common, moco, queue, registry, swav
from detcon_jax.objectives.contrastive import info_nce
from detcon_jax.core import state as state_lib
from harness import _unit, tiny_method_config


# --- MoCo ----------------------------------------------------------------------------

def test_info_nce_hand_made_queue():
  q, k = jnp.asarray([[2.0, 0.0]]), jnp.asarray([[1.0, 0.0]])
  negatives = jnp.asarray([[0.0, 3.0], [-1.0, 0.0]])          # cos 0 and -1
  loss, accuracy = info_nce(q, k, negatives, temperature=0.5)
  np.testing.assert_allclose(float(loss), np.log(np.exp(2) + 1 + np.exp(-2)) - 2, rtol=1e-6)
  assert float(accuracy) == 1.0


def test_info_nce_random_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, neg = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(11, 5))
  want = []
  for i in range(6):
    logits = np.concatenate([[_unit(q[i]) @ _unit(k[i])], _unit(neg) @ _unit(q[i])]) / 0.2
    want.append(np.log(np.sum(np.exp(logits))) - logits[0])
  loss, _ = info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(neg), temperature=0.2)
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)


def test_queue_wraps_around():
  qu = queue.create(5, (2,))
  assert int(qu["count"]) == 0 and not bool(queue.is_full(qu))
  rows = lambda start: jnp.arange(start, start + 6, dtype=jnp.float32).reshape(3, 2)
  qu = queue.push(qu, rows(0))                        # rows 0..2 at slots 0..2
  qu = queue.push(qu, rows(6))                        # slots 3, 4, then 0 (wrap)
  np.testing.assert_array_equal(qu["keys"], [[10, 11], [2, 3], [4, 5], [6, 7], [8, 9]])
  assert int(qu["ptr"]) == 1 and int(qu["count"]) == 5 and bool(queue.is_full(qu))
  same = queue.push(qu, rows(100), enabled=jnp.asarray(False))
  jax.tree.map(np.testing.assert_array_equal, same, qu)
  with pytest.raises(ValueError, match="queue of 5"):
    queue.push(qu, jnp.zeros((6, 2)))
  full = queue.create(4, (3,), jax.random.key(0))     # MoCo's random initial queue
  np.testing.assert_allclose(np.linalg.norm(full["keys"], axis=1), 1.0, rtol=1e-6)
  assert bool(queue.is_full(full))


@pytest.fixture(scope="module")
def moco_step():
  """One real train step of MoCo v2 (queue of 12, batch 4): states before and after."""
  config = tiny_method_config("moco_v2")
  config.moco.update(queue_size=12, momentum=0.9)
  objective = registry.get_objective("moco_v2")
  batch = B.synthetic_train_batch(4, specs=objective.views(config), seed=3)
  tx, schedule = state_lib.make_optimizer(objective, config)
  ts0 = state_lib.init_train_state(objective, tx, config, jax.random.key(0), batch)
  step = jax.jit(state_lib.make_train_step(objective, tx, schedule, config, jax.random.key(1)))
  ts1, metrics = step(jax.tree.map(jnp.copy, ts0), batch)
  return config, objective, batch, ts0, ts1, metrics


def test_moco_step_enqueues_keys_and_moves_the_key_network(moco_step):
  config, objective, batch, ts0, ts1, metrics = moco_step
  q0, q1 = ts0["state"][moco.QUEUE], ts1["state"][moco.QUEUE]
  assert q0["keys"].shape == (12, 8) and int(q1["ptr"]) == 4
  # The keys of view 2 from the key network before its update (= the initial copy).
  target = ts0["state"][common.TARGET]
  nets = common.build_networks(config, False)
  keys = common.forward(nets, target, ts0["state"][common.BATCH_STATS], batch,
                        [s for s in objective.views(config) if s.name == B.VIEW2]).z[B.VIEW2]
  np.testing.assert_allclose(q1["keys"][:4], _unit(keys), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(q1["keys"][4:], q0["keys"][4:])
  # Key network: m * key + (1 - m) * query after the optimiser step.
  want = common.ema(target, {k: ts1["params"][k] for k in target}, 0.9)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               ts1["state"][common.TARGET], want)
  assert np.isfinite(float(metrics["loss"])) and 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_moco_loss_is_info_nce_against_the_state_queue(moco_step):
  config, objective, batch, ts0, _, _ = moco_step
  state = dict(ts0["state"], **{moco.QUEUE: dict(ts0["state"][moco.QUEUE],
                                                  keys=jnp.eye(12, 8) * 3.0)})
  value, (_, new_state) = objective.loss(ts0["params"], state, batch, None, 0, config)
  nets = common.build_networks(config, False)
  specs = objective.views(config)
  q = common.forward(nets, ts0["params"], state[common.BATCH_STATS], batch, specs[:1]).z
  k = common.forward(nets, state[common.TARGET], state[common.BATCH_STATS], batch,
                     specs[1:2]).z
  want, _ = info_nce(q[B.VIEW1], k[B.VIEW2], jnp.eye(12, 8), temperature=0.2)
  np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
  np.testing.assert_allclose(new_state[moco.INCOMING], k[B.VIEW2], rtol=1e-5)


def test_moco_validation():
  config = tiny_method_config("moco_v2")
  config.moco.queue_size = 2
  with pytest.raises(ConfigError, match="queue_size"):
    validate(config)
  simclr = importlib.import_module("configs.simclr").get_config("demo")
  simclr.method = "moco_v2"                    # a --config.method override
  with pytest.raises(ConfigError, match=r"config\.moco\..*configs/moco_v2\.py"):
    validate(simclr)
  byol = importlib.import_module("configs.byol").get_config("demo")
  byol.views.small_crops = 2
  with pytest.raises(ConfigError, match="small_crops"):
    validate(byol)


# --- SwAV ----------------------------------------------------------------------------

def sinkhorn_reference(scores, eps, iterations):
  """SwAV's distributed_sinkhorn on one process, in float64 (the paper's appendix code)."""
  q = np.exp(np.asarray(scores, np.float64) / eps).T
  q /= q.sum()
  k, b = q.shape
  for _ in range(iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


def test_sinkhorn_matches_the_reference_and_its_marginals():
  rng = np.random.default_rng(0)
  scores = _unit(rng.normal(size=(64, 8))) @ _unit(rng.normal(size=(10, 8))).T   # cosines
  got = np.asarray(swav.sinkhorn(jnp.asarray(scores), epsilon=0.05, iterations=3))
  np.testing.assert_allclose(got, sinkhorn_reference(scores, 0.05, 3), rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)          # each code: a distribution
  many = np.asarray(swav.sinkhorn(jnp.asarray(scores), epsilon=0.05, iterations=200))
  np.testing.assert_allclose(many.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(many.sum(axis=0), 64 / 10, rtol=1e-3)     # equipartition


def test_sinkhorn_weights_leave_samples_out():
  rng = np.random.default_rng(1)
  scores = rng.uniform(-1, 1, size=(12, 5))
  weights = np.r_[np.zeros(4), np.ones(8)]
  got = np.asarray(swav.sinkhorn(jnp.asarray(scores), epsilon=0.1, iterations=3,
                                 weights=jnp.asarray(weights)))
  np.testing.assert_array_equal(got[:4], 0.0)
  np.testing.assert_allclose(got[4:], sinkhorn_reference(scores[4:], 0.1, 3), rtol=2e-4)


def test_swapped_prediction_known_answer():
  codes = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  scores = jnp.asarray([[0.2, 0.0], [0.0, 0.0]])
  want = -np.mean([np.log(np.exp(2) / (np.exp(2) + 1)), np.log(0.5)])
  np.testing.assert_allclose(float(swav.swapped_prediction(codes, scores, 0.1)), want, rtol=1e-6)


def swav_loss_reference(scores, num_assign, temperature, eps, iterations, queued=None):
  """main_swav.py's loss on one process (float64), and its gradient w.r.t. each crop's
  scores (codes detached: d/ds_v of -sum q log softmax(s_v / T) is (softmax - q) / T)."""
  scores = [np.asarray(s, np.float64) for s in scores]
  n, crops = scores[0].shape[0], len(scores)
  value, grads = 0.0, [np.zeros_like(s) for s in scores]
  for i in range(num_assign):
    out = scores[i] if queued is None else np.concatenate([queued[i], scores[i]])
    q = sinkhorn_reference(out, eps, iterations)[-n:]
    for v in range(crops):
      if v != i:
        x = scores[v] / temperature
        logp = x - x.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        value -= np.mean(np.sum(q * logp, axis=1)) / (crops - 1)
        grads[v] += (np.exp(logp) - q) / (temperature * n * (crops - 1))
  return value / num_assign, [g / num_assign for g in grads]


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_and_gradient_match_the_reference(with_queue):
  """2 code crops + 3 others, 6 samples, 5 prototypes; a queue of 4 (used, or left out by weight 0)."""
  rng = np.random.default_rng(2)
  protos = _unit(rng.normal(size=(5, 8)))
  scores = [_unit(rng.normal(size=(6, 8))) @ protos.T for _ in range(5)]
  queued = [_unit(rng.normal(size=(4, 8))) @ protos.T for _ in range(2)]
  kwargs = dict(temperature=0.1, epsilon=0.05, iterations=3)
  if with_queue:
    want, want_grads = swav_loss_reference(scores, 2, 0.1, 0.05, 3, queued)
    weights = jnp.ones(4)
  else:
    want, want_grads = swav_loss_reference(scores, 2, 0.1, 0.05, 3)
    weights = jnp.zeros(4)

  def f(s):
    return swav.swav_loss(list(s), 2, queued=[jnp.asarray(q, jnp.float32) for q in queued],
                          queue_weights=weights, **kwargs)[0]
  stacked = jnp.asarray(np.stack(scores), jnp.float32)
  np.testing.assert_allclose(float(f(stacked)), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.grad(f)(stacked)), np.stack(want_grads),
                             rtol=1e-4, atol=1e-7)


def test_swav_collapse_diagnostics_known_answers():
  """codes_entropy / prediction_entropy: 1 = uniform (collapsed), 0 = one-hot."""
  np.testing.assert_allclose(float(swav._normalized_entropy(jnp.full((3, 4), 0.25))), 1.0,
                             rtol=1e-6)
  assert float(swav._normalized_entropy(jnp.eye(4))) == 0.0
  half = jnp.asarray([[0.5, 0.5, 0.0, 0.0]])
  np.testing.assert_allclose(float(swav._normalized_entropy(half)), 0.5, rtol=1e-6)
  scores = jnp.asarray([[0.9, 0.1, 0.0, 0.0], [0.8, 0.0, 0.0, 0.1], [0.0, 0.0, 0.7, 0.1]])
  assert float(swav._prototypes_used(scores)) == 0.5             # prototypes 0 and 2


def test_swav_view_agreement_known_answers():
  """1 when each image's views coincide, 0 when they point apart, ~0.5 for unrelated
  views; an offset every embedding shares changes nothing."""
  z = _unit(jax.random.normal(jax.random.PRNGKey(0), (8, 16)))
  assert float(swav.view_agreement(z, z)) == 1.0
  assert float(swav.view_agreement(z, -z)) == 0.0
  assert float(swav.view_agreement(z + 5.0, z)) == 1.0
  rng = np.random.default_rng(0)
  unrelated = [float(swav.view_agreement(jnp.asarray(rng.normal(size=(64, 16))),
                                         jnp.asarray(rng.normal(size=(64, 16)))))
               for _ in range(20)]
  np.testing.assert_allclose(np.mean(unrelated), 0.5, atol=0.02)


def test_swav_demo_has_more_prototypes_than_dimensions():
  """Fewer prototypes than embedding dimensions admit a uniform fixed point (configs/swav.py)."""
  c = importlib.import_module("configs.swav").get_config("demo")
  assert c.swav.num_prototypes > c.head.output_dim


@pytest.mark.parametrize("preset", ["demo", "imagenet"])
def test_swav_lars_scales_every_parameter_by_its_trust_ratio(preset):
  """main_swav.py's LARC covers BN and biases: a 1-D leaf's first step is eta x lr x its
  norm, whatever the gradient's scale (with BN excluded it would be lr x gradient)."""
  from detcon_jax.core import optimizer as optimizer_lib
  c = importlib.import_module("configs.swav").get_config(preset)
  c.optimizer.update(warmup_steps=0, weight_decay=0.0)
  tx, schedule = optimizer_lib.make_optimizer(c)
  params = {"bias": jnp.asarray([3.0, 4.0]), "kernel": jnp.ones((2, 2))}
  steps = []
  for scale in (1.0, 100.0):
    grads = jax.tree.map(lambda p: scale * jnp.full_like(p, 0.1), params)
    steps.append(tx.update(grads, tx.init(params), params)[0]["bias"])
  np.testing.assert_allclose(steps[0], steps[1], rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(steps[0]), c.optimizer.eta * schedule(0) * 5.0,
                             rtol=1e-4)


def test_swav_multi_crop_step_prototypes_and_queue():
  """2 x 32 px + 2 x 16 px crops; prototypes held 1 step, then unit rows; queue fills."""
  config = tiny_method_config("swav", small_crops=2)
  config.swav.update(num_prototypes=6, freeze_prototypes_steps=1, queue_size=8,
                     queue_start_step=0)
  objective = registry.get_objective("swav")
  specs = objective.views(config)
  assert [s.name for s in specs] == ["view1", "view2", "small1", "small2"]
  assert [s.size for s in specs] == [32, 32, 16, 16] and V.small_views(specs)[0].small
  batch = B.synthetic_train_batch(4, specs=specs, seed=1)
  tx, schedule = state_lib.make_optimizer(objective, config)
  ts = state_lib.init_train_state(objective, tx, config, jax.random.key(0), batch)
  p0 = np.asarray(ts["params"][swav.PROTOTYPES])
  np.testing.assert_allclose(np.linalg.norm(p0, axis=1), 1.0, rtol=1e-6)
  step = jax.jit(state_lib.make_train_step(objective, tx, schedule, config, jax.random.key(1)))
  ts, m1 = step(ts, batch)
  np.testing.assert_allclose(ts["params"][swav.PROTOTYPES], p0, rtol=1e-6)    # held
  assert float(m1["queue_in_use"]) == 0.0 and int(ts["state"][swav.QUEUE]["count"]) == 4
  ts, m2 = step(ts, batch)
  p2 = np.asarray(ts["params"][swav.PROTOTYPES])
  assert not np.allclose(p2, p0)                                               # released
  np.testing.assert_allclose(np.linalg.norm(p2, axis=1), 1.0, rtol=1e-6)       # renormalised
  assert float(m2["queue_in_use"]) == 0.0 and bool(swav.queue_lib.is_full(ts["state"][swav.QUEUE]))
  ts, m3 = step(ts, batch)
  assert float(m3["queue_in_use"]) == 1.0
  assert all(np.isfinite(float(m["loss"])) for m in (m1, m2, m3))
  assert all(0.0 <= float(m["codes_entropy"]) <= 1.0 for m in (m1, m2, m3))
