"""SimCLR, and the shared-network framework it shares with DetCon-S.

One network (encoder + projector) embeds both views; the criterion compares
the two views' projections with each other, with gradients through both.
BG Swaps' background-matched negative (batch[background.NEGATIVE]; SimCLR and
DetCon-S) goes through the same network in the views' call (pooled as view 1:
background.negative_view) and is one more negative of each view-1 anchor.
"""
from __future__ import annotations

from data_pipelines import background_augment as bg_lib
from data_pipelines import batch as B
from detcon_jax.objectives import common
from detcon_jax.objectives.contrastive import nt_xent, uniform


def siamese(name: str, pool, criterion, views=common.two_views, validate=None,
            config=None) -> common.Objective:
  """An Objective: shared network, `pool` of the final feature map, `criterion`.

  criterion(online1, online2, target1, target2, batch, config) -> (loss, metrics);
  here target = online (no predictor, no stop-gradient).
  """

  def init(rng, config, batch):
    common.check_views(batch, views(config), config)
    params, batch_stats = common.init_networks(common.build_networks(config, False), rng,
                                               batch[B.VIEW1])
    return params, {common.BATCH_STATS: batch_stats}

  def loss(params, state, batch, rng, step, config):
    del rng, step
    nets = common.build_networks(config, False)
    specs = views(config)
    extra = {}
    if bg_lib.NEGATIVE in batch:
      batch, negative = bg_lib.negative_view(batch, specs[0])
      specs += (negative,)
    out = common.forward(nets, params, state[common.BATCH_STATS], batch, specs, pool)
    if bg_lib.NEGATIVE in batch:
      extra = {"extra": out.z[bg_lib.NEGATIVE]}
    z1, z2 = out.z[B.VIEW1], out.z[B.VIEW2]
    value, metrics = criterion(z1, z2, z1, z2, batch, config, **extra)
    return value, (dict(metrics, loss=value), {common.BATCH_STATS: out.batch_stats})

  def check(config):
    common.no_multi_crop(config, name)
    if validate is not None:
      validate(config)

  return common.Objective(name, init, loss, views=views, validate=check,
                          default_config=lambda: dict(config or {}),
                          backgrounds=common.BACKGROUND_ALL_MODES)


def nt_xent_criterion(online1, online2, target1, target2, batch, config, extra=None):
  """NT-Xent, and its chance level (2 log(2N - 1) on one shard, + BG Swaps' negative)."""
  del batch
  loss = lambda o1, o2, t1, t2, e, tau: nt_xent(o1, o2, t1, t2, temperature=tau, extra=e,
                                                num_shards=common.negative_shards(config))
  value = loss(online1, online2, target1, target2, extra, float(config.loss.temperature))
  u = uniform
  return value, {"chance": loss(u(online1), u(online2), u(target1), u(target2), u(extra), 1.0)}


OBJECTIVE = siamese("simclr", common.global_pool, nt_xent_criterion)
