"""Per-host tf.data pipelines: N augmented views (any sizes, with their masks), and an eval reader.

Train stream, for host h of n (defaults: jax.process_index()/process_count()):
  shards[h::n] -> per epoch e: shard order permuted by (seed, e), records
  interleaved, then shuffled within windows of `shuffle_window` records by
  (seed, e, window) -> epochs concatenated -> skip to start_step -> make_views
  (decode, pick a mask map, build every view of the view specs (views.py) with the
  keyed ops of augment.py) -> batch -> colour_batch (batched colour ops) -> numpy.
make_views and colour_batch are module-level functions of a Recipe (train_recipe:
the arguments resolved against the records), so they also run eagerly.
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
boxes.sample returns the key crop moved to overlap the query crop (make_views
puts it in the key view's params) and the boxes in source pixels, drawn from
the example's key; the keyed ops move them into each view ('<view>/boxes', '<view>/boxes_valid'), and the query's box is zeroed
after the batched colour ops.
"""
from __future__ import annotations

import dataclasses
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
_FALLBACKS = "_crop_fallbacks"   # per example: constrained crops that fell back
_BG, _BG_SLOT = "_bg_draws", 1_000_033   # background augmentations' uniforms, their key slot


def resolve_mask_names(manifest: dict, mask_source: str, records_dir: str = "",
                       key: str = "config.data.mask_source") -> list[str]:
  """Stored mask names for a source: an exact name, or every name 'prefix_*' / 'prefix'
  (key: the setting the error tells the user to change)."""
  names = sorted(manifest["masks"])
  if mask_source in names:
    return [mask_source]
  found = [n for n in names if n.startswith(mask_source + "_")]
  if not found:
    kinds = sorted({n.split("_")[0] for n in names})
    raise ValueError(
        f"Mask source {mask_source!r} is not in the records at {records_dir!r}; they hold "
        f"{names}. Set {key} to one of {kinds + names}, or rebuild the "
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
  or at the end of a finite pass). With constrained views (ViewSpec.constrained_crop:
  a salient cover or an anchor to overlap), stats['constrained_crops'] counts their
  crops and stats['crop_fallbacks'] those that fell back (augment.first_accepted); the
  trainer logs them as TensorBoard data/constrained_crops and data/crop_fallbacks.
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


def decode_image(data):
  """float32 [H, W, 3] in [0, 1] from any stored image format."""
  img = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.image.convert_image_dtype(img, tf.float32)


def decode_ids(data):
  """int32 [H, W] id map from the 16-bit PNG."""
  return tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16)[..., 0], tf.int32)


def decode_saliency(data, image):
  """float32 [H, W] in [0, 1] from the 8-bit PNG; must match the image's size."""
  sal = tf.cast(tf.io.decode_png(data, channels=1)[..., 0], tf.float32) / 255.0
  tf.debugging.assert_equal(tf.shape(sal), tf.shape(image)[:2],
                            message="saliency and image sizes differ (corrupt record)")
  return sal


def decode_background(data, image):
  """float32 [H, W, 3] tiled background; must match the image's size."""
  bg = decode_image(data)
  tf.debugging.assert_equal(tf.shape(bg), tf.shape(image),
                            message="background and image sizes differ (corrupt record)")
  return bg


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


def _check_views(views, foreground_threshold, background):
  """train_iterator's view arguments, checked before the records are read."""
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
  if not 0.0 <= float(foreground_threshold) <= 1.0:
    raise ValueError(f"train_iterator: foreground_threshold={foreground_threshold} must lie "
                     "in [0, 1] (config.data.foreground_threshold).")
  boxes_lib.pair(bg_lib.with_fields(views, background))   # MaskCo: one 'key', one 'query'


_BOX_SLOT = 1_000_003   # folded into the example's key for MaskCo's boxes (boxes.sample)


def _param(view, name):
  return f"_p/{view}/{name}"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What the per-example step (make_views) and the per-batch step (colour_batch) read,
  resolved once from train_iterator's arguments and the records (train_recipe)."""
  views: tuple                 # ViewSpecs built, with the fields the background augmentation reads
  order: tuple                 # the batch keys asked for, in batch.py's order
  mask_names: tuple = ()       # stored mask maps, one picked per example (views with 'masks')
  seed: int = 0
  num_masks: int = B.NUM_MASKS
  foreground_threshold: float = 0.5
  saliency: bool = False       # decode the records' saliency field
  tiled: bool = False          # decode the records' tiled background
  num_classes: int = 0         # > 0: multi-hot 'labels' of the GT classes
  background: bg_lib.Settings | None = None

  @property
  def feature_spec(self):
    return R.feature_spec(list(self.mask_names), saliency=self.saliency,
                          background=self.tiled, gt=self.num_classes > 0)

  @property
  def masked(self):
    return [s for s in self.views if V.MASKS in s.fields]

  @property
  def bg_views(self):
    return [s.name for s in V.global_views(self.views)] if self.background else []

  @property
  def box_pair(self):
    """MaskCo's (query, key) view specs, or None."""
    return boxes_lib.pair(self.views)


def train_recipe(records_dir, manifest, *, views, mask_source="fh", num_masks=B.NUM_MASKS,
                 mask_key="config.data.mask_source", seed=0, foreground_threshold=0.5, background: bg_lib.Settings | None = None,
                 multi_hot: bool = False) -> Recipe:
  """The Recipe of train_iterator's arguments (which see) for the records in records_dir
  (manifest: their manifest.json); records lacking what the views need are refused."""
  order = tuple(B.train_batch_shapes(1, num_masks=num_masks, specs=views))
  views = bg_lib.with_fields(views, background)     # what the augmentation reads
  salient = any(_needs_saliency(s) for s in views)
  if salient:
    R.require_field(records_dir, "saliency", manifest)
  tiled = any(V.BACKGROUND in s.fields for s in views)
  if tiled:
    R.require_field(records_dir, "background", manifest)
    bg_lib.check_hole(manifest, foreground_threshold)
  masked = any(V.MASKS in s.fields for s in views)
  names = resolve_mask_names(manifest, mask_source, records_dir, mask_key) if masked else []
  if multi_hot and not (manifest.get("has_gt") and manifest.get("num_classes")):
    raise ValueError(f"{records_dir!r} has no ground-truth instance classes for multi-hot "
                     "labels (config.data.multi_hot_labels); use the demo or a tfds "
                     "segmentation dataset, or single labels.")
  return Recipe(views, order, tuple(names), int(seed), int(num_masks),
                float(foreground_threshold), salient, tiled,
                int(manifest["num_classes"]) if multi_hot else 0, background)


def example_key(seed: int, epoch, index):
  """The example's stateless key: a function of (seed, epoch, example index) only."""
  base = tf.constant([seed, 1], tf.int64)
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(base, epoch), index)


def decode_fields(ex: dict, recipe: Recipe, mask_key) -> dict:
  """The dense fields the views move, from a parsed record: the image, one stored mask
  map (picked with mask_key among recipe.mask_names), the saliency, the tiled background."""
  image = decode_image(ex[R.IMAGE])
  fields = {aug.IMAGE: image}
  if recipe.mask_names:
    names = recipe.mask_names
    choice = tf.random.stateless_uniform([], mask_key, 0, len(names), dtype=tf.int32)
    pngs = tf.stack([ex[R.MASK_PREFIX + n] for n in names])
    fields[V.MASKS] = decode_ids(tf.gather(pngs, choice))
    tf.debugging.assert_equal(tf.shape(fields[V.MASKS]), tf.shape(image)[:2],
                              message="mask and image sizes differ (corrupt record)")
  if recipe.saliency:
    fields[V.SALIENCY] = decode_saliency(ex[R.SALIENCY], image)
  if recipe.tiled:
    fields[V.BACKGROUND] = decode_background(ex[R.BACKGROUND], image)
  return fields


def view_params(keys, height, width, views, saliency, threshold) -> dict:
  """{view name: augment.sample_view_params}, each from its key slot; a constrained
  view gets its anchor's box (the anchor comes earlier in the list)."""
  params = {}
  for i, s in enumerate(views):
    anchor = params[s.constraint.anchor]["box"] if s.constraint else None
    params[s.name] = aug.sample_view_params(keys[_view_slot(i)], height, width, s, saliency,
                                            threshold, anchor_box=anchor)
  return params


def one_view(spec, fields: dict, p: dict, boxes: dict, threshold: float) -> dict:
  """The batch entries of one view (batch.py keys) before the batched photometric ops,
  whose per-example parameters ride along under internal keys."""
  data = aug.geometric({f: fields[f] for f in _view_fields(spec)} | boxes, p, spec.size)
  out = {spec.name: aug.colour(data[aug.IMAGE], p)}
  for f in spec.fields + tuple(boxes):
    if f == V.FOREGROUND:
      out[B.key(spec.name, f)] = tf.cast(data[V.SALIENCY] > threshold, tf.float32)
    elif f in (V.SALIENCY, V.BACKGROUND):
      out[B.key(spec.name, f)] = tf.clip_by_value(data[f], 0.0, 1.0)
    else:
      out[B.key(spec.name, f)] = data[f]
  out.update({_param(spec.name, n): p[n] for n in aug.PHOTOMETRIC_KEYS})
  return out


def make_views(record, epoch, recipe: Recipe) -> dict:
  """One serialized record -> every view of recipe.views (batch.py keys in batch order,
  then internal keys that colour_batch and Batches consume). Plain TF ops: eager or tf.data."""
  ex = tf.io.parse_single_example(record, recipe.feature_spec)
  index = ex[R.INDEX]
  key = example_key(recipe.seed, epoch, index)
  views = recipe.views
  k = tf.random.experimental.stateless_split(key, max(4, len(views) + 2))
  fields = decode_fields(ex, recipe, k[0])
  h, w = tf.shape(fields[aug.IMAGE])[0], tf.shape(fields[aug.IMAGE])[1]
  out = {B.LABEL: tf.cast(ex[R.LABEL], tf.int32), B.INDEX: tf.cast(index, tf.int32)}
  if recipe.num_classes:
    classes = tf.sparse.to_dense(ex[R.GT_CLASSES])
    out[B.LABELS] = tf.minimum(tf.reduce_sum(tf.one_hot(classes, recipe.num_classes), axis=0),
                               1.0)
  params = view_params(k, h, w, views, fields.get(V.SALIENCY), recipe.foreground_threshold)
  boxes = {}
  if recipe.box_pair:   # the key crop moved to overlap the query crop; boxes in source pixels
    key_view = recipe.box_pair[1].name
    moved, boxes = boxes_lib.sample(tf.random.experimental.stateless_fold_in(key, _BOX_SLOT),
                                    h, w, {n: p["box"] for n, p in params.items()}, views)
    params[key_view] = dict(params[key_view], box=moved)
  for s in views:
    out.update(one_view(s, fields, params[s.name], boxes.get(s.name, {}),
                        recipe.foreground_threshold))
  masked = recipe.masked
  if masked:
    ids = sample_mask_ids([out[B.key(s.name, V.MASKS)] for s in masked], k[3], recipe.num_masks)
    out.update({B.key(s.name, "mask_ids"): m for s, m in zip(masked, ids)})
  fallbacks = [tf.cast(p["crop_fallback"], tf.int32) for p in params.values()
               if "crop_fallback" in p]
  if fallbacks:      # every constrained view's fallbacks: one host counter (Batches.stats)
    out[_FALLBACKS] = tf.add_n(fallbacks)
  if recipe.background:
    out[_BG] = bg_lib.draws(tf.random.experimental.stateless_fold_in(key, _BG_SLOT),
                            len(recipe.bg_views))
  return {n: out.pop(n) for n in recipe.order} | out        # batch.py's order, then internals


def colour_batch(batch: dict, recipe: Recipe) -> dict:
  """The per-batch step: photometric ops of every view, then MaskCo's masked box and the
  background augmentations, after every other augmentation."""
  for s in recipe.views:
    p = {n: batch.pop(_param(s.name, n)) for n in aug.PHOTOMETRIC_KEYS}
    batch[s.name] = aug.photometric(batch[s.name], p, s.size)
  if recipe.box_pair:    # the masked box, zeroed after every other augmentation
    q = recipe.box_pair[0].name
    batch[q] = boxes_lib.erase(batch[q], batch[B.key(q, boxes_lib.BOXES)][:, 0])
  if recipe.background:  # after every other augmentation
    batch = bg_lib.apply(batch, recipe.bg_views, batch.pop(_BG), recipe.background)
    for k in B.train_batch_shapes(1, num_masks=recipe.num_masks, specs=recipe.views):
      if k not in recipe.order:     # what only the augmentation read
        batch.pop(k)
  return batch


def train_dataset(recipe: Recipe, paths, *, batch_size, start_epoch=0, offset=0,
                  shuffle_window=10_000, num_parallel_calls=tf.data.AUTOTUNE, prefetch=2):
  """The tf.data pipeline of train_iterator: records from (start_epoch, offset) on ->
  make_views -> batch -> colour_batch."""
  def per_example(el):
    return make_views(el["record"], el[_EPOCH], recipe) | {_EPOCH: el[_EPOCH], _POS: el[_POS]}

  epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max)
  ds = epochs.flat_map(lambda e: _epoch_records(paths, recipe.seed, e, shuffle_window))
  ds = ds.skip(offset)
  ds = ds.map(per_example, num_parallel_calls=num_parallel_calls,
              deterministic=True).ignore_errors()
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.map(lambda b: colour_batch(b, recipe), num_parallel_calls=num_parallel_calls,
              deterministic=True)
  return ds.prefetch(prefetch)


def train_iterator(records_dir, *, batch_size, views, mask_source="fh", num_masks=B.NUM_MASKS,
                   seed=0, start_step=0, host_index=None, host_count=None, split="train",
                   shuffle_window=10_000, num_parallel_calls=tf.data.AUTOTUNE,
                   prefetch=2, foreground_threshold=0.5,
                   background: bg_lib.Settings | None = None,
                   multi_hot: bool = False,
                   mask_key: str = "config.data.mask_source") -> Batches:
  """Infinite iterator of this host's training batches with exactly `views` (batch.py keys).

  views: a sequence of data_pipelines.views.ViewSpec, any number, each built at
  its own size, crop area and augmentation table. batch_size is per host.
  Masks are read only when some view carries 'masks'; mask_source: 'fh' (one
  stored fh_* map picked at random per example, the same for every view),
  'grid', 'gt', or an exact name like 'fh_s1000' (mask_key: the config key that
  set it, named in the error when the records lack it). A view's pixels do not
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
  _check_views(views, foreground_threshold, background)
  manifest = R.read_manifest(records_dir)
  recipe = train_recipe(records_dir, manifest, views=views, mask_source=mask_source,
                        num_masks=num_masks, mask_key=mask_key, seed=seed,
                        foreground_threshold=foreground_threshold, background=background,
                        multi_hot=multi_hot)
  host_index, host_count = _host(host_index, host_count)
  paths, per_epoch = host_shards(records_dir, manifest, split, host_index, host_count)
  if per_epoch == 0:
    raise ValueError(f"Host {host_index} has no {split!r} examples in {records_dir!r}.")
  start_epoch, offset = divmod(int(start_step) * int(batch_size), per_epoch)
  ds = train_dataset(recipe, paths, batch_size=batch_size, start_epoch=start_epoch,
                     offset=offset, shuffle_window=shuffle_window,
                     num_parallel_calls=num_parallel_calls, prefetch=prefetch)
  return Batches(ds, per_epoch, start_pos=offset, start_epoch=start_epoch,
                 constrained_views=sum(s.constrained_crop for s in recipe.views))


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
    image = decode_image(ex[R.IMAGE])
    out = {_EPOCH: tf.constant(0, tf.int64), _POS: pos,
           B.IMAGE: tf.clip_by_value(_resize_centre(image, image_size, "bicubic"), 0., 1.),
           B.LABEL: tf.cast(ex[R.LABEL], tf.int32), B.INDEX: tf.cast(ex[R.INDEX], tf.int32)}

    def id_map(data):
      ids = decode_ids(data)
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
      sal = decode_saliency(ex[R.SALIENCY], image)[..., None]
      out[B.SALIENCY] = tf.clip_by_value(_resize_centre(sal, image_size, "bilinear")[..., 0],
                                         0.0, 1.0)
    return out

  ds = tf.data.TFRecordDataset(paths).ignore_errors().enumerate()
  ds = ds.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True).ignore_errors()
  ds = ds.batch(batch_size).prefetch(2)
  return Batches(ds, total, finite=True)
