"""Tiled backgrounds (background augmentations, Ryali et al. 2021 sec. 2.2): one per image,
computed once at build time and stored in the records ('background/encoded').

The foreground (the stored saliency map > BUILD_THRESHOLD, dilated by DILATE px so
object borders do not leak into it) is a hole filled from the surrounding background,
as the tiled backgrounds of Xiao et al. 2021 ("Only-BG-T"). The fill is OpenCV's
fast-marching inpainting (Telea 2004, cv2.INPAINT_TELEA): one pass over the hole with
no iteration settings, 2.1 ms per 96 px demo image (Navier-Stokes inpainting 1.8 ms,
equal within the noise of a shared CPU; the saliency detector itself 2.8 ms:
benchmarks/masks_background.py), so the build cost stays small; and unlike tiling the
largest background rectangle (METHODS['tile'], Xiao et al.'s own fill, kept for the
comparison) it needs no rectangle search, which finds only thin strips on the demo,
whose main object spans 76-96% of the side: tiling one is x2.4-2.8 Telea's time,
doubles the error against the hidden photo and repeats whatever the saliency missed
across the hole (`benchmarks/masks_background.py --tb_dir=DIR` shows it). The hole
threshold is fixed at build time and generous: it holds the train-time foreground
(saliency > config.data.foreground_threshold) for any threshold >= it (background.
check_hole warns below). An image without
background (hole = whole image) gets its mean colour; one without foreground is
its own background.
"""
from __future__ import annotations

import cv2
import numpy as np

BUILD_THRESHOLD = 0.2   # saliency > this is the hole: generous (the demo config's foreground threshold)
DILATE = 2              # px the hole grows by (3x3 dilations)
RADIUS = 3              # inpainting neighbourhood radius in px


def largest_rectangle(free: np.ndarray) -> tuple[int, int, int, int]:
  """(y, x, h, w) of the largest axis-aligned rectangle of True in free [H, W] (0 size
  when none): for each top row, the columns free down to each lower row, and the
  longest run of them per row (cumulative sums reset at False), vectorised; O(H^2 W)."""
  height, width = free.shape
  best, box = 0, (0, 0, 0, 0)
  for y in range(height):
    cols = np.logical_and.accumulate(free[y:], axis=0)                 # rows y..y+i free
    c = np.cumsum(cols, axis=1)
    run = c - np.maximum.accumulate(np.where(cols, 0, c), axis=1)      # run ending at x
    area = run * np.arange(1, height - y + 1)[:, None]
    i, x = divmod(int(np.argmax(area)), width)
    if area[i, x] > best:
      best, box = int(area[i, x]), (y, x - int(run[i, x]) + 1, i + 1, int(run[i, x]))
  return box


def tile(image: np.ndarray, m: np.ndarray) -> np.ndarray:
  """The hole filled with the largest background rectangle, repeated from its corner
  (the tiling of Xiao et al. 2021's Only-BG-T)."""
  y, x, h, w = largest_rectangle(m == 0)
  rows, cols = (np.arange(image.shape[0]) - y) % h, (np.arange(image.shape[1]) - x) % w
  tiles = image[y:y + h, x:x + w][rows[:, None], cols[None, :]]
  return np.where(m[..., None] > 0, tiles, image)


def _inpaint(flag):
  return lambda image, m: cv2.inpaint(image, m, RADIUS, flag)


# name -> fill(image uint8 [H, W, 3], hole uint8 [H, W] with some 0 and some 1) -> uint8
METHODS = {"telea": _inpaint(cv2.INPAINT_TELEA), "ns": _inpaint(cv2.INPAINT_NS), "tile": tile}
DEFAULT = "telea"


def hole(saliency: np.ndarray, threshold: float = BUILD_THRESHOLD,
         dilate: int = DILATE) -> np.ndarray:
  """uint8 {0, 1} [H, W]: the binarised saliency (float [0, 1] or uint8), dilated."""
  sal = np.asarray(saliency)
  sal = sal.astype(np.float32) / 255.0 if sal.dtype == np.uint8 else sal.astype(np.float32)
  m = (sal > threshold).astype(np.uint8)
  if dilate:
    m = cv2.dilate(m, np.ones((3, 3), np.uint8), iterations=int(dilate))
  return m


def tiled(image: np.ndarray, saliency: np.ndarray, method: str = DEFAULT,
          threshold: float = BUILD_THRESHOLD) -> np.ndarray:
  """uint8 [H, W, 3]: the image with its foreground filled from the background."""
  if method not in METHODS:
    raise ValueError(f"Unknown background fill {method!r}; choose one of {sorted(METHODS)}.")
  image = np.ascontiguousarray(image, np.uint8)
  m = hole(saliency, threshold)
  if not m.any():
    return image.copy()
  if m.all():
    return np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8),
                           image.shape).copy()
  return METHODS[method](image, m)


def describe(method: str = DEFAULT) -> dict:
  return dict(method=method, threshold=BUILD_THRESHOLD, dilate=DILATE, radius=RADIUS)
