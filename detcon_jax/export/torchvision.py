"""The backbone as a torchvision ResNet state dict, for transfer in PyTorch.

Users fine-tune detectors and segmenters in PyTorch, so a checkpoint is only
useful to them as a state dict that `torchvision.models.resnetNN()` loads with
`strict=True`. The conversion is plain numpy over the documented naming of
detcon_jax.models.resnet (flax HWIO kernels -> torch OIHW, BN scale/bias ->
weight/bias, running mean/var -> running_mean/running_var, plus torch's
num_batches_tracked); torch is needed only to write the file.

fc: torchvision's ResNet always has an `fc` classifier and strict loading
requires its keys, but the encoder has no classifier. The export writes
fc.weight and fc.bias as zeros ([num_classes, features], default 1000), so the
file loads strictly, the logits are visibly meaningless (all zero) rather than
silently random, and users replace `model.fc` for their task anyway. Compare
features via `torch.nn.Sequential(*list(model.children())[:-2])` (stage 4).

Width multipliers other than 1 have no torchvision constructor; the export
refuses them with a message, as it refuses encoders without the stem max-pool
(config.model.stem_pool=False). torchvision's BN eps (1e-5) matches the encoder.
"""
from __future__ import annotations

import re

import numpy as np

from detcon_jax.models.resnet import DEPTHS, num_features

INSTALL_HINT = "pip install -e '.[export]'"
FC_CLASSES = 1000
_BLOCK = re.compile(r"^layer(\d+)_(\d+)$")


def _bn(prefix: str, params: dict, stats: dict) -> dict[str, np.ndarray]:
  return {f"{prefix}.weight": np.asarray(params["scale"], np.float32),
          f"{prefix}.bias": np.asarray(params["bias"], np.float32),
          f"{prefix}.running_mean": np.asarray(stats["mean"], np.float32),
          f"{prefix}.running_var": np.asarray(stats["var"], np.float32),
          f"{prefix}.num_batches_tracked": np.zeros((), np.int64)}


def _conv(prefix: str, params: dict) -> dict[str, np.ndarray]:
  kernel = np.asarray(params["kernel"], np.float32)                  # [H, W, in, out]
  return {f"{prefix}.weight": np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))}  # [out, in, H, W]


def torchvision_state_dict(variables: dict, depth: int, width: float = 1.0,
                           fc_classes: int = FC_CLASSES, stem_pool: bool = True
                           ) -> dict[str, np.ndarray]:
  """numpy state dict for torchvision.models.resnet{depth}() from encoder variables.

  `variables` = {'params', 'batch_stats'} of detcon_jax.models.resnet.ResNet.
  Raises if a parameter is left unmapped, so a layout change cannot silently
  drop weights.
  """
  if depth not in DEPTHS:
    raise ValueError(f"No torchvision ResNet of depth {depth}; choose one of {sorted(DEPTHS)}.")
  if width != 1.0:
    raise ValueError(f"torchvision has no ResNet of width {width}; only width 1.0 exports "
                     "(config.model.width).")
  if not stem_pool:
    raise ValueError("torchvision's ResNet has a stem max-pool; a run with "
                     "config.model.stem_pool=False does not export (its features would differ).")
  params, stats = variables["params"], variables["batch_stats"]
  out = _conv("conv1", params["conv1"]) | _bn("bn1", params["bn1"], stats["bn1"])
  mapped = {"conv1", "bn1"}
  for name in params:
    match = _BLOCK.match(name)
    if not match:
      continue
    mapped.add(name)
    prefix = f"layer{match[1]}.{match[2]}"
    p, s = params[name], stats[name]
    for sub in p:
      if sub.startswith("conv"):
        out |= _conv(f"{prefix}.{sub}", p[sub])
      elif sub.startswith("bn"):
        out |= _bn(f"{prefix}.{sub}", p[sub], s[sub])
      elif sub == "downsample_conv":
        out |= _conv(f"{prefix}.downsample.0", p[sub])
      elif sub == "downsample_bn":
        out |= _bn(f"{prefix}.downsample.1", p[sub], s[sub])
      else:
        raise ValueError(f"Unknown encoder parameter {name}/{sub}: update the export mapping.")
  unmapped = sorted(set(params) - mapped)
  if unmapped:
    raise ValueError(f"Encoder parameters {unmapped} have no torchvision counterpart; "
                     "update the export mapping.")
  feats = num_features(depth, width)
  out["fc.weight"] = np.zeros((fc_classes, feats), np.float32)
  out["fc.bias"] = np.zeros((fc_classes,), np.float32)
  return out


def save(state_dict: dict[str, np.ndarray], path: str) -> None:
  """torch.save the state dict as torch tensors; a clear error when torch is absent."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Writing a torchvision state dict needs PyTorch: {INSTALL_HINT} "
                      "(see docs/tpu.md, Export, for the exact torch/torchvision pair).") from e
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
