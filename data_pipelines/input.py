"""Per-host tf.data pipelines: N augmented views (any sizes, with their masks), and an eval reader.

Train stream, for host h of n (defaults: jax.process_index()/process_count()):
  shards[h::n] -> per epoch e: shard order permuted by (seed, e), records
  interleaved, then shuffled within windows of `shuffle_window` records by
  (seed, e, window) -> epochs concatenated -> skip to start_step -> decode, pick
  a mask map, build every view of the view specs (views.py) with the keyed ops
  of augment.py -> batch -> batched colour ops -> numpy.
Every random number is a stateless function of (seed, epoch, example index),
with one key per view (by its position in the view list), and the order a
function of (seed, epoch), so batch s is the same whether the run started at
step 0 or resumed at start_step=s; resuming skips at most one epoch of raw
records (no decoding). Records that fail to parse or decode are skipped and
counted (`iterator.stats`); with such records the stream stays deterministic,
but a resumed run is shifted by the number dropped before the resume point,
since skipping counts records, not valid examples.

Mask ids (views whose spec has the 'masks' field, in view order): NUM_MASKS
ids are drawn uniformly with replacement among the ids present in BOTH of the
first two masked views when there are any, and the same draw is used for both
(so every sampled pair is a positive, as in the DetCon reference which samples
mask indices once per image). When those crops share no region, each of the
two draws among its own ids independently. Further masked views (multi-crop
small crops) get the first view's draw: an id may be absent from a small crop,
and pooling then gives it area 0 (the objective decides what that means). A
single masked view draws among its own ids. Binary masks and their
downsampling to the feature grid happen in the model step
(detcon_jax.models.heads); here id maps stay at full view resolution.

Saliency (views whose spec has 'saliency' or 'foreground'): the stored 8-bit
map is decoded to float32 [0, 1] and moved with the image by every crop, resize
(bilinear, antialiased: augment.RESAMPLE) and flip; 'foreground' is the view's
resampled saliency > foreground_threshold, as float32 {0, 1}. Records without
the field raise records.MissingFieldError with the command that adds it.
'background' (the stored tiled background, RGB) moves the same way (bilinear) and
gets no colour ops; the background augmentations (data_pipelines/background_augment.py)
use it after every other augmentation, in the batched colour step.

Boxes (MaskCo: a 'key' and a 'query' view whose specs carry a BoxSpec):
boxes.sample moves the key crop to overlap the query crop and draws the boxes
in source pixels from the example's key; the keyed ops move them into each
view ('<view>/boxes', '<view>/boxes_valid'), and the query's box is zeroed
after the batched colour ops.
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from data_pipelines import augment as aug
from data_pipelines import background_augment as bg_lib
from data_pipelines import batch as B
from data_pipelines import boxes as boxes_lib
from data_pipelines import records as R
from data_pipelines import views as V

_EPOCH, _POS = "_epoch", "_pos"
_FALLBACKS = "_crop_fallbacks"   # per example: saliency-constrained crops that fell back
_BG, _BG_SLOT = "_bg_draws", 1_000_033   # background augmentations' uniforms, their key slot


def resolve_mask_names(manifest: dict, mask_source: str, records_dir: str = "") -> list[str]:
  """Stored mask names for a source: an exact name, or every name 'prefix_*' / 'prefix'."""
  names = sorted(manifest["masks"])
  if mask_source in names:
    return [mask_source]
  found = [n for n in names if n.startswith(mask_source + "_")]
  if not found:
    kinds = sorted({n.split("_")[0] for n in names})
    raise ValueError(
        f"Mask source {mask_source!r} is not in the records at {records_dir!r}; they hold "
        f"{names}. Set config.data.mask_source to one of {kinds + names}, or rebuild the "
        + ("records with it, e.g. `python -m data_pipelines.build ... --masks=fh,grid,gt`."
           if manifest.get("has_gt") or mask_source != "gt" else
           f"records from a source with instance maps ({manifest.get('source')} has none; "
           "only --source=demo does)."))
  return found


def _host(host_index, host_count):
  if host_index is None or host_count is None:
    import jax
    host_index = jax.process_index() if host_index is None else host_index
    host_count = jax.process_count() if host_count is None else host_count
  if not 0 <= host_index < host_count:
    raise ValueError(f"host_index={host_index} must lie in [0, host_count={host_count}).")
  return host_index, host_count


def host_shards(records_dir, manifest, split, host_index, host_count):
  """(paths, example count) of this host's shards: shards[host_index::host_count]."""
  paths = R.shard_paths(records_dir, manifest, split)
  counts = [s["count"] for s in manifest["splits"][split]["shards"]]
  if not paths:   # an interrupted or emptied build, or a manifest edited by hand
    raise ValueError(f"Split {split!r} of {records_dir!r} lists no shards in {R.MANIFEST}; "
                     f"rebuild the records: `{R.rebuild_command(records_dir, manifest)}`.")
  if len(paths) < host_count:
    raise ValueError(f"Split {split!r} has {len(paths)} shards for {host_count} hosts; "
                     "rebuild with a smaller --shard_size so every host gets a shard.")
  return paths[host_index::host_count], sum(counts[host_index::host_count])


class Batches:
  """An iterator of numpy batch dicts that counts records dropped as corrupt.

  Elements carry their (epoch, position-in-epoch); gaps in that sequence are
  records that failed to parse or decode. `stats['corrupt_skipped']` holds the
  count so far (the tail of an epoch is counted once the next epoch starts,
  or at the end of a finite pass). With saliency-constrained views
  (ViewSpec.min_salient_cover), stats['constrained_crops'] counts their crops and
  stats['crop_fallbacks'] those that fell back (augment.salient_crop_box).
  """

  def __init__(self, ds, per_epoch: int, start_pos: int = 0, start_epoch: int = 0,
               finite: bool = False, constrained_views: int = 0):
    self._it = iter(ds.as_numpy_iterator())
    self._constrained_views = constrained_views
    self._per_epoch, self._finite = per_epoch, finite
    self._next = (start_epoch, start_pos)
    self.stats = {"corrupt_skipped": 0, "batches": 0}

  def __iter__(self):
    return self

  def _account(self, epochs, poss):
    for e, p in zip(epochs.tolist(), poss.tolist()):
      ne, npos = self._next
      if e > ne:      # tail of earlier epochs missing, then the start of this one
        self.stats["corrupt_skipped"] += (self._per_epoch - npos) + (e - ne - 1) * self._per_epoch
        npos = 0
      self.stats["corrupt_skipped"] += p - npos
      self._next = (e, p + 1)

  def __next__(self):
    before = self.stats["corrupt_skipped"]
    try:
      batch = next(self._it)
    except StopIteration:
      if self._finite:
        self.stats["corrupt_skipped"] += max(0, self._per_epoch - self._next[1])
        self._next = (self._next[0], self._per_epoch)
        self._warn(before)
      raise
    self._account(batch.pop(_EPOCH), batch.pop(_POS))
    fallbacks = batch.pop(_FALLBACKS, None)
    if fallbacks is not None:
      for key, n in (("crop_fallbacks", fallbacks.sum()), ("constrained_crops", fallbacks.size
                                                           * self._constrained_views)):
        self.stats[key] = self.stats.get(key, 0) + int(n)
    self.stats["batches"] += 1
    self._warn(before)
    return batch

  def _warn(self, before):
    if self.stats["corrupt_skipped"] > before:
      logging.warning("Skipped %d unreadable records (%d so far); rebuild the records if "
                      "this grows.", self.stats["corrupt_skipped"] - before,
                      self.stats["corrupt_skipped"])


def _epoch_records(paths, seed, epoch, window):
  """One epoch of this host's raw records in a (seed, epoch)-determined order."""
  base = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), epoch)
  order = tf.argsort(tf.random.stateless_uniform([len(paths)], base))
  files = tf.data.Dataset.from_tensor_slices(tf.gather(tf.constant(paths), order))
  ds = files.interleave(lambda f: tf.data.TFRecordDataset(f).ignore_errors(),
                        cycle_length=min(8, len(paths)), block_length=1,
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def shuffle_window(w, recs):
    key = tf.random.experimental.stateless_fold_in(base, w + 1)
    return tf.data.Dataset.from_tensor_slices(
        tf.gather(recs, tf.argsort(tf.random.stateless_uniform(tf.shape(recs), key))))

  ds = ds.batch(window).enumerate().flat_map(shuffle_window)
  return ds.enumerate().map(lambda p, r: {_EPOCH: epoch, _POS: p, "record": r})


def _decode_image(data):
  img = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.image.convert_image_dtype(img, tf.float32)


def _decode_ids(data):
  return tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16)[..., 0], tf.int32)


def _decode_saliency(data, image):
  """float32 [H, W] in [0, 1] from the 8-bit PNG; must match the image's size."""
  sal = tf.cast(tf.io.decode_png(data, channels=1)[..., 0], tf.float32) / 255.0
  tf.debugging.assert_equal(tf.shape(sal), tf.shape(image)[:2],
                            message="saliency and image sizes differ (corrupt record)")
  return sal


def _needs_saliency(spec) -> bool:
  return (V.SALIENCY in spec.fields or V.FOREGROUND in spec.fields
          or spec.min_salient_cover > 0)


def _view_fields(spec) -> tuple[str, ...]:
  """Dense fields the geometric ops move for a view: the image, its fields, and
  the saliency behind 'foreground' (thresholded after resampling)."""
  dense = [f for f in spec.fields if f != V.FOREGROUND]
  if V.FOREGROUND in spec.fields and V.SALIENCY not in dense:
    dense.append(V.SALIENCY)
  return (aug.IMAGE,) + tuple(dense)


def _decode_background(data, image):
  bg = _decode_image(data)
  tf.debugging.assert_equal(tf.shape(bg), tf.shape(image),
                            message="background and image sizes differ (corrupt record)")
  return bg


def sample_mask_ids(maps, seed, num_masks):
  """num_masks ids for each masked view's id map, in view order (rule: module docstring)."""
  s = tf.random.experimental.stateless_split(seed, 3)

  def pick(cands, key):
    i = tf.random.stateless_uniform([num_masks], key, 0, tf.size(cands), dtype=tf.int32)
    return tf.gather(cands, i)

  u1 = tf.unique(tf.reshape(maps[0], [-1])).y
  if len(maps) == 1:
    return [pick(u1, s[0])]
  u2 = tf.unique(tf.reshape(maps[1], [-1])).y
  common = tf.boolean_mask(u1, tf.reduce_any(tf.equal(u1[:, None], u2[None, :]), axis=1))
  has_common = tf.size(common) > 0
  m1 = tf.cond(has_common, lambda: pick(common, s[0]), lambda: pick(u1, s[1]))
  m2 = tf.cond(has_common, lambda: m1, lambda: pick(u2, s[2]))
  return [m1, m2] + [m1] * (len(maps) - 2)


def _view_slot(i: int) -> int:
  """Per-example key slot of view i. Slot 0 picks the mask map and slot 3 draws the
  mask ids; views fill 1, 2, 4, 5, ... (the two-view layout, so the classic pair
  reproduces the batches of the two-view pipeline bit for bit)."""
  return i + 1 if i < 2 else i + 2


def _check_views(views):
  names = [s.name for s in views]
  reserved = {B.LABEL, B.INDEX, _EPOCH, _POS}
  bad = [n for n in names if not n or "/" in n or n in reserved]
  if not views or bad or len(set(names)) != len(names):
    raise ValueError(f"train_iterator: views {names} must be a non-empty sequence of "
                     "ViewSpecs with unique names that are non-empty, contain no '/' and "
                     f"are not one of {sorted(reserved)}.")
  for i, s in enumerate(views):
    aug.table(s.augment)
    if s.constraint and s.constraint.anchor not in names[:i]:
      raise ValueError(f"train_iterator: view {s.name!r} is constrained to "
                       f"{s.constraint.anchor!r}, which must come before it in the view list.")


_BOX_SLOT = 1_000_003   # folded into the example's key for MaskCo's boxes (boxes.sample)


def _param(view, name):
  return f"_p/{view}/{name}"


def train_iterator(records_dir, *, batch_size, views, mask_source="fh", num_masks=B.NUM_MASKS,
                   seed=0, start_step=0, host_index=None, host_count=None, split="train",
                   shuffle_window=10_000, num_parallel_calls=tf.data.AUTOTUNE,
                   prefetch=2, foreground_threshold=0.5,
                   background: bg_lib.Settings | None = None,
                   multi_hot: bool = False) -> Batches:
  """Infinite iterator of this host's training batches with exactly `views` (batch.py keys).

  views: a sequence of data_pipelines.views.ViewSpec, any number, each built at
  its own size, crop area and augmentation table. batch_size is per host.
  Masks are read only when some view carries 'masks'; mask_source: 'fh' (one
  stored fh_* map picked at random per example, the same for every view),
  'grid', 'gt', or an exact name like 'fh_s1000'. A view's pixels do not
  depend on which fields it carries. Batch s is a function of (seed, s, host) only.
  Views with 'saliency' / 'foreground' need records with saliency; foreground =
  the view's saliency > foreground_threshold (config.data.foreground_threshold).
  background (data_pipelines/background_augment.py settings): the background augmentation of
  the global views after every other augmentation; the fields it reads are dropped
  from the batch unless the views ask for them. multi_hot=True adds 'labels', the
  multi-hot classes of the whole image's GT instances (records with GT).
  """
  for key, value, low in (("batch_size", batch_size, 1), ("num_masks", num_masks, 1),
                          ("start_step", start_step, 0)):
    if int(value) < low:
      raise ValueError(f"train_iterator: {key}={value} must be >= {low}.")
  views = tuple(views)
  _check_views(views)
  order = list(B.train_batch_shapes(batch_size, num_masks=num_masks, specs=views))
  views = bg_lib.with_fields(views, background)     # what the augmentation reads
  bg_views = [s.name for s in V.global_views(views)] if background else []
  bg_only = [k for k in B.train_batch_shapes(batch_size, num_masks=num_masks, specs=views)
             if k not in order]
  masked = [s for s in views if V.MASKS in s.fields]
  salient = any(_needs_saliency(s) for s in views)
  if not 0.0 <= float(foreground_threshold) <= 1.0:
    raise ValueError(f"train_iterator: foreground_threshold={foreground_threshold} must lie "
                     "in [0, 1] (config.data.foreground_threshold).")
  box_pair = boxes_lib.pair(views)      # MaskCo's (query, key) views, or None
  manifest = R.read_manifest(records_dir)
  if salient:
    R.require_field(records_dir, "saliency", manifest)
  tiled = any(V.BACKGROUND in s.fields for s in views)
  if tiled:
    R.require_field(records_dir, "background", manifest)
    bg_lib.check_hole(manifest, foreground_threshold)
  names = resolve_mask_names(manifest, mask_source, records_dir) if masked else []
  host_index, host_count = _host(host_index, host_count)
  paths, per_epoch = host_shards(records_dir, manifest, split, host_index, host_count)
  if per_epoch == 0:
    raise ValueError(f"Host {host_index} has no {split!r} examples in {records_dir!r}.")
  start = int(start_step) * int(batch_size)
  start_epoch, offset = divmod(start, per_epoch)
  if multi_hot and not (manifest.get("has_gt") and manifest.get("num_classes")):
    raise ValueError(f"{records_dir!r} has no ground-truth instance classes for multi-hot "
                     "labels (config.data.multi_hot_labels); use the demo or a tfds "
                     "segmentation dataset, or single labels.")
  spec = R.feature_spec(names, saliency=salient, background=tiled, gt=multi_hot)
  base = tf.constant([seed, 1], tf.int64)

  def make_views(el):
    ex = tf.io.parse_single_example(el["record"], spec)
    image = _decode_image(ex[R.IMAGE])
    index = ex[R.INDEX]
    key = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base, el[_EPOCH]), index)
    k = tf.random.experimental.stateless_split(key, max(4, len(views) + 2))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    fields = {aug.IMAGE: image}
    if masked:
      choice = tf.random.stateless_uniform([], k[0], 0, len(names), dtype=tf.int32)
      pngs = tf.stack([ex[R.MASK_PREFIX + n] for n in names])
      fields[V.MASKS] = _decode_ids(tf.gather(pngs, choice))
      tf.debugging.assert_equal(tf.shape(fields[V.MASKS]), tf.shape(image)[:2],
                                message="mask and image sizes differ (corrupt record)")
    if salient:
      fields[V.SALIENCY] = _decode_saliency(ex[R.SALIENCY], image)
    if tiled:
      fields[V.BACKGROUND] = _decode_background(ex[R.BACKGROUND], image)
    out = {_EPOCH: el[_EPOCH], _POS: el[_POS], B.LABEL: tf.cast(ex[R.LABEL], tf.int32),
           B.INDEX: tf.cast(index, tf.int32)}
    if multi_hot:
      classes = tf.sparse.to_dense(ex[R.GT_CLASSES])
      out[B.LABELS] = tf.minimum(tf.reduce_sum(
          tf.one_hot(classes, int(manifest["num_classes"])), axis=0), 1.0)
    fallbacks, params = [], {}
    for i, s in enumerate(views):
      anchor = params[s.constraint.anchor]["box"] if s.constraint else None
      p = aug.sample_view_params(k[_view_slot(i)], h, w, s, fields.get(V.SALIENCY),
                                 foreground_threshold, anchor_box=anchor)
      if "crop_fallback" in p:
        fallbacks.append(tf.cast(p["crop_fallback"], tf.int32))
      params[s.name] = p
    boxes = {}
    if box_pair:    # moves the key crop to overlap the query crop; boxes in source pixels
      boxes = boxes_lib.sample(tf.random.experimental.stateless_fold_in(key, _BOX_SLOT), h, w,
                               params, views)
    for s in views:
      p = params[s.name]
      data = aug.geometric({f: fields[f] for f in _view_fields(s)} | boxes.get(s.name, {}), p,
                           s.size)
      out[s.name] = aug.colour(data[aug.IMAGE], p)
      if s.constraint:
        out[B.key(s.name, V.FALLBACK)] = tf.cast(p["fallback"], tf.int32)
      for f in s.fields + tuple(boxes.get(s.name, ())):
        if f == V.FOREGROUND:
          out[B.key(s.name, f)] = tf.cast(data[V.SALIENCY] > foreground_threshold, tf.float32)
        elif f in (V.SALIENCY, V.BACKGROUND):
          out[B.key(s.name, f)] = tf.clip_by_value(data[f], 0.0, 1.0)
        else:
          out[B.key(s.name, f)] = data[f]
      out.update({_param(s.name, n): p[n] for n in aug.PHOTOMETRIC_KEYS})
    if masked:
      ids = sample_mask_ids([out[B.key(s.name, V.MASKS)] for s in masked], k[3], num_masks)
      out.update({B.key(s.name, "mask_ids"): m for s, m in zip(masked, ids)})
    if fallbacks:
      out[_FALLBACKS] = tf.add_n(fallbacks)
    if background:
      out[_BG] = bg_lib.draws(tf.random.experimental.stateless_fold_in(key, _BG_SLOT),
                              len(bg_views))
    return {n: out.pop(n) for n in order} | out        # batch.py's order, then internals

  def colour(batch):
    for s in views:
      p = {n: batch.pop(_param(s.name, n)) for n in aug.PHOTOMETRIC_KEYS}
      batch[s.name] = aug.photometric(batch[s.name], p, s.size)
    if box_pair:    # the masked box, zeroed after every other augmentation
      q = box_pair[0].name
      batch[q] = boxes_lib.erase(batch[q], batch[B.key(q, boxes_lib.BOXES)][:, 0])
    if background:  # after every other augmentation
      batch = bg_lib.apply(batch, bg_views, batch.pop(_BG), background)
      for k in bg_only:
        batch.pop(k)
    return batch

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  ds = epochs.flat_map(lambda e: _epoch_records(paths, seed, e, shuffle_window))
  ds = ds.skip(offset)
  ds = ds.map(make_views, num_parallel_calls=num_parallel_calls,
              deterministic=True).ignore_errors()
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(colour, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.prefetch(prefetch)
  return Batches(ds, per_epoch, start_pos=offset, start_epoch=start_epoch,
                 constrained_views=sum(s.min_salient_cover > 0 for s in views))


def _resize_centre(x, size, method):
  """Resize the shorter side to `size`, then centre-crop size x size."""
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  scale = tf.cast(size, tf.float32) / tf.cast(tf.minimum(h, w), tf.float32)
  nh = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
  nw = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
  x = tf.image.resize(x, [nh, nw], method=method, antialias=(method != "nearest"))
  y0, x0 = (nh - size) // 2, (nw - size) // 2
  return x[y0:y0 + size, x0:x0 + size]


def eval_iterator(records_dir, split, *, batch_size, image_size, mask_sources=(),
                  saliency=False, host_index=0, host_count=1,
                  num_parallel_calls=tf.data.AUTOTUNE) -> Batches:
  """One ordered pass over a split: image, label, index, GT maps, requested mask maps.

  image float32 [B,S,S,3] in [0,1] (shorter side resized to S, centre crop);
  semantic/instances int32 [B,S,S] when the records hold GT (semantic: 0
  background, class c -> c+1); 'mask/<name>' for each name or prefix in
  mask_sources; with saliency=True, 'saliency' float32 [B,S,S] in [0, 1]
  (bilinear; records need the field). Id maps are resized nearest-neighbour.
  The last batch may be smaller. By default one host reads everything; pass
  host_index/host_count to split the pass over hosts by shard.
  """
  manifest = R.read_manifest(records_dir)
  names = [n for src in mask_sources for n in resolve_mask_names(manifest, src, records_dir)]
  gt = bool(manifest.get("has_gt"))
  if saliency:
    R.require_field(records_dir, "saliency", manifest)
  paths, total = host_shards(records_dir, manifest, split, host_index, host_count)
  spec = R.feature_spec(names, gt=gt, saliency=saliency)

  def decode(pos, record):
    ex = tf.io.parse_single_example(record, spec)
    image = _decode_image(ex[R.IMAGE])
    out = {_EPOCH: tf.constant(0, tf.int64), _POS: pos,
           B.IMAGE: tf.clip_by_value(_resize_centre(image, image_size, "bicubic"), 0., 1.),
           B.LABEL: tf.cast(ex[R.LABEL], tf.int32), B.INDEX: tf.cast(ex[R.INDEX], tf.int32)}

    def id_map(data):
      ids = _decode_ids(data)
      tf.debugging.assert_equal(tf.shape(ids), tf.shape(image)[:2],
                                message="map and image sizes differ (corrupt record)")
      m = _resize_centre(tf.cast(ids[..., None], tf.float32), image_size, "nearest")
      return tf.cast(m[..., 0], tf.int32)

    if gt:
      inst = id_map(ex[R.GT_INSTANCES])
      classes = tf.sparse.to_dense(ex[R.GT_CLASSES])
      lut = tf.concat([[0], tf.cast(classes, tf.int32) + 1], 0)
      out[B.INSTANCES], out[B.SEMANTIC] = inst, tf.gather(lut, inst)
    for n in names:
      out[B.MASK_PREFIX + n] = id_map(ex[R.MASK_PREFIX + n])
    if saliency:
      sal = _decode_saliency(ex[R.SALIENCY], image)[..., None]
      out[B.SALIENCY] = tf.clip_by_value(_resize_centre(sal, image_size, "bilinear")[..., 0],
                                         0.0, 1.0)
    return out

  ds = tf.data.TFRecordDataset(paths).ignore_errors().enumerate()
  ds = ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True).ignore_errors()
  ds = ds.batch(batch_size).prefetch(2)
  return Batches(ds, total, finite=True)
