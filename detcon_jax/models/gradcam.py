"""Grad-CAM of an embedding match, and the align-corners resize its maps go through.

Shared by CAST's attention loss (objectives/cast.py, differentiated through: second
order) and the grounding evaluation (evaluate/gradcam.py): both read where the
network looks when its query matches a key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GRADCAM_NORMS = ("minmax", "none")
EPS_MINMAX = 1e-7          # CAST's reference Grad-CAM normalisation


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] bilinear interpolation weights with align_corners=True (PyTorch's
  F.interpolate): output i samples input position i * (n_in - 1) / (n_out - 1)."""
  pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  w = np.zeros((n_out, n_in), np.float32)
  np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(w, (np.arange(n_out), hi), frac)
  return w


def resize_align_corners(x, height: int, width: int):
  """[B, H, W] -> [B, height, width], bilinear with align_corners=True."""
  wh = jnp.asarray(align_corners_matrix(x.shape[1], height))
  ww = jnp.asarray(align_corners_matrix(x.shape[2], width))
  return jnp.einsum("ih,bhw,jw->bij", wh, x.astype(jnp.float32), ww)


def grad_cam(head, maps, keys, *, temperature: float = 1.0, norm: str = "minmax"):
  """Grad-CAM of matching `keys`: [B, h, w, C] maps -> [B, h, w].

  head maps A to the query embedding (here: pool, projector, l2-normalise); G =
  d(sum_b q_b . k_b / temperature) / dA, which is per image when the head treats
  images independently; alpha = spatial mean of G; ReLU(sum_c alpha_c A_c);
  norm='minmax' then rescales each map to [0, 1] (the reference). Differentiable
  in maps and in the head's parameters (second order).
  """
  dtype = jnp.promote_types(maps.dtype, jnp.float32)       # bfloat16 maps: float32 math
  grads = jax.grad(lambda a: jnp.sum(head(a) * keys) / temperature)(maps)
  alpha = jnp.mean(grads.astype(dtype), axis=(1, 2))                           # [B, C]
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", maps.astype(dtype), alpha))
  if norm == "minmax":
    cam = cam - jnp.min(cam, axis=(1, 2), keepdims=True)
    cam = cam / (jnp.max(cam, axis=(1, 2), keepdims=True) + EPS_MINMAX)
  return cam
