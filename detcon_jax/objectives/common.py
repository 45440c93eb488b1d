"""What the objectives share: the Objective record, the network layout, the forward pass.

Layout (plain dict pytrees, so EMA, LARS masks and checkpoints are tree maps):
  params = {'encoder': ..., 'projector': ...[, 'predictor': ...]}
  state  = {'batch_stats': {same keys as params}[, 'target': {'encoder', 'projector'}]}
'target' (bootstrap methods only) holds the EMA copy of params['encoder'] and
params['projector']. The target runs in training mode, so its batch norm uses
the current batch's statistics (as the BYOL reference) and needs no running
averages of its own.

Both views go through one network call, interleaved per image ([B, 2, ...] ->
[2B, ...]) so that each device's slice of a sharded batch holds both views of
its own images and no data moves between devices; batch norm statistics span
both views of the global batch.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from data_pipelines import batch as B
from detcon_jax.models import heads
from detcon_jax.models.resnet import compute_dtype, encoder_from_config, normalize_images

ENCODER, PROJECTOR, PREDICTOR, TARGET, BATCH_STATS = (
    "encoder", "projector", "predictor", "target", "batch_stats")


class Objective(NamedTuple):
  """A pretraining method as the trainer sees it (see registry.py)."""
  name: str
  init: Callable      # (rng, config, batch) -> (params, state)
  loss: Callable      # (params, state, batch, rng, step, config) -> (loss, (metrics, new_state))


class Networks(NamedTuple):
  encoder: object
  projector: object
  predictor: object | None


def build_networks(config, with_predictor: bool) -> Networks:
  """Encoder from config.model; projector/predictor MLPs from config.head."""
  dtype = compute_dtype(config.model.get("dtype", "float32"))
  mlp = lambda: heads.MLP(int(config.head.hidden_dim), int(config.head.output_dim), dtype=dtype)
  return Networks(encoder_from_config(config), mlp(), mlp() if with_predictor else None)


def init_networks(nets: Networks, rng, images):
  """Params and batch stats of every network, traced on the first image of `images`."""
  keys = jax.random.split(rng, 3)
  variables = {ENCODER: nets.encoder.init(keys[0], normalize_images(images[:1]), train=False)}
  out = jax.eval_shape(lambda v: nets.encoder.apply(v, images[:1], train=False),
                       variables[ENCODER])["stage4"]
  latent = jnp.zeros((1, out.shape[-1]), jnp.float32)
  variables[PROJECTOR] = nets.projector.init(keys[1], latent, train=False)
  if nets.predictor is not None:
    proj = jnp.zeros((1, nets.projector.output_dim), jnp.float32)
    variables[PREDICTOR] = nets.predictor.init(keys[2], proj, train=False)
  params = {k: v["params"] for k, v in variables.items()}
  batch_stats = {k: v[BATCH_STATS] for k, v in variables.items()}
  return params, batch_stats


def _apply(module, params, batch_stats, x):
  out, updates = module.apply({"params": params, BATCH_STATS: batch_stats}, x, train=True,
                              mutable=[BATCH_STATS])
  return out, updates[BATCH_STATS]


def embed(nets: Networks, params, batch_stats, images, pool):
  """images [N, H, W, 3] in [0, 1] -> (projections, predictions or None, new batch stats).

  `pool` maps the final feature map [N, h, w, C] to [N, C] or [N, K, C].
  Runs in training mode; the predictor runs when `params` has one.
  """
  new_stats = {}
  maps, new_stats[ENCODER] = _apply(nets.encoder, params[ENCODER], batch_stats[ENCODER],
                                    normalize_images(images))
  z, new_stats[PROJECTOR] = _apply(nets.projector, params[PROJECTOR], batch_stats[PROJECTOR],
                                   pool(maps["stage4"]))
  p = None
  if PREDICTOR in params:
    p, new_stats[PREDICTOR] = _apply(nets.predictor, params[PREDICTOR], batch_stats[PREDICTOR], z)
    p = p.astype(jnp.float32)
  return z.astype(jnp.float32), p, new_stats


def both_views(batch, key1: str, key2: str):
  """Interleave the two views per image: [B, ...] x 2 -> [2B, ...] (view1, view2, view1, ...)."""
  a, b = batch[key1], batch[key2]
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def split_views(x):
  """Inverse of both_views: [2B, ...] -> ([B, ...], [B, ...])."""
  x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return x[:, 0], x[:, 1]


def global_pool(features, batch):
  """One global mask per view (SimCLR/BYOL): [2B, h, w, C] -> [2B, C]."""
  del batch
  return heads.global_pool(features)


def masks_pool(features, batch):
  """DetCon's mask pooling of both views: [2B, h, w, C] -> [2B, K, C]."""
  pooled, _ = heads.mask_pool(features, both_views(batch, B.MASKS1, B.MASKS2),
                              both_views(batch, B.MASK_IDS1, B.MASK_IDS2))
  return pooled


def negative_shards(config) -> int:
  """Blocks the negatives are restricted to: 1 (global) or the device count.

  config.loss.local_negatives=True restricts negatives to each device's slice
  of the global batch (DetCon Table 5); config.loss.num_shards overrides the
  device count (e.g. to emulate a pod slice on one host).
  """
  if not config.loss.get("local_negatives", False):
    return 1
  return int(config.loss.get("num_shards", None) or jax.device_count())


def check_views(batch, needs_masks: bool, config=None):
  """Validate the batch at init: named keys present, masks the size of the views."""
  keys = [B.VIEW1, B.VIEW2] + ([B.MASKS1, B.MASKS2, B.MASK_IDS1, B.MASK_IDS2] if needs_masks else [])
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"The batch lacks {missing} (has {sorted(batch)}); "
                     + ("mask-based methods need records built with masks." if needs_masks
                        else "the input pipeline must produce two views."))
  if needs_masks:
    for view, masks, ids in ((B.VIEW1, B.MASKS1, B.MASK_IDS1), (B.VIEW2, B.MASKS2, B.MASK_IDS2)):
      if tuple(batch[masks].shape) != tuple(batch[view].shape[:3]):
        raise ValueError(f"batch['{masks}'] has shape {tuple(batch[masks].shape)}; it must be "
                         f"the size of batch['{view}'] {tuple(batch[view].shape[:3])}.")
      want = config.loss.get("num_masks", None) if config is not None else None
      if want is not None and batch[ids].shape[-1] != int(want):
        raise ValueError(f"batch['{ids}'] has {batch[ids].shape[-1]} masks per image but "
                         f"config.loss.num_masks={want}; make them agree.")
