"""Felzenszwalb-Huttenlocher graph segmentation (DetCon section 3.2).

The paper uses scale s in {500, 1000, 1500}, min_size = s, sigma = 0.8 on
images of ~224 px and more. FH's merge threshold is scale / |component|, so the
same scale on a smaller image yields far fewer segments: on demo scenes at 96 px
the paper's scales give 5.1 / 2.7 / 1.8 segments on average, against 15.7 /
7.6 / 5.3 for the same scenes rendered at 224 px. `scales_for(image_size)`
rescales by (image_size / 224)^1.4 (96 px -> 150, 310, 460), which restores the
224 px counts (15.2 / 8.1 / 5.5 measured); pure area scaling (^2) overshoots
(22.8 / 12.6 / 8.5). The demo build uses it; real data keeps PAPER_SCALES.

Backend 'skimage' (default) means scikit-image's segmentation: the maps are
exactly skimage.segmentation.felzenszwalb's. With numba installed they come
from fh_kernel.py, a compiled version that shares smoothing, edge graph and
sort between the scales of one image and gives identical maps several times
faster (`compute_scales`); without numba, from scikit-image itself.

OpenCV's createGraphSegmentation
(opencv-contrib, 2-3.5x faster). They are NOT equivalent: on demo images and at
224 px with the paper's scales, benchmarks/input_pipeline.py measures an
adjusted Rand index of only ~0.66-0.80 between them, average best overlap
~0.6-0.7, no identical maps, with similar segment counts. So OpenCV is an
explicit opt-in (--fh_backend=opencv, recorded in the manifest), never a
silent substitute.
"""
from __future__ import annotations

import cv2
import numpy as np

PAPER_SCALES = (500, 1000, 1500)
PAPER_SIGMA = 0.8
REFERENCE_SIZE = 224
SCALE_EXPONENT = 1.4        # calibrated on demo scenes, see above
BACKENDS = ("skimage", "opencv")


def scales_for(image_size: int) -> tuple[int, ...]:
  """Paper scales for an image of side `image_size`, matching 224 px segment counts."""
  ratio = (image_size / REFERENCE_SIZE) ** SCALE_EXPONENT
  return tuple(max(10, int(round(s * ratio / 10.0)) * 10) for s in PAPER_SCALES)


def name(scale: int) -> str:
  return f"fh_s{scale}"


def _kernel():
  """fh_kernel if numba imports (and DETCON_FH_KERNEL is not 0), else None."""
  import os
  if os.environ.get("DETCON_FH_KERNEL", "1") == "0":
    return None
  try:
    from data_pipelines.masks import fh_kernel
  except ImportError:
    return None
  return fh_kernel


def compute_scales(image: np.ndarray, scales, sigma: float = PAPER_SIGMA, min_sizes=None,
                   backend: str = "skimage") -> list[np.ndarray]:
  """FH id maps for several scales of one image (work shared between them)."""
  min_sizes = list(scales) if min_sizes is None else list(min_sizes)
  kernel = _kernel() if backend == "skimage" else None
  image = np.asarray(image)
  if kernel is not None and image.ndim == 3 and min(image.shape[:2]) >= 2:
    return kernel.segment_scales(image, scales, min_sizes, sigma)
  return [compute(image, s, sigma, m, backend, _kernel_ok=False)
          for s, m in zip(scales, min_sizes)]


def compute(image: np.ndarray, scale: float = 1000, sigma: float = PAPER_SIGMA,
            min_size: int | None = None, backend: str = "skimage",
            _kernel_ok: bool = True) -> np.ndarray:
  """FH id map (int32, ids 0..n-1) of a uint8 RGB image; min_size defaults to scale."""
  min_size = int(scale if min_size is None else min_size)
  if backend == "skimage" and _kernel_ok:
    return compute_scales(image, [scale], sigma, [min_size])[0]
  if backend == "skimage":
    from skimage.segmentation import felzenszwalb
    seg = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
  elif backend == "opencv":
    make = cv2.ximgproc.segmentation.createGraphSegmentation   # contrib, a core dependency
    seg = make(sigma=sigma, k=float(scale), min_size=min_size).processImage(
        np.ascontiguousarray(image[..., ::-1]))     # OpenCV expects BGR
  else:
    raise ValueError(f"Unknown FH backend {backend!r}; choose one of {BACKENDS}.")
  # Relabel to consecutive ids in raster order, so both backends are comparable.
  _, ids = np.unique(seg, return_inverse=True)
  return ids.reshape(seg.shape).astype(np.int32)
