"""Grounding (CAST, section 4.4): where does the network look when a query matches its key?

For every test image: query = the image through the trained query network,
key = the same image through the key network (the momentum/EMA target where
the method has one, else the query network); Grad-CAM of q . k on the last
conv activations (models/gradcam.grad_cam), upsampled bilinearly to the
image, min-max normalised per image and binarised at 0.5; IoU with the
ground-truth foreground (records with GT: every instance pixel) or, without GT,
with the image's saliency binarised at 0.5. Reported: the mean IoU over images
whose target is non-empty (the paper: MoCo-COCO 0.24, CAST 0.41 on COCO val).

Both networks run in inference mode with the query network's running batch-norm
averages (the key network keeps none of its own), so an image's map does not
depend on the rest of its batch. The key is the unaugmented image, so the
number measures grounding, not augmentation luck.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import batch as B
from detcon_jax.evaluate import visualize
from detcon_jax.models import heads
from detcon_jax.models.gradcam import grad_cam
from detcon_jax.models.resnet import normalize_images
from detcon_jax.objectives import common
from detcon_jax.objectives.contrastive import l2_normalize

THRESHOLD = 0.5
NUM_OVERLAYS = 4


def binarised_cam(cam, size: int):
  """Grad-CAM [B, h, w] -> bool [B, size, size]: bilinear to the image, min-max per image,
  >= 0.5."""
  up = np.asarray(jax.image.resize(jnp.asarray(cam, jnp.float32),
                                   (cam.shape[0], size, size), "bilinear"))
  lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
  return (up - lo) / np.maximum(hi - lo, 1e-12) >= THRESHOLD, up


def iou(pred, target):
  """Per-image IoU of bool [B, H, W] maps; NaN where the target is empty."""
  inter = np.sum(pred & target, axis=(1, 2))
  union = np.sum(pred | target, axis=(1, 2))
  return np.where(target.any(axis=(1, 2)), inter / np.maximum(union, 1), np.nan)


def make_cam_fn(config):
  """jit(params, state, images [B, S, S, 3] in [0, 1]) -> Grad-CAM [B, h, w] on the grid."""
  nets = common.build_networks(config, False)

  def run(module, params, stats, x):
    return module.apply({"params": params, common.BATCH_STATS: stats}, x, train=False)

  def cams(params, state, images):
    stats = state[common.BATCH_STATS]
    key_params = state.get(common.TARGET, params)
    x = normalize_images(images)
    maps = run(nets.encoder, params[common.ENCODER], stats[common.ENCODER], x)["stage4"]
    key_maps = run(nets.encoder, key_params[common.ENCODER], stats[common.ENCODER], x)["stage4"]
    keys = l2_normalize(run(nets.projector, key_params[common.PROJECTOR], stats[common.PROJECTOR],
                            heads.global_pool(key_maps)).astype(jnp.float32))
    head = lambda a: l2_normalize(run(nets.projector, params[common.PROJECTOR],
                                      stats[common.PROJECTOR], heads.global_pool(a))
                                  .astype(jnp.float32))
    return grad_cam(head, maps, jax.lax.stop_gradient(keys),
                         temperature=float(config.loss.temperature), norm="none")
  return jax.jit(cams)


def target_maps(batch) -> np.ndarray:
  """bool [B, H, W]: GT foreground when the batch has it, else saliency > 0.5."""
  if B.SEMANTIC in batch:
    return np.asarray(batch[B.SEMANTIC]) > 0
  for name in ("saliency", B.MASK_PREFIX + "saliency"):
    if name in batch:
      return np.asarray(batch[name]) > THRESHOLD
  raise ValueError("The grounding evaluation needs ground-truth instances or saliency maps in "
                   "the test records (build with --masks=...,gt or --masks=...,saliency).")


def overlay_panels(images, cam_up, target) -> np.ndarray:
  """Image | Grad-CAM heat over the image | target, uint8 rows for TensorBoard."""
  images = visualize.to_uint8(images).astype(np.float32)
  lo, hi = cam_up.min(axis=(1, 2), keepdims=True), cam_up.max(axis=(1, 2), keepdims=True)
  heat = ((cam_up - lo) / np.maximum(hi - lo, 1e-12))[..., None]
  red = np.concatenate([heat, np.zeros_like(heat), 1 - heat], -1) * 255
  blend = (0.5 * images + 0.5 * red + 0.5).astype(np.uint8)
  return visualize.side_by_side(images.astype(np.uint8), blend,
                                np.repeat(target[..., None] * np.uint8(255), 3, -1))


def evaluate(config, train_state, batches) -> dict:
  """Mean grounding IoU over eval `batches` (eval_iterator dicts) for a restored train state.

  Returns {'miou', 'num_images', 'ious' (per image, NaN: empty target),
  'overlays' (uint8 panels of the first images)}.
  """
  cam_fn = make_cam_fn(config)
  ious, overlays = [], None
  for batch in batches:
    images = np.asarray(batch[B.IMAGE])
    target = target_maps(batch)
    cam = cam_fn(train_state["params"], train_state["state"], images)
    pred, up = binarised_cam(np.asarray(cam), images.shape[1])
    ious.append(iou(pred, target))
    if overlays is None:
      overlays = overlay_panels(images[:NUM_OVERLAYS], up[:NUM_OVERLAYS], target[:NUM_OVERLAYS])
  ious = np.concatenate(ious) if ious else np.zeros((0,))
  counted = ious[~np.isnan(ious)]
  return {"miou": float(counted.mean()) if counted.size else float("nan"),
          "num_images": int(counted.size), "ious": [float(v) for v in ious],
          "overlays": overlays}


def write_overlays(tb_dir: str, step: int, overlays: dict) -> None:
  """TensorBoard images 'eval/<name> image | Grad-CAM | target' under tb_dir."""
  if not overlays:
    return
  import tensorflow as tf
  writer = tf.summary.create_file_writer(tb_dir)
  with writer.as_default(step=step):
    for name, panels in overlays.items():
      tf.summary.image(f"eval/{name} image | Grad-CAM | target", panels,
                       max_outputs=len(panels))
  writer.close()
