"""View sampling for two-view pretraining (DetCon appendix A.1).

Split in two so the expensive part is vectorised:
  * per example (inside tf.data map): `sample_view_params` draws every random
    number of a view from a stateless seed, and `crop_flip` applies the
    geometric ops to the image and its mask id map together (same integer
    crop box, same flip; image resized bicubic, ids nearest-neighbour, so the
    same half-pixel sampling grid keeps them aligned);
  * per example, `color_jitter` (random op order, only the chosen op runs);
  * per batch: `photometric` applies grayscale, Gaussian blur and solarize to
    [B, S, S, 3] with per-example parameters, as broadcast ops and one
    depthwise convolution.
All functions are plain TF ops that work eagerly and inside tf.data.

Blur: the paper's 23x23 kernel and sigma in [0.1, 2.0] px are for 224 px
views; both are scaled by image_size / 224 (kernel ~ size // 10, odd) so the
blur keeps its relative strength on small demo views (exactly the paper at 224).
Colour jitter follows torchvision/SimCLR-v2: brightness, contrast and
saturation multiply by a factor in [1 - max, 1 + max] (brightness: the pixels;
contrast: the deviation from the per-channel mean; saturation: from the
grayscale image), hue shifts by up to +-max in HSV. (BYOL's reference code adds
the brightness delta instead; with SimCLR's 0.8 that can turn a whole view
black, which multiplicative factors cannot.)
"""
from __future__ import annotations

import math

import tensorflow as tf

# DetCon appendix A.1: (view T, view T') per framework.
_COMMON = dict(crop_area=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, jitter=0.8,
               gray=0.2, blur_sigma=(0.1, 2.0))
TABLES = {
    "simclr": (dict(_COMMON, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                    blur=1.0, solarize=0.0),
               dict(_COMMON, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                    blur=0.0, solarize=0.0)),
    "byol": (dict(_COMMON, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                  blur=1.0, solarize=0.0),
             dict(_COMMON, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                  blur=0.1, solarize=0.2)),
}
JITTER_KEYS = ("jitter", "brightness", "contrast", "saturation", "hue", "order")
PHOTOMETRIC_KEYS = ("gray", "blur", "sigma", "solarize")


def tables(augment: str):
  if augment not in TABLES:
    raise ValueError(f"Unknown augment={augment!r}; choose one of {sorted(TABLES)} "
                     "(config.data.augment).")
  return TABLES[augment]


def _uniform(seed, lo=0.0, hi=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=tf.float32)


def crop_box(seed, height, width, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
  """Random resized crop box (y, x, h, w) as int32: area fraction uniform, aspect log-uniform.

  Ten candidates are drawn at once and the first that fits is used; if none
  fits, the whole image (torchvision's fallback for in-range aspect ratios).
  """
  s = tf.random.experimental.stateless_split(seed, 3)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target = hf * wf * _uniform(s[0], area[0], area[1], [attempts])
  r = tf.exp(_uniform(s[1], math.log(ratio[0]), math.log(ratio[1]), [attempts]))
  cw, ch = tf.round(tf.sqrt(target * r)), tf.round(tf.sqrt(target / r))
  ok = (cw <= wf) & (ch <= hf) & (cw >= 1) & (ch >= 1)
  first = tf.argmax(tf.cast(ok, tf.int32))
  found = tf.reduce_any(ok)
  cw = tf.where(found, cw[first], wf)
  ch = tf.where(found, ch[first], hf)
  u = _uniform(s[2], shape=[2])
  y = tf.floor(u[0] * (hf - ch + 1))
  x = tf.floor(u[1] * (wf - cw + 1))
  return tf.cast(tf.stack([y, x, ch, cw]), tf.int32)


def sample_view_params(seed, height, width, table: dict, image_size: int) -> dict:
  """Every random choice of one view, from a stateless seed ([2] int)."""
  s = tf.random.experimental.stateless_split(seed, 12)
  sig_scale = image_size / 224.0
  return dict(
      box=crop_box(s[0], height, width, table["crop_area"], table["crop_ratio"]),
      flip=_uniform(s[1]) < table["flip"],
      jitter=_uniform(s[2]) < table["jitter"],
      brightness=_uniform(s[3], 1 - table["brightness"], 1 + table["brightness"]),
      contrast=_uniform(s[4], 1 - table["contrast"], 1 + table["contrast"]),
      saturation=_uniform(s[5], 1 - table["saturation"], 1 + table["saturation"]),
      hue=_uniform(s[6], -table["hue"], table["hue"]),
      order=tf.cast(tf.argsort(_uniform(s[7], shape=[4])), tf.int32),
      gray=_uniform(s[8]) < table["gray"],
      blur=_uniform(s[9]) < table["blur"],
      sigma=_uniform(s[10], *table["blur_sigma"]) * sig_scale,
      solarize=_uniform(s[11]) < table["solarize"],
  )


def crop_flip(image, id_map, box, flip, size: int):
  """Crop image [H,W,3] float and id_map [H,W] int with one box, resize to size, flip both.

  Returns (view float32 [S,S,3] in [0,1], ids int32 [S,S]). Ids go through
  float32 (exact up to 2^24) and nearest-neighbour resizing, so they never mix.
  """
  y, x, h, w = box[0], box[1], box[2], box[3]
  ids = tf.image.resize(tf.cast(id_map[y:y + h, x:x + w, None], tf.float32), [size, size],
                        method="nearest")
  ids = tf.cast(ids[..., 0], tf.int32)
  ids = tf.where(flip, tf.reverse(ids, [1]), ids)
  return crop_flip_image(image, box, flip, size), ids


def crop_flip_image(image, box, flip, size: int):
  """The image half of crop_flip (bicubic, antialiased, clipped to [0, 1])."""
  y, x, h, w = box[0], box[1], box[2], box[3]
  img = tf.image.resize(image[y:y + h, x:x + w], [size, size], method="bicubic",
                        antialias=True)
  img = tf.clip_by_value(img, 0.0, 1.0)
  return tf.where(flip, tf.reverse(img, [1]), img)


def _b(v):
  """Per-example scalar [B] -> [B,1,1,1] for broadcasting over images."""
  return tf.reshape(v, [-1, 1, 1, 1])


def _gray(x):
  return tf.image.rgb_to_grayscale(x)          # [..., 1]


def _jitter_op(x, k, p):
  """Colour op k (0 brightness, 1 contrast, 2 saturation, 3 hue) on [B,S,S,3]."""
  if k == 0:
    y = x * _b(p["brightness"])
  elif k == 1:
    m = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    y = (x - m) * _b(p["contrast"]) + m
  elif k == 2:
    g = _gray(x)
    y = g + (x - g) * _b(p["saturation"])
  else:
    hsv = tf.image.rgb_to_hsv(x)
    h = tf.math.floormod(hsv[..., :1] + _b(p["hue"]), 1.0)
    y = tf.image.hsv_to_rgb(tf.concat([h, hsv[..., 1:]], -1))
  return tf.clip_by_value(y, 0.0, 1.0)


def _blur(x, sigma, image_size: int):
  """Separable Gaussian blur with a per-example sigma: one depthwise conv over B*3 channels."""
  radius = max(1, (image_size // 10) // 2)        # 224 -> 23x23 kernel
  b, h, w = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2]
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  k = tf.exp(-tf.square(t)[None, :] / (2.0 * tf.square(sigma[:, None])))
  k = k / tf.reduce_sum(k, axis=1, keepdims=True)                     # [B, K]
  k = tf.repeat(k, 3, axis=0)                                         # [B*3, K]
  kh = tf.transpose(k)[None, :, :, None]                              # [1, K, B*3, 1]
  kv = tf.transpose(k)[:, None, :, None]                              # [K, 1, B*3, 1]
  y = tf.reshape(tf.transpose(x, [1, 2, 0, 3]), [1, h, w, b * 3])
  pad = [[0, 0], [0, 0], [radius, radius], [0, 0]]
  y = tf.nn.depthwise_conv2d(tf.pad(y, pad, "REFLECT"), kh, [1, 1, 1, 1], "VALID")
  pad = [[0, 0], [radius, radius], [0, 0], [0, 0]]
  y = tf.nn.depthwise_conv2d(tf.pad(y, pad, "REFLECT"), kv, [1, 1, 1, 1], "VALID")
  return tf.transpose(tf.reshape(y, [h, w, b, 3]), [2, 0, 1, 3])


def color_jitter(x, p: dict):
  """Brightness, contrast, saturation, hue in the example's random order, one image [S,S,3].

  Runs per example inside the tf.data map: tf.switch_case executes only the op
  each stage names, which is ~4x cheaper than computing all four on a batch
  and selecting (the HSV round trip of hue dominates).
  """
  def stage(y, k):
    return tf.switch_case(p["order"][k], [lambda j=j: _jitter_op(y[None], j, p)[0]
                                          for j in range(4)])

  def run():
    y = x
    for k in range(4):
      y = stage(y, k)
    return y

  return tf.cond(p["jitter"], run, lambda: x)


def photometric(x, p: dict, image_size: int):
  """Grayscale, Gaussian blur and solarize on a batch [B,S,S,3], per-example parameters.

  p holds per-example [B] booleans/sigmas from sample_view_params; colour
  jitter has already been applied per example by color_jitter.
  """
  x = tf.where(_b(p["gray"]), tf.broadcast_to(_gray(x), tf.shape(x)), x)
  x = tf.where(_b(p["blur"]), _blur(x, p["sigma"], image_size), x)
  x = tf.where(_b(p["solarize"]), tf.where(x < 0.5, x, 1.0 - x), x)
  return tf.clip_by_value(x, 0.0, 1.0)
