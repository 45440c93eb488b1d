"""RoI align (He et al. 2017, Mask R-CNN) in JAX, torchvision.ops.roi_align's numbers.

torchvision's semantics with aligned=True and a fixed sampling_ratio: a box
(in image pixels, times spatial_scale, minus half a cell) is divided into
output_size bins; each bin averages sampling_ratio x sampling_ratio bilinear
samples at the centres of a regular sub-grid; a sample more than one cell
outside the map contributes 0, one within a cell of the border is clamped to
it. (torchvision's adaptive sampling_ratio=0 has data-dependent shapes and is
not offered: jit needs static shapes.)

Bilinear sampling on a box-aligned grid is separable: a bin's average is
sum_y sum_x Ay[bin_y, y] Ax[bin_x, x] F[y, x], where Ay and Ax hold the mean
row and column interpolation weights of the bin's samples. So RoI align is
two small weight matrices per box and one einsum: batched over images and
boxes, jit-able, and sharded on the batch axis like the features (every
image's boxes stay with its features).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_weights(start, end, bins: int, ratio: int, length: int):
  """[..., bins, length]: mean interpolation weights of each bin's samples along one axis.

  start, end [...] box edges in feature-cell coordinates (already shifted by -0.5).
  """
  bin_size = (end - start) / bins
  offsets = (jnp.arange(bins)[:, None] + (jnp.arange(ratio)[None, :] + 0.5) / ratio)  # [bins, r]
  pos = start[..., None, None] + offsets * bin_size[..., None, None]               # [..., bins, r]
  inside = (pos >= -1.0) & (pos <= length)
  pos = jnp.maximum(pos, 0.0)
  low = jnp.floor(pos).astype(jnp.int32)
  at_end = low >= length - 1
  low = jnp.where(at_end, length - 1, low)
  high = jnp.where(at_end, length - 1, low + 1)
  pos = jnp.where(at_end, low.astype(pos.dtype), pos)
  frac = pos - low
  cells = jnp.arange(length)
  w = ((1.0 - frac)[..., None] * (cells == low[..., None]) +
       frac[..., None] * (cells == high[..., None]))                               # [..., bins, r, L]
  w = jnp.where(inside[..., None], w, 0.0)
  return jnp.mean(w, axis=-2)


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int | tuple[int, int],
              spatial_scale: float, sampling_ratio: int = 2, aligned: bool = True) -> jax.Array:
  """features [B, H, W, C], boxes [B, K, 4] (y0, x0, y1, x1) image pixels -> [B, K, oh, ow, C].

  spatial_scale: feature cells per image pixel (1 / stride). Equal to
  torchvision.ops.roi_align(features NCHW, [(b, x0, y0, x1, y1)], output_size,
  spatial_scale, sampling_ratio, aligned) for sampling_ratio >= 1.
  """
  oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
  if sampling_ratio < 1:
    raise ValueError(f"roi_align: sampling_ratio={sampling_ratio} must be >= 1 (the adaptive "
                     "0 of torchvision has data-dependent shapes).")
  _, h, w, _ = features.shape
  b = boxes.astype(jnp.float32) * spatial_scale - (0.5 if aligned else 0.0)
  y0, x0, y1, x1 = (b[..., i] for i in range(4))
  if not aligned:   # torchvision's legacy rule: boxes at least one cell
    y1, x1 = y0 + jnp.maximum(y1 - y0, 1.0), x0 + jnp.maximum(x1 - x0, 1.0)
  ay = _axis_weights(y0, y1, oh, sampling_ratio, h)                 # [B, K, oh, H]
  ax = _axis_weights(x0, x1, ow, sampling_ratio, w)                 # [B, K, ow, W]
  return jnp.einsum("bkph,bkqw,bhwc->bkpqc", ay, ax, features.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
