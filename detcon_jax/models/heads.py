"""Projector/predictor MLP, mask pooling (DetCon section 3.1), MaskCo's mask prediction head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from detcon_jax.models import resnet


class MLP(nn.Module):
  """Linear-BN-ReLU-Linear, as the BYOL/DetCon reference heads.

  Works on [N, D], [B, K, D], [B, V, K, D]: batch norm reduces over every
  leading dim, so the statistics of mask latents span all masks of all views
  of all images (and, under jit on a sharded global array, the global batch).
  batch_norm=False gives MoCo v2's Linear-ReLU-Linear (with biases, as its
  reference head).
  """
  hidden_dim: int
  output_dim: int
  dtype: Any = jnp.float32
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name="bn1")(x)
    x = nn.relu(x)
    return nn.Dense(self.output_dim, use_bias=not self.batch_norm, dtype=self.dtype,
                    name="fc2")(x)


def downsample_masks(id_map: jax.Array, mask_ids: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Binary masks `id_map == id`, average-pooled to `grid`: [B, H, W], [B, K] -> [B, h, w, K].

  Each grid cell holds the fraction of its pixels carrying the id. The
  compare-convert-mean is one fusion under jit, so the [B, H, W, K] masks are
  never materialised (at 224 px only the [B, 7, 7, K] result is).
  """
  b, hh, ww = id_map.shape
  h, w = grid
  if hh % h or ww % w:
    raise ValueError(f"Mask id map {hh}x{ww} is not a multiple of the feature grid {h}x{w}; "
                     "masks must have the image's size (a multiple of the network stride).")
  blocks = id_map.reshape(b, h, hh // h, w, ww // w)
  hits = blocks[..., None] == mask_ids[:, None, None, None, None, :]
  return jnp.mean(hits, axis=(2, 4), dtype=jnp.float32)


def mask_pool(features: jax.Array, id_map: jax.Array, mask_ids: jax.Array):
  """Area-normalised average of `features` under each mask (DetCon's h_m).

  features [B, h, w, C], id_map [B, H, W] int (H, W multiples of h, w),
  mask_ids [B, K] int -> (pooled [B, K, C] float32, area [B, K] float32),
  area being the fraction of the image covered by the id. A mask id absent
  from the image pools to a zero vector with area 0 (no NaN, zero gradient).
  """
  masks = downsample_masks(id_map, mask_ids, features.shape[1:3])        # [B, h, w, K]
  mass = jnp.sum(masks, axis=(1, 2))                                     # [B, K] in cells
  total = jnp.einsum("bhwk,bhwc->bkc", masks, features.astype(jnp.float32))
  present = mass > 0
  pooled = total / jnp.where(present, mass, 1.0)[..., None]
  area = mass / (features.shape[1] * features.shape[2])
  return pooled, area


def global_pool(features: jax.Array) -> jax.Array:
  """Mean over the spatial grid: [B, h, w, C] -> [B, C] float32 (a single global mask)."""
  return jnp.mean(features.astype(jnp.float32), axis=(1, 2))


class MaskPredictionHead(nn.Module):
  """MaskCo's MPH (Zhao et al. 2021, section 3.3): `blocks` bottleneck residual blocks
  (1x1-3x3-1x1, the shape of ResNet-50's last stage: width C / 4, stride 1, identity
  shortcut) on the final C-channel feature map; blocks=0 is no head (Table 4's row 0).

  It sits between the backbone and RoI align in the query and momentum
  encoders and is not part of the exported backbone.
  """
  blocks: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.blocks):
      x = resnet._Block("bottleneck", x.shape[-1] // 4, 1, False, self.dtype,  # pylint: disable=protected-access
                        name=f"block{i}")(x, train)
    return x
