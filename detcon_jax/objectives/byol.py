"""BYOL, and the EMA-target framework it shares with DetCon-B.

The online network (encoder + projector + predictor) predicts the projections
of an EMA target network (encoder + projector) for the other view; the target
gets no gradient. after_update moves the target towards the online network
with BYOL's cosine-annealed decay (common.ema_decay).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines import batch as B
from detcon_jax.errors import ConfigError
from detcon_jax.objectives import common
from detcon_jax.objectives.contrastive import l2_normalize


def target_decay(step, config):
  """BYOL's tau: config.ema.tau0 at step 0, annealed to 1 at config.steps."""
  return common.ema_decay(step, config.ema.tau0, config.steps)


def update_target(params, state, step, config):
  """after_update of the EMA-target framework."""
  target = common.ema(state[common.TARGET], {k: params[k] for k in state[common.TARGET]},
                      target_decay(step, config))
  return params, dict(state, **{common.TARGET: target})


# config.ema: the target network's decay (0.99: BYOL's 300-epoch value; presets set theirs).
CONFIG = {"ema": {"tau0": 0.99}}


def check_tau(config, name: str):
  common.require(config, "ema", ("tau0",), name)
  if not 0.0 <= float(config.ema.tau0) <= 1.0:
    raise ConfigError(f"config.ema.tau0={config.ema.tau0!r}: must be in [0, 1] "
                      "(paper: 0.99 or 0.996).")


def bootstrap(name: str, pool, criterion, views=common.two_views, config=None,
              validate=None, masks=None) -> common.Objective:
  """An Objective: online+predictor vs stop-gradient EMA target, `pool`, `criterion`.

  criterion(pred1, pred2, target1, target2, batch, config) -> (loss, metrics),
  where predI comes from the online network on view I and targetI from the
  target network on view I. config: sections the method adds to CONFIG's;
  validate(config): its own checks. masks(target_maps, batch, rng, step, config)
  -> (batch, metrics): runs after the target's encoder, before any pooling, and may
  replace the batch's masks from the target's feature maps (online masks).
  """

  def init(rng, config, batch):
    common.check_views(batch, views(config), config)
    params, batch_stats = common.init_networks(common.build_networks(config, True), rng,
                                               batch[B.VIEW1])
    return params, {common.BATCH_STATS: batch_stats, common.TARGET: common.copy_of(params)}

  def loss(params, state, batch, rng, step, config):
    nets = common.build_networks(config, True)
    specs = views(config)
    target = jax.lax.stop_gradient(state[common.TARGET])
    # Target in training mode (batch statistics); its running averages are discarded.
    encoded = common.encode(nets, target, state[common.BATCH_STATS], batch, specs)
    mask_metrics = {}
    if masks is not None:
      batch, mask_metrics = masks(jax.lax.stop_gradient(encoded[0]), batch, rng, step, config)
    online = common.forward(nets, params, state[common.BATCH_STATS], batch, specs, pool)
    t = common.forward(nets, target, state[common.BATCH_STATS], batch, specs, pool,
                       encoded=encoded).z
    t = jax.lax.stop_gradient(t)
    p = online.p
    value, metrics = criterion(p[B.VIEW1], p[B.VIEW2], t[B.VIEW1], t[B.VIEW2], batch, config)
    new_state = dict(state, **{common.BATCH_STATS: online.batch_stats})
    return value, (dict(metrics, **mask_metrics, loss=value, tau=target_decay(step, config)),
                   new_state)

  def check(cfg):
    common.no_multi_crop(cfg, name)
    check_tau(cfg, name)
    if validate is not None:
      validate(cfg)

  return common.Objective(name, init, loss, after_update=update_target, views=views,
                          default_config=lambda: {**CONFIG, **(config or {})}, validate=check,
                          backgrounds=common.BACKGROUND_VIEW_MODES,
                          online_masks=masks is not None)


def regression_loss(pred, target):
  """BYOL's normalised regression 2 - 2 cos(pred, target), per row."""
  return 2.0 - 2.0 * jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)


def regression_criterion(pred1, pred2, target1, target2, batch, config):
  """Symmetric: view 1 predicts view 2's target and back; sum of the two means."""
  del batch, config
  return jnp.mean(regression_loss(pred1, target2)) + jnp.mean(regression_loss(pred2, target1)), {}


OBJECTIVE = bootstrap("byol", common.global_pool, regression_criterion)
