"""The host batch: the one place where the names and shapes of batch arrays live.

The input pipeline produces these dicts of numpy arrays; the trainer turns them
into global jax.Arrays sharded on the batch axis; objectives read them by these
names. Images are float32 in [0, 1] (normalisation happens in the model step,
see detcon_jax.models.resnet.normalize_images); mask id maps are int32 ids that
are global to the source image, so the same id names the same region in every
view. '<view>/mask_ids' hold NUM_MASKS ids sampled (uniformly, with
replacement) among the ids present in both global views (data_pipelines/input.py
has the rule); multi-crop small views reuse view1's draw, so an id may be
absent from a small crop. Binary masks and their downsampling to the feature
grid are built in the model step (detcon_jax.models.heads). Views with saliency
carry '<view>/saliency' (float32 [B, H, W] in [0, 1], resampled bilinearly with
the view) and '<view>/foreground' (float32 {0, 1}, the saliency thresholded);
views with the tiled background carry '<view>/background' ([B, H, W, 3]).
"""
from __future__ import annotations

import numpy as np


def key(view: str, field: str) -> str:
  """Batch name of a view's dense field: key('view1', 'masks') == 'view1/masks'."""
  return f"{view}/{field}"


# Views are named by their ViewSpec (data_pipelines/views.py); the classic pair:
VIEW1, VIEW2 = "view1", "view2"            # [B, H, W, 3] float32 in [0, 1]
MASKS1, MASKS2 = key(VIEW1, "masks"), key(VIEW2, "masks")            # [B, H, W] int32 id maps
MASK_IDS1, MASK_IDS2 = key(VIEW1, "mask_ids"), key(VIEW2, "mask_ids")  # [B, K] int32 sampled ids
LABEL = "label"                            # [B] int32 image label (-1: none)
LABELS = "labels"                          # [B, num_classes] float32 multi-hot: the classes of
                                           # the image's GT instances (train_iterator multi_hot)
INDEX = "index"                            # [B] int32 example index (global)

# Evaluation batches (plain reader: resize + centre crop, no augmentation).
IMAGE = "image"                            # [B, H, W, 3] float32 in [0, 1]
SEMANTIC = "semantic"                      # [B, H, W] int32, 0 = background, c+1 = class c
# Semantic labels have one source: records with GT (manifest has_gt) store each
# image's instance map and its instances' classes (gt/instances, gt/classes);
# the eval reader maps instance k to classes[k-1] + 1 (data_pipelines/input.py
# eval_iterator), so the demo gets background + its 12 classes and a tfds
# segmentation dataset background + the image's class. Multi-label targets are
# the classes present in that map (present_classes). IGNORE_LABEL marks pixels
# scored nowhere (padding of augmented crops; VOC's object borders).
IGNORE_LABEL = 255
INSTANCES = "instances"                    # [B, H, W] int32, 0 = background
MASK_PREFIX = "mask/"                      # "mask/<source>": [B, H, W] int32 id maps
SALIENCY = "saliency"                      # [B, H, W] float32 in [0, 1] (records with saliency)

NUM_MASKS = 16


def present_classes(semantic, num_classes: int) -> np.ndarray:
  """bool [N, num_classes]: class c is present where some pixel of the image is c + 1."""
  sem = np.asarray(semantic).reshape(len(semantic), -1)
  out = np.zeros((len(sem), num_classes + 1), bool)
  rows = np.repeat(np.arange(len(sem)), sem.shape[1])
  keep = (sem.ravel() >= 0) & (sem.ravel() <= num_classes)
  out[rows[keep], sem.ravel()[keep]] = True
  return out[:, 1:]


def train_batch_shapes(batch_size: int, image_size: int | None = None,
                       num_masks: int = NUM_MASKS, specs=None):
  """Shapes and dtypes of a training batch for view specs (default: two masked views)."""
  from data_pipelines import views as V
  specs = V.two_views(image_size) if specs is None else specs
  b, k = batch_size, num_masks
  out = {}
  for s in specs:
    out[s.name] = ((b, s.size, s.size, 3), np.float32)
    if V.MASKS in s.fields:
      out[key(s.name, "masks")] = ((b, s.size, s.size), np.int32)
      out[key(s.name, "mask_ids")] = ((b, k), np.int32)
    for f in (V.SALIENCY, V.FOREGROUND):
      if f in s.fields:
        out[key(s.name, f)] = ((b, s.size, s.size), np.float32)
    if V.BACKGROUND in s.fields:
      out[key(s.name, V.BACKGROUND)] = ((b, s.size, s.size, 3), np.float32)
    if s.boxes is not None:
      n = s.boxes.num_boxes()
      out[key(s.name, "boxes")] = ((b, n, 4), np.float32)
      out[key(s.name, "boxes_valid")] = ((b, n), np.bool_)
  out.update({LABEL: ((b,), np.int32), INDEX: ((b,), np.int32)})
  return out


def synthetic_train_batch(batch_size: int, image_size: int | None = None,
                          num_masks: int = NUM_MASKS, grid: int = 2, seed: int = 0,
                          specs=None) -> dict[str, np.ndarray]:
  """A random batch with the real layout (default: two masked views of image_size).

  Every view carries the same grid x grid id layout (region r occupies the
  same grid cell), so every sampled id is present in every view.
  """
  rng = np.random.default_rng(seed)
  out = {}
  shapes = train_batch_shapes(batch_size, image_size, num_masks, specs)
  for name, (shape, dtype) in shapes.items():
    if name.endswith("/masks"):
      s = shape[-1]
      cell = np.arange(s) * grid // s
      ids = (cell[:, None] * grid + cell[None, :]).astype(np.int32)
      out[name] = np.broadcast_to(ids, shape).copy()
    elif name.endswith("/foreground"):
      out[name] = (rng.random(shape) > 0.5).astype(dtype)
    elif name.endswith("/mask_ids"):
      out[name] = rng.integers(0, grid * grid, shape, dtype=np.int32)
    elif name.endswith("/boxes"):            # random boxes inside the view, 1/8..1/2 its side
      size = shapes[name.rsplit("/", 1)[0]][0][1]
      start = rng.uniform(0, size / 2, shape[:-1] + (2,))
      extent = rng.uniform(size / 8, size / 2, shape[:-1] + (2,))
      out[name] = np.concatenate([start, start + extent], -1).astype(np.float32)
    elif name.endswith("/boxes_valid"):
      out[name] = np.ones(shape, bool)
    elif name == LABEL:
      out[name] = rng.integers(0, 10, shape, dtype=np.int32)
    elif name == INDEX:
      out[name] = np.arange(shape[0], dtype=np.int32)
    else:
      out[name] = rng.random(shape, dtype=np.float32)
  return out
