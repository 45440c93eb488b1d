"""MaskCo and MaskCo(+in) (Zhao et al. 2021, "Self-Supervised Visual Representations
Learning by Contrastive Mask Prediction"): region-level contrast of a masked box.

Views (data_pipelines/boxes.py): view1 is the query, view2 the key, both with
MoCo v2's augmentations; the key crop overlaps the query crop enough to hold a
box. 17 boxes are drawn in the key view (the first the positive, the others
IoU < 0.2 with it); the positive's projection into the query view is zeroed
there after every other augmentation.

Networks: MoCo v2's query encoder and momentum key encoder (moco.momentum_update,
common.ema), each with a mask prediction head (MPH, models/heads.py:
config.maskco.mph_blocks bottleneck blocks, 0 = none) between the backbone and
RoI align (models/roi_align.py), then the bin-averaged RoI feature through the
MLP projector:
  q = projector(pool(roi_align(MPH(f(x_q)), masked box)))         [B, D]
  k = projector_k(pool(roi_align(MPH_k(f_k(x_k)), key boxes)))    [B, 17, D], no gradient
Loss (contrastive.region_nce): InfoNCE at temperature 0.2 with the same box's
key as the positive and the 16 negative boxes of every other image as
negatives, over each device's images by default as the paper (16 x 31 at 32
images per GPU; config.loss.local_negatives=False: the global batch);
config.loss.intra_negatives=True adds the image's own 16 (MaskCo(+in)). There
is no queue (the paper's negatives come from the batch).

Batch norm: as MoCo v2 here, statistics span the global batch and the key
side runs in training mode. The MPH only ever runs in training mode (it is
neither exported nor evaluated), so its running averages are never updated.
The paper does not say how the RoI features are pooled before its MoCo v2
projection head; here the output_size x output_size bins are averaged.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from detcon_jax.errors import ConfigError
from data_pipelines import batch as B
from data_pipelines import boxes as boxes_lib
from data_pipelines import views as V
from detcon_jax.models import heads
from detcon_jax.models.resnet import compute_dtype
from detcon_jax.models.roi_align import roi_align
from detcon_jax.objectives import common, moco
from detcon_jax.objectives.contrastive import region_nce, uniform

QUERY, KEY, MPH = B.VIEW1, B.VIEW2, "mph"
BOXES, VALID = boxes_lib.BOXES, boxes_lib.BOXES_VALID


def views(config):
  """MoCo v2's two views, view1 carrying the masked box and view2 the key boxes."""
  m = config.maskco
  spec = lambda role: V.BoxSpec(role, count=int(m.num_boxes),
                                size=tuple(float(s) for s in m.box_size),
                                max_iou=float(m.max_iou))
  q, k = V.standard_views(config)[:2]
  return (dataclasses.replace(q, boxes=spec("query")),
          dataclasses.replace(k, boxes=spec("key")))


def _mph(config):
  return heads.MaskPredictionHead(int(config.maskco.mph_blocks),
                                  compute_dtype(config.model.get("dtype", "float32")))


def _check_batch(batch, specs, config):
  common.check_views(batch, specs, config)
  for s in specs:
    want = (batch[s.name].shape[0], s.boxes.num_boxes())
    for field, shape in ((BOXES, want + (4,)), (VALID, want)):
      name = B.key(s.name, field)
      if name not in batch or tuple(batch[name].shape) != shape:
        got = tuple(batch[name].shape) if name in batch else "nothing"
        raise ValueError(f"batch['{name}'] must have shape {shape} (got {got}); MaskCo needs "
                         "the boxes its view specs ask for (maskco.views).")


def init(rng, config, batch):
  specs = views(config)
  _check_batch(batch, specs, config)
  nets = common.build_networks(config, False)
  net_rng, mph_rng = jax.random.split(rng)
  params, batch_stats = common.init_networks(nets, net_rng, batch[QUERY])
  maps = jax.eval_shape(lambda p, s: nets.encoder.apply({"params": p, "batch_stats": s},
                                                        batch[QUERY][:1], train=False),
                        params[common.ENCODER], batch_stats[common.ENCODER])["stage4"]
  variables = _mph(config).init(mph_rng, jnp.zeros(maps.shape, jnp.float32), train=False)
  params[MPH] = variables.get("params", {})
  batch_stats[MPH] = variables.get(common.BATCH_STATS, {})
  target = common.copy_of(params, (common.ENCODER, common.PROJECTOR, MPH))
  return params, {common.BATCH_STATS: batch_stats, common.TARGET: target}


def region_pool(config, mph_params, mph_stats, size: int):
  """common.forward's pool: MPH, RoI align of each view's boxes, mean over the bins
  -> [B*V, N, C]."""
  mph, m = _mph(config), config.maskco

  def pool(maps, batch, names):
    maps, _ = mph.apply({"params": mph_params, common.BATCH_STATS: mph_stats}, maps, train=True,
                        mutable=[common.BATCH_STATS])
    boxes = common.stack_views(batch, [B.key(n, BOXES) for n in names])
    rois = roi_align(maps, boxes, int(m.roi_size), spatial_scale=maps.shape[1] / size,
                     sampling_ratio=int(m.sampling_ratio), aligned=True)
    return jnp.mean(rois, axis=(2, 3))

  return pool


def loss(params, state, batch, rng, step, config):
  del rng, step
  nets = common.build_networks(config, False)
  query_spec, key_spec = views(config)
  stats = state[common.BATCH_STATS]
  query = common.forward(nets, params, stats, batch, [query_spec],
                         pool=region_pool(config, params[MPH], stats[MPH], query_spec.size))
  target = jax.lax.stop_gradient(state[common.TARGET])
  keys = common.forward(nets, target, stats, batch, [key_spec],
                        pool=region_pool(config, target[MPH], stats[MPH], key_spec.size)).z
  keys = jax.lax.stop_gradient(keys[KEY])
  key_valid = batch[B.key(KEY, VALID)]
  loss = lambda q, k, tau: region_nce(
      q, k, batch[B.key(QUERY, VALID)][:, 0], key_valid, temperature=tau,
      num_shards=common.negative_shards(config), intra=bool(config.loss.intra_negatives))
  value, accuracy, rows = loss(query.z[QUERY][:, 0], keys, float(config.loss.temperature))
  chance, _, _ = loss(uniform(query.z[QUERY][:, 0]), uniform(keys), 1.0)   # log(1 + negatives)
  new_state = dict(state, **{common.BATCH_STATS: dict(query.batch_stats, **{MPH: stats[MPH]})})
  metrics = {"loss": value, "accuracy": accuracy, "chance": chance,
             "boxes/rows_kept": rows / key_valid.shape[0],
             "boxes/valid_negatives": jnp.mean(key_valid[:, 1:].astype(jnp.float32))}
  return value, (metrics, new_state)


def after_update(params, state, step, config):
  """Momentum update of the key encoder, its MPH and projector (MoCo v2's rule)."""
  del step
  return params, moco.momentum_update(params, state, float(config.maskco.momentum))


def default_config():
  return {"maskco": {"momentum": 0.999, "num_boxes": 17, "box_size": (32.0, 128.0),
                     "max_iou": 0.2, "mph_blocks": 3, "roi_size": 7, "sampling_ratio": 2}}


def validate(config):
  common.require(config, "maskco", ("momentum", "num_boxes", "box_size", "max_iou",
                                    "mph_blocks", "roi_size", "sampling_ratio"), "maskco")
  common.require(config, "loss", ("intra_negatives",), "maskco")
  common.no_multi_crop(config, "maskco")
  m = config.maskco
  checks = (
      ("momentum", 0.0 <= m.momentum < 1.0, "must be in [0, 1) (paper: 0.999)"),
      ("num_boxes", int(m.num_boxes) >= 2, "must be >= 2: a positive and negatives (paper: 17)"),
      ("box_size", 0 < m.box_size[0] <= m.box_size[1] <= 224,
       "must be (low, high) pixels at 224 px with 0 < low <= high <= 224 (paper: (32, 128))"),
      ("max_iou", 0.0 < m.max_iou <= 1.0, "must be in (0, 1] (paper: 0.2)"),
      ("mph_blocks", int(m.mph_blocks) >= 0, "must be >= 0 (0: no head; paper: 3)"),
      ("roi_size", int(m.roi_size) >= 1, "must be >= 1 (RoI align bins per side)"),
      ("sampling_ratio", int(m.sampling_ratio) >= 1,
       "must be >= 1 (samples per bin side; the adaptive 0 is not jit-able)"),
  )
  for key, ok, fix in checks:
    if not ok:
      raise ConfigError(f"config.maskco.{key}={m[key]!r}: {fix}.")


OBJECTIVE = common.Objective("maskco", init, loss, after_update=after_update, views=views,
                             default_config=default_config, validate=validate)
