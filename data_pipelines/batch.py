"""The host batch: the one place where the names and shapes of batch arrays live.

The input pipeline produces these dicts of numpy arrays; the trainer turns them
into global jax.Arrays sharded on the batch axis; objectives read them by these
names. Images are float32 in [0, 1] (normalisation happens in the model step,
see detcon_jax.models.resnet.normalize_images); mask id maps are int32 ids that
are global to the source image, so the same id names the same region in both
views. `MASK_IDS*` hold NUM_MASKS ids sampled (uniformly, with replacement)
among the ids present in that view; binary masks and their downsampling to the
feature grid are built in the model step (detcon_jax.models.heads).
"""
from __future__ import annotations

import numpy as np

VIEW1, VIEW2 = "view1", "view2"            # [B, H, W, 3] float32 in [0, 1]
MASKS1, MASKS2 = "masks1", "masks2"        # [B, H, W] int32 mask-id maps
MASK_IDS1, MASK_IDS2 = "mask_ids1", "mask_ids2"  # [B, K] int32 sampled ids
LABEL = "label"                            # [B] int32 image label (-1: none)
INDEX = "index"                            # [B] int32 example index (global)

# Evaluation batches (plain reader: resize + centre crop, no augmentation).
IMAGE = "image"                            # [B, H, W, 3] float32 in [0, 1]
SEMANTIC = "semantic"                      # [B, H, W] int32, 0 = background, c+1 = class c
INSTANCES = "instances"                    # [B, H, W] int32, 0 = background
MASK_PREFIX = "mask/"                      # "mask/<source>": [B, H, W] int32 id maps

NUM_MASKS = 16


def train_batch_shapes(batch_size: int, image_size: int, num_masks: int = NUM_MASKS):
  """Shapes and dtypes of a training batch, for synthetic data and checks."""
  b, s, k = batch_size, image_size, num_masks
  return {
      VIEW1: ((b, s, s, 3), np.float32), VIEW2: ((b, s, s, 3), np.float32),
      MASKS1: ((b, s, s), np.int32), MASKS2: ((b, s, s), np.int32),
      MASK_IDS1: ((b, k), np.int32), MASK_IDS2: ((b, k), np.int32),
      LABEL: ((b,), np.int32), INDEX: ((b,), np.int32),
  }


def synthetic_train_batch(batch_size: int, image_size: int, num_masks: int = NUM_MASKS,
                          grid: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch with the real layout: views share a grid x grid mask layout.

  Both views carry the same id map (region r occupies the same grid cell), so
  every sampled id is present in both views.
  """
  rng = np.random.default_rng(seed)
  b, s, k = batch_size, image_size, num_masks
  cell = np.arange(s) * grid // s
  ids = (cell[:, None] * grid + cell[None, :]).astype(np.int32)
  id_map = np.broadcast_to(ids, (b, s, s)).copy()
  return {
      VIEW1: rng.random((b, s, s, 3), dtype=np.float32),
      VIEW2: rng.random((b, s, s, 3), dtype=np.float32),
      MASKS1: id_map, MASKS2: id_map.copy(),
      MASK_IDS1: rng.integers(0, grid * grid, (b, k), dtype=np.int32),
      MASK_IDS2: rng.integers(0, grid * grid, (b, k), dtype=np.int32),
      LABEL: rng.integers(0, 10, (b,), dtype=np.int32),
      INDEX: np.arange(b, dtype=np.int32),
  }
