"""Revisiting contrastive methods on MoCo v2: multi-crop queries never reach the queue, the
kNN-MoCo loss (eq. 2) on a hand-made queue, aligned queues after wrap-around, presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import moco_v2 as moco_config
from detcon_jax.core.validation import validate
from detcon_jax.errors import ConfigError
from data_pipelines import batch as B
from detcon_jax.models import heads
from detcon_jax.objectives import common, moco, queue, registry
from detcon_jax.objectives.nearest_neighbours import knn_loss, neighbours


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def knn_loss_numpy(q, f, queue_h, queue_g, k, t):
  """Eq. 2 as the authors' pull_topk: top-k by cosine on backbone features, then the mean
  over those k of -log softmax over the queue of q . Q_h / t."""
  out = []
  for qi, fi in zip(_unit(q), _unit(f)):
    idx = np.argsort(-(_unit(queue_g) @ fi))[:k]
    logits = _unit(queue_h) @ qi / t
    log_prob = logits - np.log(np.sum(np.exp(logits)))
    out.append(-np.mean(log_prob[idx]))
  return np.mean(out)


def test_knn_loss_hand_made_queue():
  """Queue of 3: backbone rows make row 0 and 2 the two neighbours of the query's feature;
  with projections at cosines (1, 0, -1) the loss is -1/2 (log p0 + log p2)."""
  q = jnp.asarray([[2.0, 0.0]])
  f = jnp.asarray([[1.0, 1.0, 0.0]])
  queue_h = jnp.asarray([[1.0, 0.0], [0.0, 5.0], [-3.0, 0.0]])
  queue_g = jnp.asarray([[1.0, 1.0, 0.1], [0.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
  np.testing.assert_array_equal(np.sort(neighbours(f, queue_g, 2)[0]), [0, 2])
  t = 0.5
  z = np.exp(2) + 1 + np.exp(-2)
  want = -0.5 * ((2 - np.log(z)) + (-2 - np.log(z)))
  got = knn_loss(q, f, queue_h, queue_g, k=2, temperature=t)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_knn_loss_random_matches_numpy_and_has_query_gradient():
  rng = np.random.default_rng(1)
  q, f = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
  qh, qg = rng.normal(size=(30, 4)), rng.normal(size=(30, 6))
  got = knn_loss(jnp.asarray(q), jnp.asarray(f), jnp.asarray(qh), jnp.asarray(qg), k=7,
                 temperature=0.2)
  np.testing.assert_allclose(float(got), knn_loss_numpy(q, f, qh, qg, 7, 0.2), rtol=1e-5)
  gq, gf = jax.grad(lambda a, b: knn_loss(a, b, qh, qg, k=7, temperature=0.2),
                    argnums=(0, 1))(jnp.asarray(q), jnp.asarray(f))
  assert np.abs(gq).max() > 0 and np.abs(gf).max() == 0     # neighbour search: no gradient


def test_queues_stay_aligned_after_wrap_around():
  """Hand-made keys numbered n: projection row [n, 1], backbone row [n, n, n]; six pushes
  of 4 into queues of 10 wrap twice, and row i of both queues holds the same key."""
  config = tiny("demo+knn")
  config.moco.queue_size = 10
  state = {common.TARGET: {}, moco.QUEUE: queue.create(10, (2,), jax.random.key(0)),
           moco.QUEUE_G: queue.create(10, (3,), jax.random.key(1))}
  for step in range(6):
    n = np.arange(4 * step, 4 * step + 4, dtype=np.float32) + 1
    state.update({moco.INCOMING: jnp.stack([n, np.ones(4, np.float32)], 1),
                  moco.INCOMING_G: jnp.stack([n, n, n], 1)})
    _, state = moco.after_update({}, state, step, config)
  h, g = np.asarray(state[moco.QUEUE]["keys"]), np.asarray(state[moco.QUEUE_G]["keys"])
  number = h[:, 0] / h[:, 1]                                  # undo the l2 normalisation
  np.testing.assert_allclose(number, g[:, 0], rtol=1e-6)
  np.testing.assert_allclose(number, [21, 22, 23, 24, 15, 16, 17, 18, 19, 20], rtol=1e-6)
  assert int(state[moco.QUEUE]["ptr"]) == int(state[moco.QUEUE_G]["ptr"]) == 4


def tiny(preset):
  c = moco_config.get_config(preset)
  c.update(image_size=32, batch_size=4, steps=10)
  c.model.update(depth=18, width=0.125, stem_pool=False)
  c.head.update(hidden_dim=16, output_dim=8)
  c.views.update(small_size=16, small_crops=2)
  c.moco.update(queue_size=12, momentum=0.9)
  c.loss.update(knn_k=3, knn_start_fraction=0.5)             # from step 5 on
  return c


@pytest.fixture(scope="module")
def knn_step():
  """Loss and after_update of constrained multi-crop kNN-MoCo (2 small crops, queue of 12),
  eagerly (no optimiser: the queue test needs the keys, not an update; a jitted step
  with three view sizes compiles no faster on 2 cores)."""
  config = tiny("demo+cc+knn")
  objective = registry.get_objective("moco_v2")
  specs = objective.views(config)
  batch = B.synthetic_train_batch(4, specs=specs, seed=3)
  params, state0 = objective.init(jax.random.key(0), config, batch)
  _, (metrics, state) = objective.loss(params, state0, batch, None, 0, config)
  _, state1 = objective.after_update(params, state, 0, config)
  ts0, ts1 = {"params": params, "state": state0}, {"params": params, "state": state1}
  return config, objective, specs, batch, ts0, ts1, metrics


def test_small_crops_are_queries_but_never_in_the_queue(knn_step):
  config, objective, specs, batch, ts0, ts1, metrics = knn_step
  assert [s.name for s in specs] == ["view1", "view2", "small1", "small2"]
  assert moco.pairs(specs, config) == {"view2": ["view1", "small1", "small2"]}
  nets = common.build_networks(config, False)
  key = common.forward(nets, ts0["state"][common.TARGET], ts0["state"][common.BATCH_STATS],
                       batch, specs[1:2])
  q1, g1 = ts1["state"][moco.QUEUE], ts1["state"][moco.QUEUE_G]
  assert int(q1["ptr"]) == int(g1["ptr"]) == 4                 # one key per image, no more
  np.testing.assert_allclose(q1["keys"][:4], _unit(key.z[B.VIEW2]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g1["keys"][:4], _unit(heads.global_pool(key.maps[B.VIEW2])),
                             rtol=1e-4, atol=1e-6)
  small = common.forward(nets, ts0["params"], ts0["state"][common.BATCH_STATS], batch,
                         specs[2:]).z
  for name in ("small1", "small2"):        # no small-crop projection was pushed anywhere
    far = np.abs(np.asarray(q1["keys"])[:, None] - _unit(small[name])[None]).max(-1)
    assert far.min() > 1e-3
  np.testing.assert_array_equal(q1["keys"][4:], ts0["state"][moco.QUEUE]["keys"][4:])
  assert not any("fallback" in k for k in metrics)   # the input counts them (Batches.stats)


def test_knn_loss_switches_on_at_its_step_and_matches_eq2(knn_step):
  config, objective, specs, batch, ts0, _, _ = knn_step
  params, state = ts0["params"], ts0["state"]
  before, (m0, _) = objective.loss(params, state, batch, None, 4, config)
  after, (m1, _) = objective.loss(params, state, batch, None, 5, config)
  assert float(m0["knn_weight"]) == 0.0 and float(m1["knn_weight"]) == pytest.approx(0.4)
  np.testing.assert_allclose(float(before), float(m0["loss_inst"]), rtol=1e-6)
  np.testing.assert_allclose(float(after), float(m1["loss_inst"]) + 0.4 * float(m1["loss_knn"]),
                             rtol=1e-5)
  # eq. 2 in numpy on the queries' projections and pooled backbone features
  nets = common.build_networks(config, False)
  queries = [s for s in specs if s.name != B.VIEW2]
  out = common.forward(nets, params, state[common.BATCH_STATS], batch, queries)
  q = np.concatenate([out.z[s.name] for s in queries])
  f = np.concatenate([heads.global_pool(out.maps[s.name]) for s in queries])
  want = knn_loss_numpy(q, f, state[moco.QUEUE]["keys"], state[moco.QUEUE_G]["keys"], 3, 0.2)
  np.testing.assert_allclose(float(m1["loss_knn"]), want, rtol=1e-4)


def test_presets_compose_and_flags_are_checked():
  c = moco_config.get_config("coco+cc+aplus+knn")
  validate(c)
  assert (c.image_size, c.views.small_size, c.views.small_crops) == (160, 96, 4)
  assert c.views.constrained and c.data.augment == "moco_v2_aplus"
  assert (c.moco.momentum, c.loss.knn_weight, c.loss.knn_k) == (0.995, 0.4, 20)
  assert c.loss.knn_start_fraction == pytest.approx(5 / 200)
  plain = moco_config.get_config("demo")
  assert plain.moco.momentum == 0.999 and plain.loss.knn_weight == 0.0
  with pytest.raises(ConfigError, match="Unknown modifier"):
    moco_config.get_config("demo+nn")
  bad = moco_config.get_config("demo")
  bad.views.constrained = True                                # without small crops
  with pytest.raises(ConfigError, match="small_crops"):
    validate(bad)
  bad = moco_config.get_config("demo+knn")
  bad.loss.knn_k = 5000
  with pytest.raises(ConfigError, match="knn_k"):
    validate(bad)
