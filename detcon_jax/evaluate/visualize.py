"""Pictures for TensorBoard: views with their mask overlays or boxes, segmentations beside ground truth.

People judge masks and segmentations faster by eye than from a number. All
functions are numpy in, uint8 [N, H, W, 3] out (what tf.summary.image takes).
Colours come from a fixed hash of the id, so the same mask id has the same
colour in every view of an image, and the same class the same colour in every
panel; id/class 0 (background) is black in label maps.
"""
from __future__ import annotations

import numpy as np

from data_pipelines import batch as B

SEPARATOR = 2  # pixels of white between panels


def id_colors(ids: np.ndarray) -> np.ndarray:
  """A stable, well-spread RGB colour (uint8 [..., 3]) for every integer id."""
  ids = np.asarray(ids, np.uint64)
  out = []
  for mult in (2654435761, 2246822519, 3266489917):  # Knuth-style multiplicative hashes per channel
    h = (ids * np.uint64(mult) + np.uint64(mult >> 7)) & np.uint64(0xFFFFFFFF)
    out.append((h >> np.uint64(24)).astype(np.uint8) // 4 * 3 + 64)  # keep clear of black and white
  return np.stack(out, -1).astype(np.uint8)


def label_map_colors(labels: np.ndarray) -> np.ndarray:
  """Colour a class map; 0 (background) stays black."""
  colors = id_colors(labels)
  colors[np.asarray(labels) == 0] = 0
  return colors


def to_uint8(images: np.ndarray) -> np.ndarray:
  """float images in [0, 1] (or uint8) -> uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return (np.clip(images, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def boundaries(ids: np.ndarray) -> np.ndarray:
  """bool [..., H, W]: pixels whose right or lower neighbour has another id."""
  edge = np.zeros(ids.shape, bool)
  edge[..., :-1, :] |= ids[..., :-1, :] != ids[..., 1:, :]
  edge[..., :, :-1] |= ids[..., :, :-1] != ids[..., :, 1:]
  return edge


def overlay(images: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blend each region's colour over the image and draw region boundaries in white."""
  images = to_uint8(images).astype(np.float32)
  out = (1 - alpha) * images + alpha * id_colors(ids).astype(np.float32)
  out[boundaries(ids)] = 255
  return (out + 0.5).astype(np.uint8)


def side_by_side(*panels: np.ndarray) -> np.ndarray:
  """Concatenate uint8 [N, H, W, 3] panels along width with white separators.

  Shorter panels (multi-crop small views) are padded below with white to the
  tallest panel's height.
  """
  n, h = panels[0].shape[0], max(p.shape[1] for p in panels)
  gap = np.full((n, h, SEPARATOR, 3), 255, np.uint8)
  parts = []
  for i, p in enumerate(panels):
    pad = np.full((n, h - p.shape[1], p.shape[2], 3), 255, np.uint8)
    parts += ([gap] if i else []) + [np.concatenate([p, pad], axis=1)]
  return np.concatenate(parts, axis=2)


def masked_views(batch: dict) -> list[str]:
  """Names of the views in a training batch that carry a mask-id map, in batch order."""
  return [k for k in batch if B.key(k, "masks") in batch]


def view_mask_overlay_images(batch: dict, max_images: int = 4) -> np.ndarray:
  """Sampled training views with their mask id maps overlaid, one panel per masked view.

  uint8 [n, H, sum of widths + gaps, 3], panels in batch order (view1, view2,
  then small crops, padded below to the global views' height); a region has
  the same colour in every view because mask ids are global to the source
  image. For the trainer to log at the start of training.
  """
  names = masked_views(batch)
  if not names:
    raise KeyError("view_mask_overlay_images needs a training batch with at least one "
                   f"'<view>/masks' map; got keys {sorted(batch)}.")
  n = min(max_images, len(batch[names[0]]))
  return side_by_side(*[overlay(np.asarray(batch[v][:n]),
                                np.asarray(batch[B.key(v, "masks")][:n])) for v in names])


POSITIVE, NEGATIVE = (40, 220, 40), (230, 40, 40)   # box outline colours (RGB)


def draw_boxes(images: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Outline boxes [N, K, 4] (y0, x0, y1, x1 pixels) on uint8 images [N, H, W, 3]: the first
  box of each image (MaskCo's positive / masked box) green, the others red; invalid
  boxes (valid False) are not drawn."""
  out = to_uint8(images).copy()
  h, w = out.shape[1:3]
  for i, (bs, ok) in enumerate(zip(np.asarray(boxes), np.asarray(valid, bool))):
    for j in reversed(range(len(bs))):       # the positive last, on top
      if not ok[j]:
        continue
      y0, x0 = (int(np.clip(np.floor(v), 0, n - 1)) for v, n in zip(bs[j][:2], (h, w)))
      y1, x1 = (int(np.clip(np.ceil(v) - 1, 0, n - 1)) for v, n in zip(bs[j][2:], (h, w)))
      color = POSITIVE if j == 0 else NEGATIVE
      out[i, y0:y1 + 1, [x0, x1]] = color
      out[i, [y0, y1], x0:x1 + 1] = color
  return out


def view_box_images(batch: dict, max_images: int = 4) -> np.ndarray:
  """The training views that carry boxes, with their boxes outlined (draw_boxes), side by
  side in batch order: for MaskCo the query view with its zeroed masked box, then the key
  view with its positive and negative boxes. For the trainer to log at the start."""
  names = [k for k in batch if B.key(k, "boxes") in batch]
  if not names:
    raise KeyError("view_box_images needs a training batch with at least one '<view>/boxes' "
                   f"array; got keys {sorted(batch)}.")
  n = min(max_images, len(batch[names[0]]))
  return side_by_side(*[draw_boxes(np.asarray(batch[v][:n]), batch[B.key(v, "boxes")][:n],
                                   batch[B.key(v, "boxes_valid")][:n]) for v in names])


def segmentation_panels(images: np.ndarray, ground_truth: np.ndarray,
                        *predictions: np.ndarray) -> np.ndarray:
  """Image | ground-truth classes | each prediction, one row per image (uint8)."""
  return side_by_side(to_uint8(images), label_map_colors(ground_truth),
                      *[label_map_colors(p) for p in predictions])
