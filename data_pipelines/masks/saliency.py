"""Unsupervised saliency detectors that need no download; one map per image, stored in records.

CAST (Selvaraju et al. 2021) samples crops and supervises Grad-CAM with a
saliency map per image. Its maps came from DeepUSPS, a network trained on the
pseudo-labels of hand-crafted detectors; here the hand-crafted detectors
themselves give the map, computed once at build time:

  'mbd'       minimum barrier distance to the image border (Zhang et al., ICCV
              2015, "Minimum Barrier Salient Object Detection at 80 FPS"):
              FastMBD raster scans per Lab channel, plus the paper's MB+
              post-processing (border-contrast backgroundness, morphological
              smoothing by reconstruction, centre bias, sigmoid contrast).
  'spectral'  spectral residual (Hou & Zhang, CVPR 2007) from OpenCV contrib,
              per Lab channel (OpenCV's own is grayscale only: colour=False).
  'geodesic'  geodesic distance from the border over colour gradients
              (scikit-image's minimum-cost paths; Wei et al., ECCV 2012).

Every detector returns float32 [H, W] min-max normalised to [0, 1] (a flat
map is all zeros); records store it as 8-bit PNG (records.encode_saliency).
The default is 'mbd': the best AUC and F-measure on the demo's ground truth and
fast enough (benchmarks/masks_saliency.py; docs/data.md). `foreground(map, threshold)` is
the binarised foreground that configs threshold with
config.data.foreground_threshold.
"""
from __future__ import annotations

import cv2
import numba
import numpy as np

DEFAULT = "mbd"
MBD_PASSES = 3            # FastMBD: forward, backward, forward raster scans (paper: 3)
MBD_BORDER = 0.1          # MB+: border regions are 10% of the side (30 px at 300 px)
MBD_MORPH_ALPHA = 50.0    # MB+: smoothing radius = alpha * sqrt(mean saliency) (at 300 px)
MBD_SIGMOID_B = 10.0      # MB+: contrast enhancement 1 / (1 + exp(-b (x - 0.5)))
MBD_WORK_SIDE = 300       # MB+ works on images resized to at most 300 px


def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _lab(image: np.ndarray) -> np.ndarray:
  """float32 CIE Lab of a uint8 RGB image (OpenCV's, L in [0, 100])."""
  return cv2.cvtColor(np.asarray(image, np.float32) / 255.0, cv2.COLOR_RGB2Lab)


# --- Minimum barrier distance ------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _mbd_scans(channel, passes):
  """FastMBD (Algorithm 1 of Zhang et al.): barrier distance of every pixel to the
  border, by raster scans that relax each pixel from its already-scanned 4-neighbours."""
  h, w = channel.shape
  d = np.full((h, w), np.inf, np.float32)
  up, lo = channel.copy(), channel.copy()
  for y in range(h):
    d[y, 0] = d[y, w - 1] = 0.0
  for x in range(w):
    d[0, x] = d[h - 1, x] = 0.0
  for p in range(passes):
    fwd = p % 2 == 0
    for yi in range(1, h - 1):
      y = yi if fwd else h - 1 - yi
      for xi in range(1, w - 1):
        x = xi if fwd else w - 1 - xi
        v = channel[y, x]
        for k in range(2):
          if fwd:
            ny, nx = (y - 1, x) if k == 0 else (y, x - 1)
          else:
            ny, nx = (y + 1, x) if k == 0 else (y, x + 1)
          u, l = max(up[ny, nx], v), min(lo[ny, nx], v)
          if u - l < d[y, x]:
            d[y, x], up[y, x], lo[y, x] = u - l, u, l
  return d


def _border_contrast(lab: np.ndarray, frac: float = MBD_BORDER) -> np.ndarray:
  """MB+ backgroundness: per border region (top, bottom, left, right), the Mahalanobis
  colour distance of each pixel to the region; summed, minus the largest (one border
  may touch the object)."""
  h, w, _ = lab.shape
  r = max(1, int(round(frac * min(h, w))))
  flat = lab.reshape(-1, 3)
  maps = []
  for region in (lab[:r], lab[-r:], lab[:, :r], lab[:, -r:]):
    px = region.reshape(-1, 3).astype(np.float64)
    cov = np.cov(px, rowvar=False) + 1e-3 * np.eye(3)
    whiten = np.linalg.cholesky(np.linalg.inv(cov)).astype(np.float32)   # W W^T = cov^-1
    z = (flat - px.mean(0).astype(np.float32)) @ whiten
    maps.append(_normalise(np.sqrt((z * z).sum(1)).reshape(h, w)))
  maps = np.stack(maps)
  return maps.sum(0) - maps.max(0)


@numba.njit(cache=True, nogil=True)
def _reconstruct(marker, mask):
  """Grayscale reconstruction by dilation of marker under mask (8-connected), by
  Vincent's (1993) hybrid algorithm: a forward and a backward raster pass, then a
  FIFO propagation from the pixels the backward pass left unstable."""
  h, w = mask.shape
  j = np.minimum(marker, mask)
  for y in range(h):
    for x in range(w):
      v = j[y, x]
      for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
        ny, nx = y + dy, x + dx
        if 0 <= ny and 0 <= nx < w and j[ny, nx] > v:
          v = j[ny, nx]
      j[y, x] = min(v, mask[y, x])
  queue = np.empty(h * w * 8 + 1, np.int64)
  head = tail = 0
  for y in range(h - 1, -1, -1):
    for x in range(w - 1, -1, -1):
      v = j[y, x]
      for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
        ny, nx = y + dy, x + dx
        if ny < h and 0 <= nx < w and j[ny, nx] > v:
          v = j[ny, nx]
      j[y, x] = min(v, mask[y, x])
      for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
        ny, nx = y + dy, x + dx
        if ny < h and 0 <= nx < w and j[ny, nx] < j[y, x] and j[ny, nx] < mask[ny, nx]:
          queue[tail] = y * w + x
          tail += 1
          break
  while head < tail:
    p = queue[head]
    head += 1
    y, x = p // w, p % w
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        ny, nx = y + dy, x + dx
        if 0 <= ny < h and 0 <= nx < w and j[ny, nx] < j[y, x] and j[ny, nx] != mask[ny, nx]:
          j[ny, nx] = min(j[y, x], mask[ny, nx])
          if tail == queue.shape[0]:           # compact the queue (never in practice)
            queue[:tail - head] = queue[head:tail]
            tail, head = tail - head, 0
          queue[tail] = ny * w + nx
          tail += 1
  return j


def _smooth_by_reconstruction(sal: np.ndarray, radius: int) -> np.ndarray:
  """Opening then closing by reconstruction (MB+'s morphological smoothing)."""
  if radius < 1:
    return sal
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
  sal = np.ascontiguousarray(sal, np.float32)
  opened = _reconstruct(cv2.erode(sal, kernel), sal)
  return -_reconstruct(-cv2.dilate(opened, kernel), -opened)


def mbd(image: np.ndarray, passes: int = MBD_PASSES, plus: bool = True) -> np.ndarray:
  """MB (plus=False: summed per-channel barrier distances) or MB+ saliency of uint8 RGB."""
  h, w = image.shape[:2]
  scale = min(1.0, MBD_WORK_SIDE / max(h, w))
  small = image if scale == 1.0 else cv2.resize(
      image, (max(3, round(w * scale)), max(3, round(h * scale))), interpolation=cv2.INTER_AREA)
  lab = _lab(small)
  sal = _normalise(sum(_mbd_scans(np.ascontiguousarray(lab[..., c]), passes) for c in range(3)))
  if plus:
    sal = _normalise(sal + _border_contrast(lab))
    side = max(small.shape[:2])
    radius = int(round(MBD_MORPH_ALPHA * np.sqrt(sal.mean()) * side / MBD_WORK_SIDE))
    sal = _normalise(_smooth_by_reconstruction(sal, radius))
    yy, xx = np.mgrid[0:sal.shape[0], 0:sal.shape[1]].astype(np.float32)
    cy, cx = (sal.shape[0] - 1) / 2, (sal.shape[1] - 1) / 2
    centre = 1 - np.hypot(yy - cy, xx - cx) / np.hypot(cy + 0.5, cx + 0.5)
    sal = _normalise(sal * centre)
    sal = 1 / (1 + np.exp(-MBD_SIGMOID_B * (sal - 0.5)))
  if scale != 1.0:
    sal = cv2.resize(sal.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
  return _normalise(sal)


# --- Spectral residual ---------------------------------------------------------

def spectral(image: np.ndarray, colour: bool = True) -> np.ndarray:
  """Spectral residual saliency from OpenCV contrib (on a 64 x 64 thumbnail).

  OpenCV's detector sees only the grayscale image, where a red object on a grey
  field can vanish; colour=True (default) runs it on each Lab channel and sums
  the maps, a common colour extension of Hou & Zhang. colour=False: OpenCV's map.
  """
  det = cv2.saliency.StaticSaliencySpectralResidual_create()   # contrib, a core dependency
  if colour:
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2Lab)
    planes = [np.ascontiguousarray(lab[..., c]) for c in range(3)]
  else:
    planes = [cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)]
  total = 0.0
  for plane in planes:
    ok, sal = det.computeSaliency(plane)
    if not ok:
      raise ValueError("OpenCV spectral residual saliency failed on this image.")
    total = total + sal
  return _normalise(total)


# --- Geodesic distance from the border ---------------------------------------

def geodesic(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  """Least cumulative colour-gradient cost from any border pixel (scikit-image MCP)."""
  from skimage import filters, graph
  lab = _lab(image)
  grad = np.sqrt(sum(filters.sobel(filters.gaussian(lab[..., c], sigma)) ** 2 for c in range(3)))
  h, w = grad.shape
  border = [(y, x) for y in range(h) for x in (0, w - 1)] + \
           [(y, x) for x in range(1, w - 1) for y in (0, h - 1)]
  dist, _ = graph.MCP_Geometric(grad + 1e-3 * grad.mean() + 1e-6).find_costs(border)
  return _normalise(dist)


REGISTRY = {"mbd": mbd, "spectral": spectral, "geodesic": geodesic}


def detector(name: str):
  if name not in REGISTRY:
    raise ValueError(f"Unknown saliency detector {name!r}; choose one of {sorted(REGISTRY)} "
                     "(--saliency=...).")
  return REGISTRY[name]


def compute(image: np.ndarray, name: str = DEFAULT) -> np.ndarray:
  """float32 [H, W] in [0, 1] saliency of a uint8 RGB image by detector `name`."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Saliency needs a uint8 RGB image [H, W, 3]; got {image.dtype} "
                     f"{image.shape}.")
  return detector(name)(image)


def describe(name: str) -> dict:
  """The manifest's 'saliency' entry: what made the stored maps and how they are stored."""
  detector(name)
  return dict(detector=name, encoding="8-bit grayscale PNG, min-max normalised per image",
              module="data_pipelines/masks/saliency.py")


def foreground(saliency, threshold: float = 0.5):
  """Binarised foreground: saliency > threshold (numpy or jax arrays), as float32."""
  return (saliency > threshold).astype(np.float32)
