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
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from configs.common import ConfigError
from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.objectives import common
from detcon_jax.objectives import queue as queue_lib
from detcon_jax.objectives.contrastive import info_nce, l2_normalize

QUEUE, INCOMING = "queue", "incoming"


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
  incoming = jnp.zeros((batch[B.VIEW1].shape[0] * len(key_views(config)), dim), jnp.float32)
  return params, {common.BATCH_STATS: batch_stats, common.TARGET: common.copy_of(params),
                  QUEUE: queue_lib.create(config.moco.queue_size, (dim,), queue_rng),
                  INCOMING: incoming}


def loss(params, state, batch, rng, step, config):
  del rng, step
  value, metrics, new_state, _ = contrast(params, state, batch, config)
  return value, (metrics, new_state)


def contrast(params, state, batch, config, specs=None):
  """MoCo's loss and its parts: (loss, metrics, new_state, the queries' common.Forward).

  For methods built on MoCo (CAST) that need the query feature maps too;
  specs: the method's views (default standard_views; only names and sizes count).
  """
  nets = common.build_networks(config, False)
  specs = V.standard_views(config) if specs is None else specs
  matched = pairs(specs, config)
  query_names = list(dict.fromkeys(q for qs in matched.values() for q in qs))
  query = common.forward(nets, params, state[common.BATCH_STATS], batch,
                         [s for s in specs if s.name in query_names])
  target = jax.lax.stop_gradient(state[common.TARGET])
  keys = common.forward(nets, target, state[common.BATCH_STATS], batch,
                        [s for s in specs if s.name in matched]).z
  keys = jax.lax.stop_gradient(keys)
  negatives = jax.lax.stop_gradient(state[QUEUE]["keys"])
  temperature = float(config.loss.temperature)
  value, accuracy = 0.0, []
  for k, queries in matched.items():
    terms = [info_nce(query.z[q], keys[k], negatives, temperature=temperature)
             for q in queries]
    value += sum(t[0] for t in terms) / len(terms)
    accuracy += [t[1] for t in terms]
  incoming = jnp.concatenate([keys[k] for k in matched], axis=0)
  new_state = dict(state, **{common.BATCH_STATS: query.batch_stats, INCOMING: incoming})
  metrics = {"loss": value, "accuracy": sum(accuracy) / len(accuracy)}
  return value, metrics, new_state, query


def momentum_update(params, state, momentum: float):
  """key <- m * key + (1 - m) * query for every network the key side holds (state['target'])."""
  online = {k: params[k] for k in state[common.TARGET]}
  return dict(state, **{common.TARGET: common.ema(state[common.TARGET], online, momentum)})


def after_update(params, state, step, config):
  """Momentum update of the key network, then enqueue this step's keys."""
  del step
  state = momentum_update(params, state, float(config.moco.momentum))
  queue = queue_lib.push(state[QUEUE], l2_normalize(state[INCOMING]))
  return params, dict(state, **{QUEUE: queue})


def default_config():
  return {"moco": {"momentum": 0.999, "queue_size": 65536, "symmetric": False}}


def validate(config):
  common.require(config, "moco", ("momentum", "queue_size", "symmetric"), "moco_v2")
  m, size = config.moco.momentum, int(config.moco.queue_size)
  if not 0.0 <= m < 1.0:
    raise ConfigError(f"config.moco.momentum={m!r}: must be in [0, 1) (paper: 0.999).")
  keys_per_step = config.batch_size * len(key_views(config))
  if size < keys_per_step:
    raise ConfigError(f"config.moco.queue_size={size}: must hold at least one step's keys "
                      f"({keys_per_step}); the paper uses 65536.")


OBJECTIVE = common.Objective("moco_v2", init, loss, after_update=after_update,
                             views=V.standard_views, default_config=default_config,
                             validate=validate)
