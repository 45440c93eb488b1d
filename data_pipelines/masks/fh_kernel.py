"""A compiled (numba) Felzenszwalb-Huttenlocher that reproduces scikit-image exactly,
sharing the per-image work between scales.

scikit-image's felzenszwalb, per call: uint8 -> float64 image, Gaussian
smoothing, the 8-connected edge graph with Euclidean colour costs, an argsort
of the costs, then a union-find pass (merge while the edge is cheaper than
both components' internal difference + scale/size) and a second pass that
merges components smaller than min_size. Only the two passes depend on the
scale, so `segment_scales` computes the smoothing, the costs and the sort once
and runs the passes per scale.

Identity with scikit-image is by construction, not by approximation:
  * conversion and smoothing are scikit-image's own calls; the costs repeat
    numpy's float operations in the same order (bit-identical values);
  * the passes follow the same union-find (roots are component minima, joins
    keep the smaller root; path compression here only re-points non-roots),
    compare the double edge cost with the internal difference rounded to
    float32 as scikit-image's Cython does, and label components in raster
    order of their roots (= the sorted unique roots np.unique gives);
  * the edge order: scikit-image uses np.argsort (not stable), whose order of
    equal costs cannot be reproduced by another sort. This module sorts with a
    radix sort (stable, about 3x faster) and proves per image and scale that
    the order of equal costs cannot change the result (see `segment`); where
    it could, it falls back to np.argsort's order for that pass. On real photos
    the fallback is rare; on the flat-coloured demo scenes at 224 px it is
    needed for ~15% of images.
Measured speed: benchmarks/input_pipeline.py (ratio to scikit-image, one run).
tests/test_data_masks.py compares the maps exactly on several images and scales.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _find(forest, n):
  """Root of n (scikit-image's find_root), compressing the path on the way.

  Compression only re-points non-root nodes at their root (which stays the
  component's minimum), so every root, hence every decision, is unchanged.
  """
  root = n
  while forest[root] < root:
    root = forest[root]
  while forest[n] > root:
    nxt = forest[n]
    forest[n] = root
    n = nxt
  return root


@numba.njit(cache=True, nogil=True)
def _set_root(forest, n, root):
  while forest[n] < n:
    j = forest[n]
    forest[n] = root
    n = j
  forest[n] = root


@numba.njit(cache=True, nogil=True)
def _join(forest, n, m):
  if n != m:
    root = _find(forest, n)
    root_m = _find(forest, m)
    if root > root_m:
      root = root_m
    _set_root(forest, n, root)
    _set_root(forest, m, root)


@numba.njit(cache=True, nogil=True)
def _stable_order(costs):
  """The stable argsort of the float64 costs: radix by float32, then runs of equal
  float32 put in exact (cost, index) order by insertion sort (they arrive in
  index order, so runs of equal costs, e.g. the flat regions' zeros, cost nothing)."""
  order = _radix_order_f32(costs)
  n = order.shape[0]
  start = 0
  while start < n:
    end = start + 1
    hi = np.float32(costs[order[start]])
    while end < n and np.float32(costs[order[end]]) == hi:
      end += 1
    for e in range(start + 1, end):
      k = order[e]
      c = costs[k]
      j = e - 1
      while j >= start and (costs[order[j]] > c or (costs[order[j]] == c and order[j] > k)):
        order[j + 1] = order[j]
        j -= 1
      order[j + 1] = k
    start = end
  return order


@numba.njit(cache=True, nogil=True)
def _merge_pass(a, b, costs, num_pixels, scale):
  """Pass 1 on the sorted edges: (forest, size, edges left between components)."""
  forest = np.arange(num_pixels).astype(np.int32)
  size = np.ones(num_pixels, np.int32)
  cint = np.zeros(num_pixels, np.float64)
  left = np.empty(costs.shape[0], np.int32)
  n_left = 0
  for e in range(costs.shape[0]):
    s0 = _find(forest, a[e])
    s1 = _find(forest, b[e])
    if s0 == s1:
      continue
    ic0 = np.float32(cint[s0] + scale / size[s0])
    ic1 = np.float32(cint[s1] + scale / size[s1])
    if costs[e] < min(ic0, ic1):
      _join(forest, s0, s1)
      new = _find(forest, s0)
      size[new] = size[s0] + size[s1]
      cint[new] = costs[e]
    else:
      left[n_left] = e
      n_left += 1
  return forest, size, left[:n_left]


@numba.njit(cache=True, nogil=True)
def _run_is_order_free(pairs, size, npix, min_size):
  """Whether pass 2's merges within one run of equal costs are the same in any order.

  pairs: the distinct component pairs (lo * npix + hi) the run joins. A pair of
  two big components never merges (sizes only grow); a pair with a small
  component that is in no other pair always merges (that component is still
  small when its edge comes). If every pair is one or the other, the run's
  outcome is order-free; otherwise (a small component shared by pairs) it may not be.
  """
  n = pairs.shape[0]
  ends = np.empty(2 * n, np.int64)
  for q in range(n):
    ends[2 * q] = pairs[q] // npix
    ends[2 * q + 1] = pairs[q] % npix
  ends = np.sort(ends)
  for q in range(n):
    lo, hi = pairs[q] // npix, pairs[q] % npix
    small_lo, small_hi = size[lo] < min_size, size[hi] < min_size
    if not small_lo and not small_hi:
      continue                                        # never merges
    alone_lo = (np.searchsorted(ends, lo, side="right") - np.searchsorted(ends, lo)) == 1
    alone_hi = (np.searchsorted(ends, hi, side="right") - np.searchsorted(ends, hi)) == 1
    if (small_lo and alone_lo) or (small_hi and alone_hi):
      continue                                        # always merges
    return False
  return True


@numba.njit(cache=True, nogil=True)
def _small_pass_stable(a, b, costs, forest, size, left, min_size):
  """Pass 2 over `left` in the stable order, in place; False (state then
  undefined) as soon as a run of equal costs could be order-dependent
  (_run_is_order_free)."""
  n = left.shape[0]
  i = 0
  while i < n:
    j = i
    while j + 1 < n and costs[left[j + 1]] == costs[left[i]]:
      j += 1
    if j > i:                                   # a run of equal costs: check it first
      g = j - i + 1
      keys = np.empty(g, np.int64)
      m = 0
      small = False
      npix = forest.shape[0]
      for t in range(i, j + 1):
        r0 = _find(forest, a[left[t]])
        r1 = _find(forest, b[left[t]])
        if r0 != r1:
          keys[m] = min(r0, r1) * npix + max(r0, r1)
          m += 1
          small = small or size[r0] < min_size or size[r1] < min_size
      if small and m > 1 and not _run_is_order_free(np.unique(keys[:m]), size, npix,
                                                    min_size):
        return False
    for t in range(i, j + 1):
      _merge_if_small(forest, size, a[left[t]], b[left[t]], min_size)
    i = j + 1
  return True


@numba.njit(cache=True, nogil=True)
def _labels(forest):
  """Component labels in raster order of their roots (int32)."""
  num_pixels = forest.shape[0]
  labels = np.full(num_pixels, -1, np.int32)
  out = np.empty(num_pixels, np.int32)
  nxt = 0
  for p in range(num_pixels):
    r = _find(forest, p)
    if labels[r] < 0:
      labels[r] = nxt
      nxt += 1
    out[p] = labels[r]
  return out


@numba.njit(cache=True, nogil=True)
def _small_pass(a, b, forest, size, min_size):
  """Pass 2 over every edge in the given (np.argsort) order, in place."""
  for e in range(a.shape[0]):
    _merge_if_small(forest, size, a[e], b[e], min_size)


@numba.njit(cache=True, nogil=True)
def _merge_if_small(forest, size, p, q, min_size):
  """Pass 2's step: join the components of p and q when either is under min_size."""
  s0 = _find(forest, p)
  s1 = _find(forest, q)
  if s0 != s1 and (size[s0] < min_size or size[s1] < min_size):
    _join(forest, s0, s1)
    size[_find(forest, s0)] = size[s0] + size[s1]


@numba.njit(cache=True, nogil=True)
def _edge_costs(image):
  """(cost, first pixel, second pixel) of every edge, in scikit-image's edge
  numbering and pixel order. Costs use numpy's float operations (difference,
  square, sum over channels in order, sqrt), so they are bit-identical to
  scikit-image's."""
  h, w, ch = image.shape
  n = h * (w - 1) + (h - 1) * w + 2 * (h - 1) * (w - 1)
  out = np.empty(n, np.float64)
  ends0 = np.empty(n, np.int32)
  ends1 = np.empty(n, np.int32)
  k = 0
  for block in range(4):
    if block == 0:      # right: (r, c+1) - (r, c)
      rows, cols, r0, c0, r1, c1 = h, w - 1, 0, 1, 0, 0
    elif block == 1:    # down: (r+1, c) - (r, c)
      rows, cols, r0, c0, r1, c1 = h - 1, w, 1, 0, 0, 0
    elif block == 2:    # down-right: (r+1, c+1) - (r, c)
      rows, cols, r0, c0, r1, c1 = h - 1, w - 1, 1, 1, 0, 0
    else:               # up-right: (r+1, c) - (r, c+1)
      rows, cols, r0, c0, r1, c1 = h - 1, w - 1, 1, 0, 0, 1
    for r in range(rows):
      for c in range(cols):
        acc = 0.0
        for q in range(ch):
          d = image[r + r0, c + c0, q] - image[r + r1, c + c1, q]
          acc += d * d
        out[k] = np.sqrt(acc)
        ends0[k] = (r + r0) * w + c + c0
        ends1[k] = (r + r1) * w + c + c1
        k += 1
  return out, ends0, ends1


@numba.njit(cache=True, nogil=True)
def _radix_order_f32(costs):
  """Indices sorted stably by float32(cost) (costs >= 0): three 11-bit LSD radix passes."""
  n = costs.shape[0]
  keys = np.empty(n, np.uint32)
  for i in range(n):
    keys[i] = np.uint32(np.float32(costs[i]).view(np.uint32))
  idx = np.arange(n).astype(np.int32)
  tmp = np.empty(n, np.int32)
  for shift in (0, 11, 22):
    count = np.zeros(2049, np.int64)
    for i in range(n):
      count[((keys[i] >> shift) & 0x7FF) + 1] += 1
    if count.max() == n:           # one bucket holds everything: already ordered
      continue
    for d in range(2048):
      count[d + 1] += count[d]
    for i in range(n):
      j = idx[i]
      dgt = (keys[j] >> shift) & 0x7FF
      tmp[count[dgt]] = j
      count[dgt] += 1
    idx, tmp = tmp, idx
  return idx


def smoothed_edges(image: np.ndarray, sigma: float):
  """(edge costs, first pixels, second pixels, height, width): scikit-image's
  conversion and smoothing calls, then the edges as above."""
  from skimage.filters import gaussian
  from skimage.util import img_as_float64
  image = img_as_float64(np.atleast_3d(image))
  image = gaussian(image, sigma=[sigma, sigma, 0], mode="reflect", channel_axis=-1)
  costs, a, b = _edge_costs(np.ascontiguousarray(image))
  return costs, a, b, image.shape[0], image.shape[1]


class EdgeGraph:
  """The sorted edge graph of one image, shared by every scale.

  `stable` is sorted by (cost, edge number); `numpy` (made only when needed)
  is np.argsort's order, the one scikit-image uses. They differ only in the
  order of equal costs.
  """

  def __init__(self, image, sigma):
    self.costs, self._a, self._b, self.height, self.width = smoothed_edges(image, sigma)
    self.stable = self._sorted(_stable_order(self.costs))
    self._numpy = None

  def _sorted(self, order):
    return self._a[order], self._b[order], self.costs[order]

  @property
  def numpy(self):
    if self._numpy is None:
      self._numpy = self._sorted(np.argsort(self.costs))
    return self._numpy


def segment(graph: EdgeGraph, scale: float, min_size: int) -> np.ndarray:
  """One scale on a shared graph; see the module docstring for why it equals scikit-image.

  Pass 1 runs on the stable order: its outcome does not depend on the order of
  equal costs (within a run of equal cost w, a component merges iff it is an
  original one whose threshold exceeds w, or one merged in this run, whose
  threshold is w + scale/size > w; so the run joins exactly the connected
  groups of accepting components). That holds while scale/size survives the
  float32 rounding of the threshold, which is checked. Pass 2 does depend on
  that order only when a run of equal costs joins a component smaller than
  min_size to more than one other (whichever edge comes first may merge and
  change the others' decisions); each run is checked (_run_is_order_free) and,
  for such a run, pass 2 is redone on np.argsort's order, as scikit-image's.
  """
  num_pixels = graph.height * graph.width
  k = float(scale) / 255.0
  a, b, costs = graph.stable
  if k / num_pixels <= 2.0 ** -21 * max(1.0, 2.0 * float(costs[-1])):
    a, b, costs = graph.numpy          # tiny scale: run both passes in scikit-image's order
  forest, size, left = _merge_pass(a, b, costs, num_pixels, k)
  f2, s2 = forest.copy(), size.copy()
  if not _small_pass_stable(a, b, costs, f2, s2, left, int(min_size)):
    a, b, _ = graph.numpy
    f2, s2 = forest, size
    _small_pass(a, b, f2, s2, int(min_size))
  return _labels(f2).reshape(graph.height, graph.width)


def segment_scales(image: np.ndarray, scales, min_sizes, sigma: float) -> list[np.ndarray]:
  """FH id maps (int32, ids in raster order of first appearance) for each
  (scale, min_size), identical to skimage.segmentation.felzenszwalb's."""
  graph = EdgeGraph(image, sigma)
  return [segment(graph, s, m) for s, m in zip(scales, min_sizes)]
