"""MoCo v2 (Chen, Fan, Girshick, He 2020), and the momentum-encoder + queue framework.

A query network (encoder + projector, trained) and a key network, its
momentum copy (after_update: key <- m * key + (1 - m) * query, m = 0.999), embed
two views. Each query is contrasted with the key of the same image (positive)
and with a queue of keys from earlier batches (negatives); after the step the
batch's keys are enqueued (a ring buffer in the train state, checkpointed with
it). The order is the reference's: the key network updated by the query
weights the step is about to use, keys computed, loss, then enqueue.

Batch norm: statistics span the global batch under jit (cross-replica BN),
the answer SimCLR gives to the leak that MoCo's shuffle-BN addresses (the
per-device batch statistics would let a query find its key by the shared
statistics); the key network runs in training mode and its running averages
are discarded.

Default: the reference's asymmetric loss (queries from view 1, keys from view
2). config.moco.symmetric=True adds the mirrored direction (sum of both, keys
of both views enqueued). Small multi-crop views (config.views.small_crops)
are extra queries matched to every key view; they are never keys and never
enqueued.

Revisiting contrastive methods (Van Gansbeke et al. 2021), as options that
compose (configs/moco_v2.py presets +mc, +cc, +aplus, +knn):
  * multi-crop: the queries are view1 and the small crops, all matched to the
    anchor (view2's key), as the authors' code; constrained multi-crop
    (config.views.constrained) anchors the small crops to view2's crop (the input
    counts those that fell back to an unconstrained crop: TensorBoard
    data/crop_fallbacks of data/constrained_crops);
  * A+ is an input option (config.data.augment='moco_v2_aplus');
  * kNN-MoCo (config.loss.knn_weight > 0): a second queue of the keys' pooled,
    l2-normalised backbone features, pushed with the projection queue so that
    both stay aligned row for row; every query adds knn_weight x eq. 2
    (objectives/nearest_neighbours.py) over its knn_k neighbours, from step
    round(knn_start_fraction x steps) on (the paper: after 5 of 200 epochs).

Background augmentations (data_pipelines/background_augment.py) are input-side; BG Swaps'
background-matched negative (batch[background.NEGATIVE], when present) goes through
the key network in one call with the keys and is one more negative of view1's
queries only (never enqueued).
    The neighbours come from the queues before this step's keys are pushed
    (the paper's Algorithm 2; the authors' no-warmup variant pushes first).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from detcon_jax.errors import ConfigError
from data_pipelines import background_augment as bg_lib
from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.models import heads
from detcon_jax.models.resnet import num_features
from detcon_jax.objectives import common
from detcon_jax.objectives import nearest_neighbours as nn_lib
from detcon_jax.objectives import queue as queue_lib
from detcon_jax.objectives.contrastive import info_nce, l2_normalize, uniform

QUEUE, INCOMING = "queue", "incoming"
# kNN-MoCo: the queue of backbone features, aligned with QUEUE, and this step's rows for it
QUEUE_G, INCOMING_G = "queue_backbone", "incoming_backbone"


def knn_enabled(config) -> bool:
  return float(config.loss.get("knn_weight", 0.0)) > 0.0


def knn_start_step(config) -> int:
  """First step with the kNN loss: round(loss.knn_start_fraction x steps)."""
  return int(round(float(config.loss.get("knn_start_fraction", 0.0)) * int(config.steps)))


def key_views(config) -> list[str]:
  return [B.VIEW1, B.VIEW2] if config.moco.symmetric else [B.VIEW2]


def pairs(specs, config) -> dict[str, list[str]]:
  """key view -> the views whose queries are matched to its keys."""
  small = [s.name for s in V.small_views(specs)]
  other = {B.VIEW1: B.VIEW2, B.VIEW2: B.VIEW1}
  return {k: [other[k]] + small for k in key_views(config)}


def init(rng, config, batch):
  specs = V.standard_views(config)
  common.check_views(batch, specs, config)
  net_rng, queue_rng = jax.random.split(rng)
  params, batch_stats = common.init_networks(common.build_networks(config, False), net_rng,
                                             batch[B.VIEW1])
  dim = int(config.head.output_dim)
  rows = batch[B.VIEW1].shape[0] * len(key_views(config))
  incoming = jnp.zeros((rows, dim), jnp.float32)
  state = {common.BATCH_STATS: batch_stats, common.TARGET: common.copy_of(params),
           QUEUE: queue_lib.create(config.moco.queue_size, (dim,), queue_rng),
           INCOMING: incoming}
  if knn_enabled(config):     # random unit rows, like the projection queue (authors' code)
    features = num_features(int(config.model.depth), float(config.model.width))
    state[QUEUE_G] = queue_lib.create(config.moco.queue_size, (features,),
                                      jax.random.fold_in(queue_rng, 1))
    state[INCOMING_G] = jnp.zeros((rows, features), jnp.float32)
  return params, state


def loss(params, state, batch, rng, step, config):
  del rng
  value, metrics, new_state, _ = contrast(params, state, batch, config, step=step)
  return value, (metrics, new_state)


def contrast(params, state, batch, config, specs=None, step=0):
  """MoCo's loss and its parts: (loss, metrics, new_state, the queries' common.Forward).

  For methods built on MoCo (CAST) that need the query feature maps too;
  specs: the method's views (default standard_views; only names and sizes count);
  step: the global step (kNN-MoCo's auxiliary loss starts at knn_start_step).
  """
  nets = common.build_networks(config, False)
  specs = V.standard_views(config) if specs is None else specs
  matched = pairs(specs, config)
  query_names = list(dict.fromkeys(q for qs in matched.values() for q in qs))
  query = common.forward(nets, params, state[common.BATCH_STATS], batch,
                         [s for s in specs if s.name in query_names])
  target = jax.lax.stop_gradient(state[common.TARGET])
  key_specs = [s for s in specs if s.name in matched]
  if bg_lib.NEGATIVE in batch:   # BG Swaps: batched with the keys (as the paper)
    key_specs.append(V.ViewSpec(bg_lib.NEGATIVE, batch[bg_lib.NEGATIVE].shape[1]))
  key_out = jax.lax.stop_gradient(common.forward(nets, target, state[common.BATCH_STATS], batch,
                                                 key_specs))
  keys = key_out.z
  extra = {B.VIEW1: keys[bg_lib.NEGATIVE]} if bg_lib.NEGATIVE in keys else {}
  negatives = jax.lax.stop_gradient(state[QUEUE]["keys"])
  temperature = float(config.loss.temperature)
  value, accuracy = instance_loss(matched, query.z, keys, negatives, extra, temperature)
  u = lambda tree: {k: uniform(v) for k, v in tree.items()}
  chance, _ = instance_loss(matched, u(query.z), u(keys), uniform(negatives), u(extra), 1.0)
  incoming = jnp.concatenate([keys[k] for k in matched], axis=0)
  new_state = dict(state, **{common.BATCH_STATS: query.batch_stats, INCOMING: incoming})
  metrics = {"loss": value, "accuracy": sum(accuracy) / len(accuracy), "loss_inst": value,
             "chance": chance}
  if knn_enabled(config):
    pooled = lambda maps, names: jnp.concatenate([heads.global_pool(maps[n]) for n in names])
    aux = nn_lib.knn_loss(
        jnp.concatenate([query.z[q] for q in query_names]), pooled(query.maps, query_names),
        negatives, jax.lax.stop_gradient(state[QUEUE_G]["keys"]),
        k=int(config.loss.knn_k), temperature=temperature)
    weight = jnp.where(step >= knn_start_step(config), float(config.loss.knn_weight), 0.0)
    value = value + weight * aux
    new_state[INCOMING_G] = l2_normalize(pooled(key_out.maps, list(matched)))
    # eq. 2 at uniform similarities: -log(1 / L) for every neighbour
    chance = chance + weight * jnp.log(float(negatives.shape[0]))
    metrics.update(loss=value, loss_knn=aux, knn_weight=weight, chance=chance)
  return value, metrics, new_state, query


def instance_loss(matched, queries, keys, negatives, extra, temperature):
  """InfoNCE summed over the key views, each the mean over the queries matched to it ->
  (loss, [top-1 accuracy per query view]). With `uniform` latents: the chance level,
  log(queue + 1) per key view (+1 candidate for queries with BG Swaps' negative)."""
  value, accuracy = 0.0, []
  for k, names in matched.items():
    terms = [info_nce(queries[q], keys[k], negatives, temperature=temperature,
                      extra=extra.get(q)) for q in names]
    value += sum(t[0] for t in terms) / len(terms)
    accuracy += [t[1] for t in terms]
  return value, accuracy


def momentum_update(params, state, momentum: float):
  """key <- m * key + (1 - m) * query for every network the key side holds (state['target'])."""
  online = {k: params[k] for k in state[common.TARGET]}
  return dict(state, **{common.TARGET: common.ema(state[common.TARGET], online, momentum)})


def after_update(params, state, step, config):
  """Momentum update of the key network, then enqueue this step's keys (and, for
  kNN-MoCo, their backbone features into the aligned queue)."""
  del step
  state = momentum_update(params, state, float(config.moco.momentum))
  queue = queue_lib.push(state[QUEUE], l2_normalize(state[INCOMING]))
  new = {QUEUE: queue}
  if QUEUE_G in state:
    new[QUEUE_G] = queue_lib.push(state[QUEUE_G], state[INCOMING_G])
  return params, dict(state, **new)


def default_config():
  # loss.knn_*: kNN-MoCo (off at weight 0; the paper: 0.4, k = 20, after 5 of 200 epochs)
  return {"moco": {"momentum": 0.999, "queue_size": 65536, "symmetric": False},
          "loss": {"knn_weight": 0.0, "knn_k": 20, "knn_start_fraction": 5 / 200}}


def validate(config):
  common.require(config, "moco", ("momentum", "queue_size", "symmetric"), "moco_v2")
  m, size = config.moco.momentum, int(config.moco.queue_size)
  if not 0.0 <= m < 1.0:
    raise ConfigError(f"config.moco.momentum={m!r}: must be in [0, 1) (paper: 0.999).")
  keys_per_step = config.batch_size * len(key_views(config))
  if size < keys_per_step:
    raise ConfigError(f"config.moco.queue_size={size}: must hold at least one step's keys "
                      f"({keys_per_step}); the paper uses 65536.")
  bg = config.get("background", None)
  if bg is not None and bg.mode == "swaps" and config.moco.symmetric:
    raise ConfigError("config.background.mode='swaps' needs config.moco.symmetric=False "
                      "(the background-matched negative belongs to the query view1).")
  # .get: objectives built on this framework (MaskCo, CAST) may lack the kNN keys
  weight, k = float(config.loss.get("knn_weight", 0.0)), int(config.loss.get("knn_k", 20))
  if weight < 0:
    raise ConfigError(f"config.loss.knn_weight={weight!r}: must be >= 0 (0: plain MoCo; "
                      "kNN-MoCo: 0.4).")
  if weight > 0 and not 1 <= k <= size:
    raise ConfigError(f"config.loss.knn_k={k}: must be in [1, queue_size={size}] (paper: 20).")
  start = float(config.loss.get("knn_start_fraction", 0.0))
  if not 0.0 <= start <= 1.0:
    raise ConfigError(f"config.loss.knn_start_fraction={start!r}: must be in [0, 1] (a "
                      "fraction of config.steps; paper: 5/200).")


OBJECTIVE = common.Objective("moco_v2", init, loss, after_update=after_update,
                             views=V.standard_views, default_config=default_config,
                             validate=validate, backgrounds=common.BACKGROUND_ALL_MODES)
