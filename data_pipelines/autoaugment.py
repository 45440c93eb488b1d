"""AutoAugment's ImageNet policy (Cubuk et al. 2019) in TensorFlow ops, for tf.data.

A+ (Van Gansbeke et al. 2021, section 4.2) gives each positive view either
the standard augmentations or this policy, at random with p = 0.5. The
authors' code applies torchvision's AutoAugment (its ImageNet policy and
magnitude bins) to PIL images after the random resized crop and flip; here
the same policy, bins, signs and PIL semantics are written as TF ops on one
float image [S, S, 3] in [0, 1], inside the tf.data map (no torchvision).

PIL works on 8-bit pixels: every op quantises its input to the 8-bit grid
(k / 255) and returns values on that grid with PIL's integer rounding, so the
results equal PIL's pixel for pixel (tests/test_multicrop_aplus.py compares
each op with PIL 12, eagerly and inside tf.data).
Geometric ops (Rotate, ShearX) move the image only, with nearest sampling
and black fill (torchvision's defaults); views that carry dense fields are
refused by sample_view_params, since their masks would not follow.
"""
from __future__ import annotations

import math

import tensorflow as tf

# The ImageNet policy: 25 sub-policies of two (op, probability, magnitude bin).
POLICY = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)
BINS = 10


def _linspace(lo, hi):
  return tuple(lo + (hi - lo) * i / (BINS - 1) for i in range(BINS))


# op -> (magnitude per bin, signed): torchvision's bins (a signed magnitude is
# negated with probability 1/2).
MAGNITUDES = {
    "ShearX": (_linspace(0.0, 0.3), True),
    "Rotate": (_linspace(0.0, 30.0), True),
    "Color": (_linspace(0.0, 0.9), True),
    "Contrast": (_linspace(0.0, 0.9), True),
    "Sharpness": (_linspace(0.0, 0.9), True),
    "Posterize": ((8, 8, 7, 7, 6, 6, 5, 5, 4, 4), False),
    "Solarize": (_linspace(256.0, 0.0), False),
    "AutoContrast": (None, False),
    "Equalize": (None, False),
    "Invert": (None, False),
}


def _u8(x):
  """[0, 1] float -> float values 0..255 on the 8-bit grid (PIL's pixels)."""
  return tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0)


def _out(v):
  return tf.clip_by_value(tf.round(v), 0.0, 255.0) / 255.0


def _gray(v):
  """PIL's 'L' conversion (ITU-R 601-2 luma in 16-bit fixed point, rounded), [S, S, 1]."""
  return tf.floor((v[..., :1] * 19595.0 + v[..., 1:2] * 38470.0 + v[..., 2:] * 7471.0
                   + 32768.0) / 65536.0)


def _blend(degenerate, v, factor):
  """PIL ImageEnhance (Image.blend): degenerate + factor * (image - degenerate), clipped
  and truncated to 8 bits."""
  return tf.clip_by_value(tf.floor(degenerate + factor * (v - degenerate)), 0.0, 255.0) / 255.0


def posterize(x, bits):
  """Keep the top `bits` bits of each 8-bit channel."""
  v = tf.cast(_u8(x), tf.int32)
  shift = 8 - tf.cast(bits, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(v, shift), shift),
                 tf.float32) / 255.0


def solarize(x, threshold):
  """Invert every 8-bit value >= threshold (on 0..256)."""
  v = _u8(x)
  return _out(tf.where(v >= threshold, 255.0 - v, v))


def invert(x, _=None):
  return _out(255.0 - _u8(x))


def autocontrast(x, _=None):
  """Stretch each channel's [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
  v = _u8(x)
  lo = tf.reduce_min(v, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(v, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.clip_by_value(tf.floor((v - lo) * scale), 0.0, 255.0)
  return tf.where(hi > lo, stretched, v) / 255.0


def _equalize_channel(c):
  """PIL ImageOps.equalize on one channel of 0..255 floats."""
  ci = tf.cast(c, tf.int32)
  hist = tf.math.bincount(tf.reshape(ci, [-1]), minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(ci))            # count of the top grey level present
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (step // 2 + tf.cumsum(hist, exclusive=True)) // tf.maximum(step, 1)
  lut = tf.cast(tf.minimum(lut, 255), tf.float32)
  return tf.where(step > 0, tf.gather(lut, ci), c)


def equalize(x, _=None):
  v = _u8(x)
  return tf.stack([_equalize_channel(v[..., i]) for i in range(3)], axis=-1) / 255.0


def color(x, factor):
  """Saturation: blend with the grey image (PIL ImageEnhance.Color)."""
  v = _u8(x)
  return _blend(_gray(v), v, factor)


def contrast(x, factor):
  """Blend with the mean grey level (PIL ImageEnhance.Contrast)."""
  v = _u8(x)
  mean = tf.floor(tf.reduce_mean(_gray(v)) + 0.5)
  return _blend(mean, v, factor)


def sharpness(x, factor):
  """Blend with PIL's SMOOTH-filtered image, whose border pixels stay unfiltered."""
  v = _u8(x)
  k = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.round(tf.nn.depthwise_conv2d(v[None], k, [1, 1, 1, 1], "VALID")[0])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(v)[0], tf.shape(v)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2, 1]), [[1, 1], [1, 1], [0, 0]]) > 0
  return _blend(tf.where(inner, smooth, v), v, factor)


def _affine(x, inverse):
  """Sample x at inverse(output pixel centre) about the image centre; nearest, black fill.

  inverse: 2x2 matrix (tensor) mapping output offsets (dx, dy) from the centre
  to input offsets, as PIL's Image.transform(AFFINE) with torchvision's centre.
  """
  h, w = tf.cast(tf.shape(x)[0], tf.float32), tf.cast(tf.shape(x)[1], tf.float32)
  cx, cy = w * 0.5, h * 0.5
  a, b, c, d = inverse[0][0], inverse[0][1], inverse[1][0], inverse[1][1]
  # Output pixel (i, j) has its centre at (j + 0.5, i + 0.5); PIL samples the
  # input pixel whose area holds the mapped centre. ImageProjectiveTransformV3
  # maps integer output coordinates to input ones with the same convention
  # when both are shifted by 0.5.
  ox, oy = cx - 0.5, cy - 0.5
  transform = tf.stack([a, b, ox - a * ox - b * oy, c, d, oy - c * ox - d * oy, 0.0, 0.0])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=transform[None], output_shape=tf.shape(x)[:2],
      fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def rotate(x, degrees):
  """Counter-clockwise rotation by `degrees` about the centre (PIL Image.rotate)."""
  t = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(t), tf.sin(t)
  return _affine(_u8(x) / 255.0, [[cos, -sin], [sin, cos]])


def shear_x(x, magnitude):
  """torchvision's ShearX: shear angle degrees(magnitude), i.e. x_in = x + tan(m) * y."""
  m = tf.tan(tf.cast(magnitude, tf.float32))
  return _affine(_u8(x) / 255.0, [[tf.constant(1.0), m], [tf.constant(0.0), tf.constant(1.0)]])


OPS = {
    "ShearX": shear_x, "Rotate": rotate, "Color": lambda x, m: color(x, 1.0 + m),
    "Contrast": lambda x, m: contrast(x, 1.0 + m),
    "Sharpness": lambda x, m: sharpness(x, 1.0 + m), "Posterize": posterize,
    "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert,
}
OP_NAMES = tuple(OPS)


def _policy_tables():
  """[25, 2] op index, probability, unsigned magnitude, signed flag."""
  ops, probs, mags, signed = [], [], [], []
  for sub in POLICY:
    for name, p, level in sub:
      values, sign = MAGNITUDES[name]
      ops.append(OP_NAMES.index(name))
      probs.append(p)
      mags.append(float(values[level]) if values is not None and level is not None else 0.0)
      signed.append(sign)
  shape = [len(POLICY), 2]
  return (tf.reshape(tf.constant(ops, tf.int32), shape),
          tf.reshape(tf.constant(probs, tf.float32), shape),
          tf.reshape(tf.constant(mags, tf.float32), shape),
          tf.reshape(tf.constant(signed, tf.bool), shape))


def sample_params(seed) -> dict:
  """One draw of the policy: sub-policy, per-stage apply draw and sign (torchvision's)."""
  s = tf.random.experimental.stateless_split(seed, 3)
  return {"aa_policy": tf.random.stateless_uniform([], s[0], 0, len(POLICY), dtype=tf.int32),
          "aa_apply": tf.random.stateless_uniform([2], s[1]),
          "aa_negate": tf.random.stateless_uniform([2], s[2]) < 0.5}


def apply_op(x, op_index, magnitude):
  """Op number op_index (OP_NAMES) with a (tensor) magnitude; only that op runs."""
  return tf.switch_case(op_index, [lambda f=OPS[n]: f(x, magnitude) for n in OP_NAMES])


def autoaugment(x, p: dict):
  """The ImageNet policy on one image [S, S, 3] in [0, 1] with draws p (sample_params)."""
  ops, probs, mags, signed = _policy_tables()
  i = p["aa_policy"]
  y = x
  for stage in range(2):
    magnitude = tf.where(signed[i, stage] & p["aa_negate"][stage], -mags[i, stage],
                         mags[i, stage])
    y = tf.cond(p["aa_apply"][stage] <= probs[i, stage],
                lambda y=y, m=magnitude: apply_op(y, ops[i, stage], m), lambda y=y: y)
  return y
