"""Export a trained backbone: python -m detcon_jax.export --workdir=runs/demo --format=torchvision --out=rn18.pt

torchvision: a state dict for torchvision.models.resnet{depth}() that loads
with strict=True (fc is zero; replace it for your task). Needs PyTorch:
pip install -e '.[export]'.
"""
from __future__ import annotations

import sys

from absl import app, flags

FORMATS = ("torchvision",)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (checkpoints/, config.json).")
_FORMAT = flags.DEFINE_enum("format", "torchvision", FORMATS, "Export format.")
_OUT = flags.DEFINE_string("out", None, "Output file, e.g. resnet50.pt.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from detcon_jax.export import torchvision as tv
  from detcon_jax.train import checkpointing
  try:
    import torch  # noqa: F401  (fail before the slow restore)
  except ImportError:
    sys.exit(f"error: the torchvision export needs PyTorch; install it with {tv.INSTALL_HINT}.")
  try:
    _, model, variables = checkpointing.load_encoder(_WORKDIR.value, _STEP.value)
    state_dict = tv.torchvision_state_dict(variables, depth=model.depth, width=model.width,
                                           stem_pool=model.stem_pool)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  tv.save(state_dict, _OUT.value)
  print(f"Wrote {_OUT.value}: torchvision.models.resnet{model.depth}() state dict "
        f"({len(state_dict)} tensors; fc is zero, replace it for your task). Load with "
        f"model.load_state_dict(torch.load({_OUT.value!r}), strict=True).")


if __name__ == "__main__":
  app.run(main)
