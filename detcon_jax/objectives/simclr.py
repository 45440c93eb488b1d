"""SimCLR, and the siamese framework it shares with DetCon-S.

One network (encoder + projector) embeds both views; the criterion compares
the two views' projections with each other, with gradients through both.
"""
from __future__ import annotations

from data_pipelines import batch as B
from detcon_jax.objectives import common
from detcon_jax.objectives.contrastive import nt_xent


def siamese(name: str, pool, criterion, needs_masks: bool) -> common.Objective:
  """An Objective: shared network, `pool` of the final feature map, `criterion`.

  criterion(online1, online2, target1, target2, batch, config) -> (loss, metrics);
  here target = online (no predictor, no stop-gradient).
  """

  def init(rng, config, batch):
    common.check_views(batch, needs_masks, config)
    params, batch_stats = common.init_networks(common.build_networks(config, False), rng,
                                               batch[B.VIEW1])
    return params, {common.BATCH_STATS: batch_stats}

  def loss(params, state, batch, rng, step, config):
    del rng, step
    nets = common.build_networks(config, False)
    z, _, batch_stats = common.embed(nets, params, state[common.BATCH_STATS],
                                     common.both_views(batch, B.VIEW1, B.VIEW2),
                                     lambda f: pool(f, batch))
    z1, z2 = common.split_views(z)
    value, metrics = criterion(z1, z2, z1, z2, batch, config)
    return value, (dict(metrics, loss=value), {common.BATCH_STATS: batch_stats})

  return common.Objective(name, init, loss)


def nt_xent_criterion(online1, online2, target1, target2, batch, config):
  del batch
  return nt_xent(online1, online2, target1, target2, temperature=float(config.loss.temperature),
                 num_shards=common.negative_shards(config)), {}


OBJECTIVE = siamese("simclr", common.global_pool, nt_xent_criterion, needs_masks=False)
