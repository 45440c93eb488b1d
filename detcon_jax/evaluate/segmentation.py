"""Dense transfer metrics and the dense linear probe (`--evals=seg_linear`).

mIoU: per-class IoU = TP / (TP + FP + FN) from a pixel confusion matrix over
the num_classes + 1 semantic classes (0 = background, class c = c + 1, the
eval reader's semantic map); pixels whose ground truth is IGNORE (VOC's 255:
object borders, padding of augmented crops) count nowhere; a class neither
present nor predicted is NaN and left out of the mean.

seg_linear (a frozen-backbone probe of dense features, BN statistics frozen):
a 1x1 convolution (a linear map per position, with bias) on the dilated
last-stage features -- the map retrieval uses (models/resnet.py dilate_last) --
its logits bilinearly upsampled to the label map, softmax cross-entropy
ignoring IGNORE, trained with Adam and a cosine-decayed rate for a few epochs
(EPOCHS: the train loss has flattened by then on the demo). The features are
standardised per channel with train statistics first (an affine map the 1x1
conv could absorb; it only makes one learning rate fit every backbone).

Training scores PIXELS random label-map pixels per image and step instead of
all of them: the 1x1 conv commutes with bilinear upsampling, so the logit of a
pixel is the conv of the bilinearly interpolated feature there (`bilinear_at`,
equal to jax.image.resize's upsampling), and the sampled loss is an unbiased
estimate of the full-map loss at a fraction of the cost (the demo: 512 of
9216 pixels; the full-map loss made the probe 20x slower). Test predictions
upsample whole logit maps.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import batch as B
from detcon_jax.evaluate import retrieval

IGNORE = B.IGNORE_LABEL   # ground-truth pixels that are scored nowhere
EPOCHS = 10
BATCH_SIZE = 32
LEARNING_RATE = 0.01
PIXELS = 512          # label-map pixels scored per image and training step


def confusion_matrix(gt, pred, num_semantic: int, ignore: int = IGNORE) -> np.ndarray:
  """[num_semantic, num_semantic] pixel counts (rows = ground truth); ignore pixels dropped."""
  gt, pred = np.asarray(gt), np.asarray(pred)
  keep = gt != ignore
  return retrieval.confusion_matrix(gt[keep], pred[keep], num_semantic)


def miou(gt, pred, num_semantic: int, ignore: int = IGNORE) -> dict:
  """{'miou', 'per_class_iou'} of predicted maps against ground-truth maps (same shape)."""
  iou = retrieval.iou_from_confusion(confusion_matrix(gt, pred, num_semantic, ignore))
  return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
          "per_class_iou": iou.tolist()}


def check_labels(semantic, num_semantic: int, name: str) -> None:
  sem = np.asarray(semantic)
  bad = (sem != IGNORE) & ((sem < 0) | (sem >= num_semantic))
  if bad.any():
    raise ValueError(f"{name} semantic maps hold ids outside [0, {num_semantic}) other than "
                     f"the ignore label {IGNORE}.")


def upsampled_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
  """[B, h, w, K] -> [B, *size, K], bilinear (half-pixel centres)."""
  if logits.shape[1:3] == tuple(size):
    return logits
  return jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), "bilinear")


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore: int = IGNORE) -> jax.Array:
  """Mean softmax cross-entropy over the pixels whose label is not `ignore`."""
  valid = labels != ignore
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  return jnp.sum(losses * valid) / jnp.maximum(valid.sum(), 1)


def bilinear_at(features: jax.Array, rows: jax.Array, cols: jax.Array,
                size: tuple[int, int]) -> jax.Array:
  """Features [B, h, w, C] bilinearly upsampled to `size` (half-pixel centres, edges
  clamped, as jax.image.resize), read only at pixels (rows, cols) [B, P] -> [B, P, C]."""
  b, h, w, c = features.shape

  def axis(pos, n, size):
    src = jnp.clip((pos.astype(jnp.float32) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = jnp.floor(src).astype(jnp.int32)
    return lo, jnp.minimum(lo + 1, n - 1), src - lo

  y0, y1, wy = axis(rows, h, size[0])
  x0, x1, wx = axis(cols, w, size[1])
  flat = features.reshape(b, h * w, c)
  at = lambda y, x: jnp.take_along_axis(flat, (y * w + x)[..., None], axis=1)
  wy, wx = wy[..., None], wx[..., None]
  return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x1))
          + wy * ((1 - wx) * at(y1, x0) + wx * at(y1, x1)))


def _linear_logits(params, features):
  return jnp.einsum("b...c,ck->b...k", features, params["w"]) + params["b"]


@functools.partial(jax.jit, static_argnames=("optimizer", "size"))
def _linear_step(params, opt_state, features, rows, cols, labels, *, optimizer, size):
  points = bilinear_at(features, rows, cols, size)                 # [B, P, C]

  def loss_fn(p):
    return cross_entropy(_linear_logits(p, points), labels)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("size",))
def _linear_predict(params, features, *, size):
  return jnp.argmax(upsampled_logits(_linear_logits(params, features), size), -1).astype(
      jnp.int32)


def linear_segmentation(train_spatial, train_semantic, test_spatial, test_semantic, *,
                        num_classes: int, epochs: int = EPOCHS, batch_size: int = BATCH_SIZE,
                        learning_rate: float = LEARNING_RATE, pixels: int = PIXELS,
                        seed: int = 0) -> dict:
  """mIoU, per-class IoU, final train loss and test predictions of a 1x1-conv probe.

  `*_spatial` [N, h, w, C] frozen feature maps; `*_semantic` [N, S, S'] label maps
  (0 = background, c + 1 = class c, IGNORE = unscored).
  """
  num_semantic = num_classes + 1
  check_labels(train_semantic, num_semantic, "train")
  check_labels(test_semantic, num_semantic, "test")
  train_x = np.asarray(train_spatial, np.float32)
  mean = train_x.mean((0, 1, 2))
  std = train_x.std((0, 1, 2)) + 1e-6
  norm = lambda x: (np.asarray(x, np.float32) - mean) / std
  train_x = norm(train_x)
  size = tuple(train_semantic.shape[1:3])
  n, c = len(train_x), train_x.shape[-1]
  batch_size = min(batch_size, n)
  steps_per_epoch = max(1, n // batch_size)
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
  params = {"w": jnp.zeros((c, num_semantic), jnp.float32),
            "b": jnp.zeros((num_semantic,), jnp.float32)}
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  train_y = np.asarray(train_semantic, np.int32)
  losses = []
  for _ in range(epochs):
    order = rng.permutation(n)
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      rows = rng.integers(0, size[0], (len(idx), pixels))
      cols = rng.integers(0, size[1], (len(idx), pixels))
      labels = train_y[idx[:, None], rows, cols]
      params, opt_state, loss = _linear_step(params, opt_state, train_x[idx], rows, cols,
                                             labels, optimizer=optimizer, size=size)
      losses.append(loss)
  test_size = tuple(test_semantic.shape[1:3])
  predictions = np.concatenate([
      np.asarray(_linear_predict(params, norm(test_spatial[i:i + 256]), size=test_size))
      for i in range(0, len(test_spatial), 256)])
  h, w = train_x.shape[1:3]
  by_epoch = np.asarray(jax.device_get(losses)).reshape(epochs, steps_per_epoch).mean(1)
  return {**miou(test_semantic, predictions, num_semantic), "predictions": predictions,
          "train_loss": float(by_epoch[-1]), "train_loss_by_epoch": by_epoch.tolist(),
          "probe": (f"1x1 conv on {h}x{w}x{c} features -> {size[0]}x{size[1]}, {epochs} epochs, "
                    f"{pixels} pixels per image and step")}
