"""View sampling as keyed ops: geometric ops move the image, every dense field and boxes together.

A view's data is a dict of fields:
  'image'        [H, W, 3] float32 in [0, 1]
  dense fields   [H, W] or [H, W, C], resampled as RESAMPLE says: 'masks'
                 (mask-id map; ids go through float32, exact up to 2^24, and
                 nearest-neighbour, so they never mix), 'saliency' and
                 'background' (bilinear, antialiased)
  'boxes'        [N, 4] float32 pixel coordinates (y0, x0, y1, x1); pixel i
                 spans [i, i + 1)
  'boxes_valid'  [N] bool, added by the first op that sees boxes: a box cut
                 to nothing by a crop is flagged False (its clipped
                 coordinates have zero area), never dropped or left stale
Geometric ops (`crop`, `resize`, `flip`, `resized_crop`, and the view recipe
`geometric`) take and return such a dict; one call applies the same box and
flip to every field, and all resizes of a view share the half-pixel sampling
grid, so image, ids and boxes stay aligned. Photometric ops act on images
only and take the image tensor.

The work is split so the expensive part is vectorised:
  * per example (inside the tf.data map): `sample_view_params` draws every
    random number of a view from a stateless seed; `geometric` crops,
    resizes and flips; `color_jitter` runs in the example's random op order
    (only the chosen op runs);
  * per batch: `photometric` applies grayscale, Gaussian blur and solarize to
    [B, S, S, 3] with per-example parameters, as broadcast ops and one
    depthwise convolution.
All functions are plain TF ops that work eagerly and inside tf.data.

Tables (TABLES) hold one view's photometric and flip settings; the crop area
range comes from the view spec (data_pipelines/views.py), its one source.
DetCon appendix A.1 gives the pairs simclr1/2 and byol1/2; 'moco_v2' is MoCo
v2 (Chen et al. 2020, "Improved baselines"), 'swav' SwAV's colour distortion
of strength 1 (Caron et al. 2020).

Blur: the paper's 23x23 kernel and sigma in [0.1, 2.0] px are for 224 px
views; both are scaled by the view's size / 224 (kernel ~ size // 10, odd) so
the blur keeps its relative strength on small views (exactly the paper at 224).
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

from data_pipelines import autoaugment

IMAGE, BOXES, BOXES_VALID = "image", "boxes", "boxes_valid"

_COMMON = dict(crop_ratio=(3 / 4, 4 / 3), flip=0.5, jitter=0.8, gray=0.2, blur_sigma=(0.1, 2.0))
_SIMCLR = dict(_COMMON, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, solarize=0.0)
_BYOL = dict(_COMMON, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
TABLES = {
    "simclr1": dict(_SIMCLR, blur=1.0),                      # DetCon A.1, SimCLR T
    "simclr2": dict(_SIMCLR, blur=0.0),                      # DetCon A.1, SimCLR T'
    "byol1": dict(_BYOL, blur=1.0, solarize=0.0),            # DetCon A.1, BYOL T
    "byol2": dict(_BYOL, blur=0.1, solarize=0.2),            # DetCon A.1, BYOL T'
    "moco_v2": dict(_COMMON, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                    blur=0.5, solarize=0.0),
    "swav": dict(_COMMON, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                 blur=0.5, solarize=0.0),
}
# The supervised baseline: ImageNet training's random-resized crop + flip, no colour.
TABLES["supervised"] = dict(_COMMON, jitter=0.0, gray=0.0, blur=0.0, solarize=0.0,
                            brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
# A+ (Van Gansbeke et al. 2021, 4.2): with probability auto_augment a view gets flip +
# AutoAugment's ImageNet policy (data_pipelines/autoaugment.py) instead of the table's
# colour jitter, grayscale, blur and solarize.
TABLES["moco_v2_aplus"] = dict(TABLES["moco_v2"], auto_augment=0.5)
JITTER_KEYS = ("jitter", "brightness", "contrast", "saturation", "hue", "order")
PHOTOMETRIC_KEYS = ("gray", "blur", "sigma", "solarize")


def table(name: str) -> dict:
  """The augmentation table a view spec names (ViewSpec.augment)."""
  if name not in TABLES:
    raise ValueError(f"Unknown augmentation table {name!r}; choose one of {sorted(TABLES)} "
                     "(ViewSpec.augment; data_pipelines.views.AUGMENT_PAIRS names them per "
                     "config.data.augment).")
  return TABLES[name]


# --- Dense fields: how each is resampled --------------------------------------

def _resample(x, size: int, method: str, antialias: bool):
  """tf.image.resize to [size, size] for [H, W] or [H, W, C] fields."""
  flat = x.shape.rank == 2
  y = tf.image.resize(x[..., None] if flat else x, [size, size], method=method,
                      antialias=antialias)
  return y[..., 0] if flat else y


def _resize_image(x, size):
  # Bicubic overshoots at edges; clipping keeps images in [0, 1].
  return tf.clip_by_value(_resample(x, size, "bicubic", True), 0.0, 1.0)


def _resize_ids(x, size):
  return tf.cast(_resample(tf.cast(x, tf.float32), size, "nearest", False), x.dtype)


def _resize_smooth(x, size):
  return _resample(x, size, "bilinear", True)


RESAMPLE = {
    IMAGE: _resize_image,          # bicubic, antialiased, clipped to [0, 1]
    "masks": _resize_ids,          # nearest via float32: ids never mix
    "saliency": _resize_smooth,    # bilinear, antialiased
    "background": _resize_smooth,  # tiled background image: bilinear, antialiased
}


def _dense(data: dict) -> list[str]:
  """Names of the dense fields in data; unknown names are an error, not ignored."""
  unknown = [k for k in data if k not in RESAMPLE and k not in (BOXES, BOXES_VALID)]
  if unknown:
    raise ValueError(f"Unknown fields {unknown}; augment ops know {sorted(RESAMPLE)} "
                     f"and {BOXES!r} (add a resampling rule to augment.RESAMPLE).")
  if IMAGE not in data:
    raise ValueError(f"Augment ops need an {IMAGE!r} field; got {sorted(data)}.")
  return [k for k in data if k in RESAMPLE]


def _hw(data: dict):
  """(height, width) of the view, checking that every dense field has it."""
  shape = tf.shape(data[IMAGE])[:2]
  for k in _dense(data):
    tf.debugging.assert_equal(tf.shape(data[k])[:2], shape,
                              message=f"field {k!r} and the image differ in size")
  return shape[0], shape[1]


def _boxes(data: dict):
  """(boxes float32 [N, 4], valid bool [N]) or (None, None) without boxes."""
  if BOXES not in data:
    return None, None
  b = tf.cast(data[BOXES], tf.float32)
  valid = data.get(BOXES_VALID, tf.ones(tf.shape(b)[:1], tf.bool))
  return b, valid


# --- Geometric ops ------------------------------------------------------------

def crop(data: dict, box) -> dict:
  """Cut box (y, x, h, w) int32 out of every dense field; shift boxes and clip them to it.

  A box with nothing left inside the crop is flagged invalid (boxes_valid).
  """
  _hw(data)
  y, x, h, w = box[0], box[1], box[2], box[3]
  out = {k: data[k][y:y + h, x:x + w] for k in _dense(data)}
  b, valid = _boxes(data)
  if b is not None:
    f = tf.cast(tf.stack([y, x, y, x]), tf.float32)
    hi = tf.cast(tf.stack([h, w, h, w]), tf.float32)
    b = tf.clip_by_value(b - f, 0.0, hi)
    out[BOXES] = b
    out[BOXES_VALID] = valid & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  return out


def resize(data: dict, size: int) -> dict:
  """Resize every dense field to [size, size] by its RESAMPLE rule; scale boxes with it."""
  h, w = _hw(data)
  out = {k: RESAMPLE[k](data[k], size) for k in _dense(data)}
  b, valid = _boxes(data)
  if b is not None:
    scale = tf.cast(size, tf.float32) / tf.cast(tf.stack([h, w, h, w]), tf.float32)
    out[BOXES], out[BOXES_VALID] = b * scale, valid
  return out


def flip(data: dict, do_flip) -> dict:
  """Mirror every dense field left-right when do_flip (a scalar bool); boxes with them."""
  _, w = _hw(data)
  # tf.cond, not tf.where: reverse only the views that flip (same numbers, ~10% less CPU
  # for DetCon's views: benchmarks/input_pipeline.py --source=jpeg)
  out = {k: tf.cond(do_flip, lambda v=data[k]: tf.reverse(v, [1]), lambda v=data[k]: v)
         for k in _dense(data)}
  b, valid = _boxes(data)
  if b is not None:
    wf = tf.cast(w, tf.float32)
    mirrored = tf.stack([b[:, 0], wf - b[:, 3], b[:, 2], wf - b[:, 1]], axis=1)
    out[BOXES], out[BOXES_VALID] = tf.where(do_flip, mirrored, b), valid
  return out


def resized_crop(data: dict, box, size: int) -> dict:
  """crop then resize: the random-resized-crop of every field with one box."""
  return resize(crop(data, box), size)


def geometric(data: dict, p: dict, size: int) -> dict:
  """A view's geometric recipe with its sampled params p: resized crop, then flip."""
  return flip(resized_crop(data, p["box"], size), p["flip"])


# --- Random draws -------------------------------------------------------------

def _uniform(seed, lo=0.0, hi=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, lo, hi, dtype=tf.float32)


def first_accepted(candidates, ok, fallback):
  """(candidate, fell_back): the first of candidates [n, ...] whose ok [n] holds, else
  fallback (a candidate's shape): every "first accepted of n draws" rule of the crops."""
  found = tf.reduce_any(ok)
  first = tf.gather(candidates, tf.argmax(tf.cast(ok, tf.int32)))
  return tf.where(found, first, fallback), tf.logical_not(found)


def fits(ch, cw, hf, wf):
  """Predicate: crop sides (ch, cw) [n] lie inside an hf x wf image and are at least 1 px."""
  return (cw <= wf) & (ch <= hf) & (cw >= 1) & (ch >= 1)


def _candidates(area_key, ratio_key, hf, wf, area, ratio, n):
  """n random-resized-crop sizes: (target area, height, width, fits), float32 [n] each."""
  target = hf * wf * _uniform(area_key, area[0], area[1], [n])
  r = tf.exp(_uniform(ratio_key, math.log(ratio[0]), math.log(ratio[1]), [n]))
  cw, ch = tf.round(tf.sqrt(target * r)), tf.round(tf.sqrt(target / r))
  return target, ch, cw, fits(ch, cw, hf, wf)


def crop_box(seed, height, width, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
  """Random resized crop box (y, x, h, w) as int32: area fraction uniform, aspect log-uniform.

  Ten candidates are drawn at once and the first that fits is used; if none
  fits, the whole image (torchvision's fallback for in-range aspect ratios).
  """
  s = tf.random.experimental.stateless_split(seed, 3)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  _, ch, cw, ok = _candidates(s[0], s[1], hf, wf, area, ratio, attempts)
  size, _ = first_accepted(tf.stack([ch, cw], 1), ok, tf.stack([hf, wf]))
  ch, cw = size[0], size[1]
  u = _uniform(s[2], shape=[2])
  y = tf.floor(u[0] * (hf - ch + 1))
  x = tf.floor(u[1] * (wf - cw + 1))
  return tf.cast(tf.stack([y, x, ch, cw]), tf.int32)


SALIENT = 0.5    # default: saliency above this is salient (the CAST reference: > 128 of 255)
CENTRE_CROP = 224 / 256  # the background paper's CenterCrop (C.6): 224 px of a 256 px side


def centre_crop_box(height, width, fraction=CENTRE_CROP):
  """The centred square of side fraction x the shorter side, (y, x, h, w) int32: the
  paper's Resize(256) + CenterCrop(224) view, at any image size."""
  side = tf.maximum(1, tf.cast(tf.round(fraction * tf.cast(tf.minimum(height, width),
                                                           tf.float32)), tf.int32))
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def salient_crop_box(seed, saliency, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), phi=0.2,
                     tries=10, threshold=SALIENT, rule="adaptive"):
  """(box, fell_back): a crop_box that covers >= phi of the salient area (CAST, sec. 3.1;
  rule='adaptive', the default; the background paper's FGmin with rule='fg_min').

  saliency [H, W] in [0, 1], salient where > threshold. Up to `tries` crop_box
  draws, the first with seed itself (so phi = 0 gives crop_box(seed) exactly)
  and the rest with fold_in(seed, t); the first whose salient pixels reach
  phi x the image's is kept. As the reference, phi is lowered to
  area[0] x image / salient area when even a smallest crop lying inside the
  salient region could not reach it. An image without salient pixels takes the
  first draw. If no draw qualifies: the whole image, and fell_back is True.
  (The released CAST code draws crop centres from a wide Gaussian around the
  saliency centroid and falls back to a random box around the salient bounding
  box; uniform positions keep phi = 0 the plain crop.)
  rule='fg_min' is Ryali et al. 2021 (A.1, C.6: "RRC parameters were sampled up to 10
  times ..., defaulting to a CenterCrop"): the same draws (each a whole RRC
  sample), phi as given (never lowered), and on failure centre_crop_box (the
  paper's CenterCrop view, which need not hold phi of the foreground) instead of
  the whole image.
  """
  if rule not in ("adaptive", "fg_min"):   # views.SALIENT_RULES
    raise ValueError(f"salient_crop_box: rule {rule!r}: choose 'adaptive' or 'fg_min'.")
  h, w = tf.shape(saliency)[0], tf.shape(saliency)[1]
  salient = tf.cast(saliency > threshold, tf.float32)
  total = tf.reduce_sum(salient)
  pixels = tf.cast(h * w, tf.float32)
  phi = float(phi) if rule == "fg_min" else tf.minimum(
      float(phi), area[0] * pixels / tf.maximum(total, 1.0))
  seeds = [seed] + [tf.random.experimental.stateless_fold_in(seed, t) for t in range(1, tries)]
  boxes = tf.stack([crop_box(s, h, w, area, ratio) for s in seeds])        # [tries, 4]
  fallback = centre_crop_box(h, w) if rule == "fg_min" else tf.stack([0, 0, h, w])
  return first_accepted(boxes, covers_salient(boxes, salient, phi), fallback)


def covers_salient(boxes, salient, phi):
  """Predicate: boxes (y, x, h, w) int32 [n, 4] holding >= phi of the salient pixels of
  salient [H, W] (float32 {0, 1}); every box qualifies when nothing is salient."""
  total = tf.reduce_sum(salient)
  table = tf.pad(tf.cumsum(tf.cumsum(salient, 0), 1), [[1, 0], [1, 0]])  # summed-area table
  y, x, bh, bw = tf.unstack(boxes, axis=1)
  at = lambda i, j: tf.gather_nd(table, tf.stack([i, j], axis=1))
  covered = at(y + bh, x + bw) - at(y, x + bw) - at(y + bh, x) + at(y, x)
  return (covered >= phi * total) | (total == 0.0)


def overlap(y, x, h, w, anchor):
  """Area of the boxes (y, x, h, w) (broadcast) inside the anchor box (y, x, h, w)."""
  a = tf.cast(anchor, tf.float32)
  dy = tf.maximum(0.0, tf.minimum(y + h, a[0] + a[2]) - tf.maximum(y, a[0]))
  dx = tf.maximum(0.0, tf.minimum(x + w, a[1] + a[3]) - tf.maximum(x, a[1]))
  return dy * dx


def overlaps_paper(inter, area, target, min_overlap):
  """Predicate (the paper's rule): at least min_overlap (0.2) of the small crop's area
  lies inside the anchor."""
  return inter >= min_overlap * area


def overlaps_reference(inter, area, target, min_overlap):
  """Predicate (the authors' released code): intersection >= min_overlap (0.1) x the
  small crop's sampled target area (before rounding its sides)."""
  return inter >= min_overlap * target


# Constrained multi-crop (Van Gansbeke et al. 2021, A.1): when a small crop counts as
# overlapping its anchor, given (intersection, crop area h*w, target area, min_overlap).
OVERLAP_RULES = {"paper": overlaps_paper, "reference": overlaps_reference}


def constrained_crop_box(seed, height, width, area, ratio, anchor, rule="paper",
                         min_overlap=0.2, tries=10):
  """A crop box that overlaps `anchor` by OVERLAP_RULES[rule], and whether it fell back.

  `tries` candidates (size and position) are drawn at once and the first that
  fits the image and satisfies the rule is used; if none does, the
  unconstrained crop_box from the same seed (the released code's fallback), and
  fell_back = True so that the input counts it.
  """
  s = tf.random.experimental.stateless_split(seed, 3)
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  target, ch, cw, ok = _candidates(s[0], s[1], hf, wf, area, ratio, tries)
  u = _uniform(s[2], shape=[tries, 2])
  y = tf.floor(u[:, 0] * (hf - ch + 1))
  x = tf.floor(u[:, 1] * (wf - cw + 1))
  ok &= OVERLAP_RULES[rule](overlap(y, x, ch, cw, anchor), ch * cw, target, min_overlap)
  fallback = crop_box(tf.random.experimental.stateless_fold_in(seed, 1), height, width,
                      area, ratio, tries)
  return first_accepted(tf.cast(tf.stack([y, x, ch, cw], 1), tf.int32), ok, fallback)


def sample_view_params(seed, height, width, spec, saliency=None, threshold=SALIENT,
                       anchor_box=None) -> dict:
  """Every random choice of one view (a ViewSpec: its table, crop_area and size) from a seed.

  A spec with min_salient_cover > 0 needs the image's saliency [H, W] (salient
  above threshold) and draws its box with salient_crop_box; a view with
  spec.constraint draws it with constrained_crop_box against anchor_box (the
  anchor view's box). Either adds p['crop_fallback'] (whether it fell back; the
  input counts them: one counter for every constrained view). A table with
  auto_augment > 0 adds 'auto' (this view takes AutoAugment instead of the
  table's colour ops) and the policy draws.
  """
  t = table(spec.augment)
  s = tf.random.experimental.stateless_split(seed, 12)
  c = spec.constraint
  extra = {}
  if c is not None:
    if anchor_box is None:
      raise ValueError(f"View {spec.name!r} is constrained to {c.anchor!r}; pass its box.")
    box, extra["crop_fallback"] = constrained_crop_box(
        s[0], height, width, spec.crop_area, t["crop_ratio"], anchor_box, c.rule,
        c.min_overlap, c.tries)
  elif spec.min_salient_cover > 0:
    if saliency is None:
      raise ValueError(f"View {spec.name!r} has min_salient_cover={spec.min_salient_cover}: "
                       "its crops need the image's saliency map.")
    box, extra["crop_fallback"] = salient_crop_box(s[0], saliency, spec.crop_area,
                                                   t["crop_ratio"], spec.min_salient_cover,
                                                   threshold=threshold, rule=spec.salient_rule)
  else:
    box = crop_box(s[0], height, width, spec.crop_area, t["crop_ratio"])
  p = dict(
      extra,
      box=box,
      flip=_uniform(s[1]) < t["flip"],
      jitter=_uniform(s[2]) < t["jitter"],
      brightness=_uniform(s[3], 1 - t["brightness"], 1 + t["brightness"]),
      contrast=_uniform(s[4], 1 - t["contrast"], 1 + t["contrast"]),
      saturation=_uniform(s[5], 1 - t["saturation"], 1 + t["saturation"]),
      hue=_uniform(s[6], -t["hue"], t["hue"]),
      order=tf.cast(tf.argsort(_uniform(s[7], shape=[4])), tf.int32),
      gray=_uniform(s[8]) < t["gray"],
      blur=_uniform(s[9]) < t["blur"],
      sigma=_uniform(s[10], *t["blur_sigma"]) * (spec.size / 224.0),
      solarize=_uniform(s[11]) < t["solarize"],
  )
  if t.get("auto_augment", 0.0) > 0:
    if spec.fields:
      raise ValueError(f"View {spec.name!r}: AutoAugment (table {spec.augment!r}) moves the "
                       f"image only; it cannot carry dense fields {spec.fields}.")
    extra = tf.random.experimental.stateless_fold_in(seed, 12)
    k = tf.random.experimental.stateless_split(extra, 2)
    auto = _uniform(k[0]) < t["auto_augment"]
    p.update(autoaugment.sample_params(k[1]), auto=auto)
    for name in ("jitter", "gray", "blur", "solarize"):
      p[name] = p[name] & tf.logical_not(auto)
  return p


# --- Photometric ops (images only) --------------------------------------------

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


def blur(x, sigma, size: int):
  """Separable Gaussian blur of [B,S,S,3] with per-example sigma [B]: one depthwise conv.

  The kernel is ~size // 10 wide (odd; 23 at 224 px), size being the view's.
  """
  radius = max(1, (size // 10) // 2)
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


def colour(x, p: dict):
  """The per-example colour step of a view: AutoAugment when p['auto'] (A+), else color_jitter."""
  if "auto" not in p:
    return color_jitter(x, p)
  return tf.cond(p["auto"], lambda: autoaugment.autoaugment(x, p), lambda: color_jitter(x, p))


def photometric(x, p: dict, size: int):
  """Grayscale, Gaussian blur and solarize on a batch [B,S,S,3], per-example parameters.

  p holds per-example [B] booleans/sigmas from sample_view_params; colour
  jitter has already been applied per example by color_jitter.
  """
  # Each op only where some image takes it, writing those images only: the numbers of
  # tf.where(flag, op(x), x). Grayscale and blur still run on the whole batch, as an
  # image's numbers may depend on its place in the batch (matmul rows, conv channels).
  x = _on(p["gray"], lambda i: tf.repeat(tf.gather_nd(_gray(x), i), 3, axis=-1), x)
  x = _on(p["blur"], lambda i: tf.gather_nd(blur(x, p["sigma"], size), i), x)
  x = _on(p["solarize"], lambda i: _solarize(tf.gather_nd(x, i)), x)
  return tf.clip_by_value(x, 0.0, 1.0)


def _solarize(x):
  return tf.where(x < 0.5, x, 1.0 - x)


def _on(flags, new, x):
  """x with the images whose flag is set replaced by new(their indices [n, 1]); x itself
  when none is (new not run)."""
  i = tf.where(flags)
  return tf.cond(tf.size(i) > 0, lambda: tf.tensor_scatter_nd_update(x, i, new(i)), lambda: x)
