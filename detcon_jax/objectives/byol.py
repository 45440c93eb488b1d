"""BYOL, and the bootstrap framework it shares with DetCon-B.

The online network (encoder + projector + predictor) predicts the projections
of an EMA target network (encoder + projector) for the other view; the target
gets no gradient. The EMA update itself is the trainer's (registry.update_target).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines import batch as B
from detcon_jax.objectives import common
from detcon_jax.objectives.contrastive import l2_normalize


def bootstrap(name: str, pool, criterion, needs_masks: bool) -> common.Objective:
  """An Objective: online+predictor vs stop-gradient EMA target, `pool`, `criterion`.

  criterion(pred1, pred2, target1, target2, batch, config) -> (loss, metrics),
  where predI comes from the online network on view I and targetI from the
  target network on view I.
  """

  def init(rng, config, batch):
    common.check_views(batch, needs_masks, config)
    params, batch_stats = common.init_networks(common.build_networks(config, True), rng,
                                               batch[B.VIEW1])
    # A copy, not an alias: the trainer may donate params and state separately.
    target = jax.tree.map(jnp.array, {k: params[k] for k in (common.ENCODER, common.PROJECTOR)})
    return params, {common.BATCH_STATS: batch_stats, common.TARGET: target}

  def loss(params, state, batch, rng, step, config):
    del rng, step
    nets = common.build_networks(config, True)
    images = common.both_views(batch, B.VIEW1, B.VIEW2)
    pool_fn = lambda f: pool(f, batch)
    _, pred, batch_stats = common.embed(nets, params, state[common.BATCH_STATS], images, pool_fn)
    target = jax.lax.stop_gradient(state[common.TARGET])
    # Target in training mode (batch statistics); its running averages are discarded.
    target_z, _, _ = common.embed(nets, target, state[common.BATCH_STATS], images, pool_fn)
    target_z = jax.lax.stop_gradient(target_z)
    p1, p2 = common.split_views(pred)
    t1, t2 = common.split_views(target_z)
    value, metrics = criterion(p1, p2, t1, t2, batch, config)
    new_state = dict(state, **{common.BATCH_STATS: batch_stats})
    return value, (dict(metrics, loss=value), new_state)

  return common.Objective(name, init, loss)


def regression_loss(pred, target):
  """BYOL's normalised regression 2 - 2 cos(pred, target), per row."""
  return 2.0 - 2.0 * jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)


def regression_criterion(pred1, pred2, target1, target2, batch, config):
  """Symmetric: view 1 predicts view 2's target and back; sum of the two means."""
  del batch, config
  return jnp.mean(regression_loss(pred1, target2)) + jnp.mean(regression_loss(pred2, target1)), {}


OBJECTIVE = bootstrap("byol", common.global_pool, regression_criterion, needs_masks=False)
