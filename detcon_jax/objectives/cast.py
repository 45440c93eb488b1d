"""CAST (Selvaraju, Desai, Johnson, Naik 2021) on MoCo v2: saliency-constrained crops and a
Grad-CAM attention loss.

Both views are saliency-constrained crops (config.views.min_salient_cover, phi =
0.2; data_pipelines/augment.salient_crop_box) and carry their saliency maps.
On top of MoCo v2's loss (moco.contrast: query network, momentum key network,
queue; reused, not copied) the attention loss asks the query network to look
where the saliency is when it matches the key's salient part:
  * masked key: the key view times its (binarised) key saliency, through the
    momentum network without gradient; never enqueued;
  * G = d(q . k_masked / tau) / dA, A the query's last conv activations
    (common.Forward.maps); alpha = spatial mean of G; Grad-CAM =
    ReLU(sum_c alpha_c A_c), min-max normalised per image (the reference);
  * L_att = 1 - cosine(Grad-CAM, the query's binarised saliency resized to the
    feature grid, bilinear with align_corners=True).
Total: L_moco + lambda L_att (paper, lambda = 3); config.cast.total='normalized'
gives the released code's (L_moco + 3 L_att) / 4. config.cast.cosine='image'
(default, paper eq. 4) averages one cosine per image; 'batch' is the released
code's single cosine over the flattened batch.

The gradient of L_att is second order (it differentiates through G); JAX
nests the two gradients, so the step jits and shards like any other.

Where this follows the released code (salesforce/CAST) rather than the paper's
text: the logit q.k_masked/tau is differentiated (the 1/tau scale cancels in
the cosine); saliency is binarised at config.data.foreground_threshold (0.5;
the reference: > 128 of 255; config.cast.binarise=False keeps the soft map)
before masking the key and before resizing the query map; the masked-out key
pixels are the ImageNet mean colour (the reference multiplies the *normalised*
key by the mask, i.e. zero after normalisation); the query's target is its
whole crop's saliency (the reference's output_mask_region='ref', the paper's
Table 2d default), each crop constrained on its own (second_constraint='ref');
Grad-CAM is min-max normalised (config.cast.gradcam_norm='none': the paper's
eq. 2 alone). G is per image because MoCo v2's head has no batch norm (a
batch-norm head would couple the images; validate() refuses it).

Differences from the released code kept on purpose: the reference's second
forward pass (for the masked key) also re-runs the momentum update, so its key
network moves twice per step (effective momentum 0.999^2); here once
(set config.moco.momentum=0.998001 to match). The reference resamples an image
whose saliency is empty; here such images drop out of the attention mean
(metric 'att_images'). Its gradient-norm clipping (2.0) is not applied.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from detcon_jax.errors import ConfigError
from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.models import heads
from detcon_jax.models.gradcam import GRADCAM_NORMS, grad_cam, resize_align_corners
from detcon_jax.models.resnet import IMAGENET_MEAN
from detcon_jax.objectives import common, moco
from detcon_jax.objectives.contrastive import l2_normalize

QUERY, KEY = B.VIEW1, B.VIEW2
COSINES = ("image", "batch")
TOTALS = ("sum", "normalized")
EPS_COSINE = 1e-8          # torch.nn.CosineSimilarity's eps, as the reference


# --- Pure math ---------------------------------------------------------------------

def _cosine(a, b, axis):
  """torch.nn.CosineSimilarity: a.b / max(|a| |b|, eps), safe to differentiate at 0."""
  dot = jnp.sum(a * b, axis=axis)
  sq = jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis)
  return dot / jnp.sqrt(jnp.maximum(sq, EPS_COSINE ** 2))


def attention_loss(cam, saliency, cosine: str = "image"):
  """(L_att, images counted): 1 - cosine(cam, saliency), both [B, h, w].

  'image' (paper eq. 4): the mean over images whose saliency is non-empty (an
  image without salient pixels says nothing about where to look). 'batch' (the
  released code): one cosine between the flattened batches.
  """
  b = cam.shape[0]
  if cosine == "batch":
    return 1.0 - _cosine(cam.reshape(1, -1), saliency.reshape(1, -1), axis=1)[0], jnp.float32(b)
  valid = (jnp.sum(saliency, axis=(1, 2)) > 0).astype(jnp.float32)
  per_image = 1.0 - _cosine(cam.reshape(b, -1), saliency.reshape(b, -1), axis=1)
  count = jnp.sum(valid)
  return jnp.sum(valid * per_image) / jnp.maximum(count, 1.0), count


def binarise(saliency, threshold):
  """Saliency [.., H, W] in [0, 1] -> 0/1 at `threshold` (None: the soft map)."""
  if threshold is None:
    return saliency.astype(jnp.float32)
  return (saliency > threshold).astype(jnp.float32)


def mask_images(images, mask):
  """Images [B, H, W, 3] in [0, 1] times mask [B, H, W] in normalised space: masked-out
  pixels become the ImageNet mean colour (zero after normalisation), as the reference."""
  mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
  return mean + (images - mean) * mask[..., None].astype(images.dtype)


def total_loss(l_moco, l_att, weight: float, form: str = "sum"):
  """L_moco + weight L_att ('sum', paper) or its mean weighting (L_moco + w L_att)/(1 + w)
  ('normalized', the released code with beta = 1)."""
  value = l_moco + weight * l_att
  return value / (1.0 + weight) if form == "normalized" else value


# --- The objective -----------------------------------------------------------------

def views(config):
  """MoCo v2's two global views, saliency-constrained (config.views.min_salient_cover)
  and carrying their saliency maps."""
  return tuple(dataclasses.replace(s, fields=tuple(s.fields) + (V.SALIENCY,))
               for s in V.standard_views(config))


def query_head(nets, params, batch_stats):
  """A -> l2-normalised query embedding: the part of the query network after the last
  conv layer (global pool, projector), as common.forward computes it."""
  def head(maps):
    z, _ = nets.projector.apply({"params": params[common.PROJECTOR],
                                 common.BATCH_STATS: batch_stats[common.PROJECTOR]},
                                heads.global_pool(maps), train=True,
                                mutable=[common.BATCH_STATS])
    return l2_normalize(z.astype(jnp.float32))
  return head


def init(rng, config, batch):
  missing = [B.key(s.name, V.SALIENCY) for s in views(config)
             if B.key(s.name, V.SALIENCY) not in batch]
  if missing:
    raise ValueError(f"CAST needs saliency maps: the batch lacks {missing}. Build the records "
                     "with saliency (python -m data_pipelines.build ... --masks=fh,saliency; "
                     "the demo records get it when rebuilt).")
  return moco.init(rng, config, batch)


def loss(params, state, batch, rng, step, config):
  del rng
  c = config.cast
  specs = views(config)
  l_moco, metrics, new_state, query = moco.contrast(params, state, batch, config, specs,
                                                    step=step)
  nets = common.build_networks(config, False)
  key_spec = [s for s in specs if s.name == KEY]
  threshold = float(config.data.foreground_threshold) if c.binarise else None
  masked = {KEY: mask_images(batch[KEY], binarise(batch[B.key(KEY, V.SALIENCY)], threshold))}
  target = jax.lax.stop_gradient(state[common.TARGET])
  k_masked = common.forward(nets, target, state[common.BATCH_STATS], masked, key_spec).z[KEY]
  k_masked = jax.lax.stop_gradient(l2_normalize(k_masked))
  maps = query.maps[QUERY]
  cam = grad_cam(query_head(nets, params, state[common.BATCH_STATS]), maps, k_masked,
                 temperature=float(config.loss.temperature), norm=c.gradcam_norm)
  saliency = resize_align_corners(binarise(batch[B.key(QUERY, V.SALIENCY)], threshold),
                                  *maps.shape[1:3])
  l_att, counted = attention_loss(cam, saliency, c.cosine)
  value = total_loss(l_moco, l_att, float(c.attention_weight), c.total)
  # chance: the loss with MoCo's similarities uniform and the attention loss as it is
  metrics = dict(metrics, loss=value, loss_moco=l_moco, loss_att=l_att,
                 chance=total_loss(metrics["chance"], l_att, float(c.attention_weight), c.total),
                 att_images=counted / cam.shape[0])
  return value, (metrics, new_state)


def default_config():
  return {**moco.default_config(),
          "cast": {"attention_weight": 3.0, "total": "sum", "cosine": "image",
                   "gradcam_norm": "minmax", "binarise": True}}


def validate(config):
  moco.validate(config)
  common.require(config, "cast", ("attention_weight", "total", "cosine", "gradcam_norm",
                                  "binarise"), "cast")
  c = config.cast
  for key, value, choices in (("total", c.total, TOTALS), ("cosine", c.cosine, COSINES),
                              ("gradcam_norm", c.gradcam_norm, GRADCAM_NORMS)):
    if value not in choices:
      raise ConfigError(f"config.cast.{key}={value!r}: choose one of {list(choices)}.")
  if c.attention_weight < 0:
    raise ConfigError(f"config.cast.attention_weight={c.attention_weight!r}: must be >= 0 "
                      "(paper: 3).")
  if config.head.get("batch_norm", True):
    raise ConfigError("config.head.batch_norm=True: CAST needs a head without batch norm "
                      "(MoCo v2's), so that Grad-CAM is per image; set it to False.")
  if config.moco.symmetric:
    raise ConfigError("config.moco.symmetric=True: CAST is asymmetric (queries from view1, "
                      "keys from view2), as its reference; set it to False.")
  common.no_multi_crop(config, "cast")


OBJECTIVE = common.Objective("cast", init, loss, after_update=moco.after_update, views=views,
                             default_config=default_config, validate=validate)
