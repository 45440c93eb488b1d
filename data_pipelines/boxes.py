"""MaskCo's boxes (Zhao et al. 2021, section 3.3): an overlapping crop pair, key boxes, a masked box.

Per example, after both views' parameters are drawn (augment.sample_view_params):
  * the key crop keeps its size and is moved to a position where it overlaps
    the query crop by at least the smallest box (size[0] / 224 of the key
    crop's height and width). The position is uniform over those positions,
    which is what rejecting non-overlapping positions would give, and is
    always possible: any crop of the random-resized-crop ranges used here is
    taller and wider than a seventh of its pair's;
  * the positive box is drawn inside the overlap, side lengths uniform in
    size (key-view pixels at 224, scaled by the view size / 224; each side
    independently, capped by the overlap);
  * count - 1 negative boxes are drawn inside the key crop, the first of
    NEGATIVE_TRIES x (count - 1) candidates with IoU < max_iou with the
    positive (IoU is unchanged by the crop's scaling and flip, so it is
    computed in source pixels). If too few candidates qualify, the missing
    ones are flagged invalid (boxes_valid False), never kept silently;
  * boxes are returned in source-image pixels, and augment.geometric moves
    them with each view (crop, resize, flip), so the query view receives the
    positive's projection. `erase` zeroes it after every other augmentation.
Boxes are (y0, x0, y1, x1) floats, pixel i spanning [i, i + 1); a pixel is
inside a box when its centre is.
"""
from __future__ import annotations

import tensorflow as tf

from data_pipelines.augment import BOXES, BOXES_VALID

NEGATIVE_TRIES = 8


def pair(specs):
  """(query spec, key spec) among the views that carry boxes; ValueError unless one of each."""
  boxed = [s for s in specs if s.boxes is not None]
  if not boxed:
    return None
  roles = sorted(s.boxes.role for s in boxed)
  if roles != ["key", "query"] or boxed[0].boxes.count != boxed[1].boxes.count:
    raise ValueError(f"Views {[s.name for s in boxed]} carry boxes with roles {roles}; boxes "
                     "need exactly one 'key' and one 'query' view with the same BoxSpec.")
  query, key = sorted(boxed, key=lambda s: s.boxes.role != "query")
  return query, key


def _uniform(seed, lo, hi, shape=()):
  return lo + (hi - lo) * tf.random.stateless_uniform(shape, seed, dtype=tf.float32)


def iou(a, b):
  """IoU of boxes a [..., 4] and b [..., 4] (broadcast), (y0, x0, y1, x1)."""
  ih = tf.maximum(0.0, tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]))
  iw = tf.maximum(0.0, tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]))
  inter = ih * iw
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / tf.maximum(area(a) + area(b) - inter, 1e-9)


def overlapping_position(seed, query_box, key_box, height, width, min_fraction):
  """The key crop (y, x, h, w) moved so that it overlaps the query crop by min_fraction
  of its own height and width on each axis (uniform over such positions)."""
  q = tf.cast(query_box, tf.float32)
  k = tf.cast(key_box, tf.float32)
  s = tf.random.experimental.stateless_split(seed, 2)
  out = []
  for axis, (extent, sd) in enumerate(((height, s[0]), (width, s[1]))):
    size, qstart, qsize = k[2 + axis], q[axis], q[2 + axis]
    need = tf.minimum(tf.math.ceil(min_fraction * size) + 1.0, tf.minimum(size, qsize))
    lo = tf.maximum(0.0, qstart - size + need)
    hi = tf.maximum(lo, tf.minimum(tf.cast(extent, tf.float32) - size, qstart + qsize - need))
    out.append(tf.minimum(hi, tf.floor(_uniform(sd, lo, hi + 1.0))))
  return tf.cast(tf.stack([out[0], out[1], k[2], k[3]]), tf.int32)


def _sides(seed, lo, hi, shape):
  """Box sides uniform in [lo, hi] (hi may be a tensor below lo: then lo is capped to it)."""
  hi = tf.broadcast_to(hi, shape)
  return _uniform(seed, tf.minimum(lo, hi), hi, shape)


def sample(seed, height, width, crops: dict, specs):
  """MaskCo's boxes for one example (module docstring), from the views' crop boxes
  crops {view name: (y, x, h, w)}: (the key view's crop moved to overlap the query's,
  {view name: {'boxes', 'boxes_valid'}} in source pixels). Pure: the caller puts the
  moved crop in the key view's params."""
  query, key = pair(specs)
  spec = key.boxes
  s = tf.random.experimental.stateless_split(seed, 6)
  kbox = overlapping_position(s[0], crops[query.name], crops[key.name],
                              height, width, spec.size[0] / 224.0)
  q = tf.cast(crops[query.name], tf.float32)
  k = tf.cast(kbox, tf.float32)
  to_src = k[2:] / float(key.size)                       # source pixels per key-view pixel (y, x)
  lo, hi = (v * key.size / 224.0 for v in spec.size)    # key-view pixels
  # Positive: inside the overlap of the two crops.
  top = tf.maximum(q[:2], k[:2])
  overlap = tf.minimum(q[:2] + q[2:], k[:2] + k[2:]) - top
  side = _sides(s[1], lo, tf.minimum(hi, overlap / to_src), [2]) * to_src
  start = top + _uniform(s[2], 0.0, 1.0, [2]) * tf.maximum(overlap - side, 0.0)
  positive = tf.concat([start, start + side], 0)
  # Negatives: inside the key crop, IoU < max_iou with the positive.
  n = spec.count - 1
  tries = NEGATIVE_TRIES * n
  side = _sides(s[3], lo, hi, [tries, 2]) * to_src
  start = k[:2] + _uniform(s[4], 0.0, 1.0, [tries, 2]) * (k[2:] - side)
  candidates = tf.concat([start, start + side], 1)
  ok = iou(candidates, positive[None]) < spec.max_iou
  first = tf.argsort(tf.cast(~ok, tf.int32), stable=True)[:n]   # qualifying ones first, in order
  negatives = tf.gather(candidates, first)
  valid = tf.concat([[True], tf.gather(ok, first)], 0)
  return kbox, {key.name: {BOXES: tf.concat([positive[None], negatives], 0),
                           BOXES_VALID: valid},
                query.name: {BOXES: positive[None], BOXES_VALID: tf.constant([True])}}


def box_mask(boxes, size: int):
  """bool [B, size, size]: pixels whose centre lies in boxes [B, 4] (y0, x0, y1, x1)."""
  c = tf.range(size, dtype=tf.float32) + 0.5
  b = tf.cast(boxes, tf.float32)
  rows = (c[None] >= b[:, :1]) & (c[None] < b[:, 2:3])
  cols = (c[None] >= b[:, 1:2]) & (c[None] < b[:, 3:4])
  return rows[:, :, None] & cols[:, None, :]


def erase(images, boxes):
  """Zero the pixels of images [B, S, S, 3] inside boxes [B, 4] (the masked box)."""
  mask = box_mask(boxes, images.shape[1] or tf.shape(images)[1])
  return tf.where(mask[..., None], tf.zeros_like(images), images)
