"""ResNet v1.5 (18..200) in Flax linen, laid out exactly like torchvision.

Why torchvision's layout: the backbone is exported to `torchvision.models.
resnetNN()` (load_state_dict strict=True) for detection/segmentation transfer,
so every choice that changes numbers follows torchvision: conv1 7x7/2 with
explicit symmetric padding 3, BN, ReLU, max-pool 3x3/2 with padding 1 (padded
with -inf), stride on the 3x3 conv of the bottleneck (v1.5), 3x3 convs padded
((1, 1), (1, 1)) -- never 'SAME', which pads asymmetrically at stride 2 --,
1x1 projection shortcut + BN where the shape changes, no conv biases, BN eps
1e-5 and running-average momentum 0.9 (torch's 0.1), Kaiming-normal fan-out
conv init. `zero_init_residual` (default False, torchvision's default) sets
the last BN scale of each block to zero.

Naming, for a mechanical state-dict mapping (flax path -> torchvision key):
  conv1/kernel                     -> conv1.weight          (HWIO -> OIHW)
  bn1/{scale,bias}                 -> bn1.{weight,bias}
  bn1 batch_stats {mean,var}       -> bn1.running_{mean,var}
  layer{s}_{b}/conv{i}/kernel      -> layer{s}.{b}.conv{i}.weight
  layer{s}_{b}/bn{i}/...           -> layer{s}.{b}.bn{i}....
  layer{s}_{b}/downsample_conv     -> layer{s}.{b}.downsample.0.weight
  layer{s}_{b}/downsample_bn       -> layer{s}.{b}.downsample.1.*
(num_batches_tracked is torch-only; flax keeps the biased batch variance in
its running average where torch keeps the unbiased one.) There is no fc layer:
the encoder ends at the last stage.

Batch norm: under `jax.jit` over a global batch sharded on a Mesh, the batch
mean/variance are reductions over the global array, so statistics span the
whole global batch automatically (XLA inserts the all-reduce); no axis_name is
needed or used.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

STRIDE = 32  # total downsampling of the final feature map (torchvision layout)


def output_stride(stem_pool: bool = True) -> int:
  """Downsampling of 'stage4': 32, or 16 without the stem max-pool."""
  return STRIDE if stem_pool else STRIDE // 2

# depth -> (block kind, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torch kaiming_normal_


def normalize_images(x: jax.Array) -> jax.Array:
  """Images in [0, 1] (any leading dims, channels last) -> ImageNet-standardised."""
  mean = jnp.asarray(IMAGENET_MEAN, dtype=x.dtype)
  std = jnp.asarray(IMAGENET_STD, dtype=x.dtype)
  return (x - mean) / std


def _pad(k: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = k // 2
  return ((p, p), (p, p))


class _Block(nn.Module):
  """BasicBlock (two 3x3) or Bottleneck (1x1, 3x3 with the stride, 1x1 x4).

  `dilation` dilates (and pads by) the 3x3 convs; `carry_dilation` (default:
  the same) the one that carries the stride (basic: conv1, bottleneck: conv2).
  """
  kind: str
  planes: int
  stride: int
  zero_init_residual: bool
  dtype: Any
  dilation: int = 1
  carry_dilation: int | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    out_ch = self.planes * EXPANSION[self.kind]
    if self.kind == "basic":
      specs = [(self.planes, 3, self.stride), (out_ch, 3, 1)]
    else:
      specs = [(self.planes, 1, 1), (self.planes, 3, self.stride), (out_ch, 1, 1)]
    y = x
    carry = 1 if self.kind == "basic" else 2            # the conv that carries the stride
    for i, (ch, k, s) in enumerate(specs, start=1):
      d = 1 if k != 3 else (self.carry_dilation or self.dilation if i == carry else self.dilation)
      y = conv(ch, (k, k), strides=(s, s), padding=_pad(k) if d == 1 else ((d, d), (d, d)),
               kernel_dilation=(d, d), name=f"conv{i}")(y)
      last = i == len(specs)
      scale_init = nn.initializers.zeros if (last and self.zero_init_residual) else nn.initializers.ones
      y = norm(scale_init=scale_init, name=f"bn{i}")(y)
      if not last:
        y = nn.relu(y)
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = conv(out_ch, (1, 1), strides=(self.stride, self.stride), padding=((0, 0), (0, 0)),
               name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet-`depth` with all channels scaled by `width`; float32 params, `dtype` compute.

  __call__(x [N, H, W, 3] normalised images, train) -> dict of feature maps:
    'stem'   after conv1/bn1/relu (stride 2, before the max-pool),
    'stage1'..'stage4'  outputs of layer1..layer4 (strides 4, 8, 16, 32);
  'stage4' is the 7x7 map at 224 px. H and W must be multiples of the output stride.

  stem_pool=False drops the stem max-pool (output stride 16, stage maps twice
  as large, ~4x the stage FLOPs): for small images, where stride 32 leaves a
  2x2 map too coarse for mask pooling (as CIFAR-style ResNets do).

  dilate_last=True: the last stage keeps its input's resolution (stride 1) and
  dilates its 3x3 convs by 2, except the conv that would carry the stride (as
  torchvision's replace_stride_with_dilation for bottlenecks), so RN50 keeps
  output stride 16 for dense evaluation (Van Gansbeke et al. 2021, A.7). This
  is the a-trous form of the same network: in inference mode its map at even
  positions equals the undilated map. Same parameters: a trained encoder runs
  dilated unchanged.

  remat=True rematerialises each block (flax nn.remat): the backward pass keeps
  only the blocks' inputs and recomputes their insides, trading about one more
  forward pass of FLOPs for less activation memory (launch/plan.py shows both).
  Same parameters, names and values.
  """
  depth: int = 50
  width: float = 1.0
  zero_init_residual: bool = False
  stem_pool: bool = True
  dtype: Any = jnp.float32
  dilate_last: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.depth not in DEPTHS:
      raise ValueError(f"Unsupported ResNet depth {self.depth}; choose one of {sorted(DEPTHS)} "
                       "(config.model.depth).")
    if self.width <= 0:
      raise ValueError(f"config.model.width must be positive, got {self.width}.")
    stride = output_stride(self.stem_pool)
    if x.ndim != 4 or x.shape[1] % stride or x.shape[2] % stride:
      raise ValueError(f"ResNet input must be [N, H, W, C] with H and W multiples of {stride}; "
                       f"got shape {tuple(x.shape)}. Change the image size (config) to a "
                       f"multiple of {stride}.")
    kind, layers = DEPTHS[self.depth]
    base = int(64 * self.width)
    x = x.astype(self.dtype)
    x = nn.Conv(base, (7, 7), strides=(2, 2), padding=_pad(7), use_bias=False, dtype=self.dtype,
                kernel_init=conv_init, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                     name="bn1")(x)
    x = nn.relu(x)
    out = {"stem": x}
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    block = nn.remat(_Block, static_argnums=(2,)) if self.remat else _Block  # 2: `train`
    for s, blocks in enumerate(layers, start=1):
      planes = base * 2 ** (s - 1)
      dilate = self.dilate_last and s == len(layers)
      for b in range(blocks):
        stride = 2 if (b == 0 and s > 1 and not dilate) else 1
        x = block(kind, planes, stride, self.zero_init_residual, self.dtype,
                   dilation=2 if dilate else 1, carry_dilation=1 if dilate and b == 0 else None,
                   name=f"layer{s}_{b}")(x, train)
      out[f"stage{s}"] = x
    return out


def num_features(depth: int, width: float = 1.0) -> int:
  """Channels of 'stage4' (2048 for ResNet-50, 512 for ResNet-18 at width 1)."""
  if depth not in DEPTHS:
    raise ValueError(f"Unsupported ResNet depth {depth}; choose one of {sorted(DEPTHS)}.")
  kind, _ = DEPTHS[depth]
  return int(64 * width) * 8 * EXPANSION[kind]


def compute_dtype(name: str):
  """'float32' | 'bfloat16' -> jnp dtype, with an error naming the config key."""
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {name!r}.")
  return DTYPES[name]


def encoder_from_config(config) -> ResNet:
  """The backbone described by config.model (depth, width, dtype, zero_init_residual,
  stem_pool, remat)."""
  m = config.model
  return ResNet(depth=int(m.depth), width=float(m.width),
                zero_init_residual=bool(m.get("zero_init_residual", False)),
                stem_pool=bool(m.get("stem_pool", True)),
                dtype=compute_dtype(m.get("dtype", "float32")),
                remat=bool(m.get("remat", False)))
