"""The chance level every contrastive objective reports (metric 'chance', beside 'loss'):
the loss at uniform similarities, = log(candidates per anchor) as the loss averages and
sums them (SwAV: log P, a uniform prediction over P prototypes). Known answers from
counting candidates by hand, on tiny inputs."""
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.objectives import cast, detcon, moco, registry, simclr, swav
from detcon_jax.objectives.contrastive import region_nce, uniform


def _loss_config(**loss):
  return ml_collections.ConfigDict({"loss": dict(temperature=0.1, **loss)})


def _latents(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_simclr_chance_is_log_2n_minus_1_per_direction():
  z1, z2 = _latents(6, 5, seed=1), _latents(6, 5, seed=2)
  _, m = simclr.nt_xent_criterion(z1, z2, z1, z2, {}, _loss_config())
  np.testing.assert_allclose(float(m["chance"]), 2 * np.log(11), rtol=1e-5)
  local = _loss_config(local_negatives=True, num_shards=2)     # 3 images per block
  _, m = simclr.nt_xent_criterion(z1, z2, z1, z2, {}, local)
  np.testing.assert_allclose(float(m["chance"]), 2 * np.log(5), rtol=1e-5)
  _, m = simclr.nt_xent_criterion(z1, z2, z1, z2, {}, _loss_config(), extra=_latents(6, 5))
  np.testing.assert_allclose(float(m["chance"]), np.log(12) + np.log(11), rtol=1e-5)


def _detcon_chance_by_counting(ids1, ids2, form):
  """Each direction: rows (b, k) with a positive, weighted 1/copies; candidates counted."""
  total = 0.0
  for ids, other in ((ids1, ids2), (ids2, ids1)):
    b, k = ids.shape
    loss, weights = 0.0, 0.0
    for i in range(b):
      for j in range(k):
        copies = np.sum(ids[i] == ids[i, j])
        if not np.any(other[i] == ids[i, j]):
          continue
        if form == "reference":   # every copy a candidate, the anchor's own copies excluded
          candidates = 2 * b * k - copies
        else:                     # each (image, id) once, the anchor itself excluded
          candidates = sum(len(set(other[x])) + len(set(ids[x])) for x in range(b)) - 1
        loss += np.log(candidates) / copies
        weights += 1 / copies
    total += loss / (b * k if form == "reference" else weights)
  return total


@pytest.mark.parametrize("form", ["reference", "dedup"])
def test_detcon_chance_counts_mask_candidates(form):
  rng = np.random.default_rng(3)
  ids1, ids2 = rng.integers(0, 5, (3, 4)), rng.integers(0, 5, (3, 4))   # duplicates, absences
  batch = {B.MASK_IDS1: jnp.asarray(ids1), B.MASK_IDS2: jnp.asarray(ids2)}
  z = [_latents(3, 4, 6, seed=s) for s in range(4)]
  _, m = detcon.detcon_criterion(*z, batch, _loss_config(detcon_form=form))
  np.testing.assert_allclose(float(m["chance"]), _detcon_chance_by_counting(ids1, ids2, form),
                             rtol=1e-5)


def test_moco_chance_is_log_queue_plus_1_per_query():
  queue = _latents(10, 4)
  queries = {B.VIEW1: _latents(2, 4, seed=1), "small1": _latents(2, 4, seed=2)}
  keys = {B.VIEW2: _latents(2, 4, seed=3)}
  matched = {B.VIEW2: [B.VIEW1, "small1"]}
  u = lambda d: {k: uniform(v) for k, v in d.items()}
  chance, _ = moco.instance_loss(matched, u(queries), u(keys), uniform(queue), {}, 1.0)
  np.testing.assert_allclose(float(chance), np.log(11), rtol=1e-5)
  extra = {B.VIEW1: uniform(_latents(2, 4))}           # BG Swaps: view1's queries get one more
  chance, _ = moco.instance_loss(matched, u(queries), u(keys), uniform(queue), extra, 1.0)
  np.testing.assert_allclose(float(chance), (np.log(12) + np.log(11)) / 2, rtol=1e-5)


def test_knn_moco_term_at_uniform_similarities_is_log_queue():
  """moco.contrast adds knn_weight x log(L) to the chance: eq. 2 at uniform similarities."""
  from detcon_jax.objectives import nearest_neighbours as nn_lib
  value = nn_lib.knn_loss(uniform(_latents(2, 4)), _latents(2, 6), uniform(_latents(10, 4)),
                          _latents(10, 6), k=3, temperature=1.0)
  np.testing.assert_allclose(float(value), np.log(10), rtol=1e-5)


def test_cast_chance_keeps_the_attention_term():
  np.testing.assert_allclose(float(cast.total_loss(np.log(11), 0.3, 2.0, "sum")),
                             np.log(11) + 0.6, rtol=1e-6)


@pytest.mark.parametrize("intra", [False, True])
def test_maskco_chance_is_log_1_plus_valid_negative_boxes(intra):
  b, k = 4, 5
  keys_valid = np.ones((b, k), bool)
  keys_valid[1, 2:] = False                            # image 1 has 2 valid negatives, not 4
  query_valid = np.array([True, True, True, False])    # row 3 left out
  chance, _, _ = region_nce(uniform(_latents(b, 3)), uniform(_latents(b, k, 3)),
                            jnp.asarray(query_valid), jnp.asarray(keys_valid), temperature=1.0,
                            intra=intra)
  negatives = keys_valid[:, 1:].sum(1)
  expected = [np.log(1 + negatives.sum() - (0 if intra else negatives[i])) for i in range(3)]
  np.testing.assert_allclose(float(chance), np.mean(expected), rtol=1e-5)


def _small(method):
  c = importlib.import_module(f"configs.{method}").get_config("demo")
  c.update(image_size=32, batch_size=4)
  c.model.update(depth=18, width=0.125, dtype="float32", stem_pool=True)
  c.head.update(hidden_dim=16, output_dim=8)
  c.loss.num_masks = 4
  if "moco" in c:
    c.moco.queue_size = 16
  return c


def test_swav_chance_is_the_loss_of_a_uniform_prediction():
  """A uniform prediction (equal scores) against any codes costs log P: codes sum to 1."""
  p = 7
  codes = swav.sinkhorn(_latents(5, p, seed=1), epsilon=0.05, iterations=3)
  assert float(jnp.max(codes)) > 1.5 / p                      # informative, not uniform
  value = swav.swapped_prediction(codes, jnp.zeros((5, p)), 0.1)
  np.testing.assert_allclose(float(value), np.log(p), rtol=1e-6)


@pytest.mark.parametrize("method,contrastive", [
    ("simclr", True), ("detcon_s", True), ("detcon_b", True), ("moco_v2", True),
    ("maskco", True), ("cast", True), ("byol", False), ("swav", True)])
def test_every_contrastive_objective_reports_chance_and_the_others_none(method, contrastive):
  """Traced only (jax.eval_shape, no compile): the metric is there, a scalar, or not."""
  config = _small(method)
  objective = registry.get_objective(method)
  batch = B.synthetic_train_batch(4, num_masks=4, specs=objective.views(config))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  if method == "cast":
    batch.update({B.key(s.name, V.SALIENCY): jnp.ones(batch[s.name].shape[:3], jnp.float32)
                  for s in objective.views(config)})
  params, state = jax.eval_shape(lambda r: objective.init(r, config, batch), jax.random.key(0))
  _, (metrics, _) = jax.eval_shape(
      lambda p, s: objective.loss(p, s, batch, jax.random.key(1), 0, config), params, state)
  assert ("chance" in metrics) == contrastive
  if contrastive:
    assert metrics["chance"].shape == ()
