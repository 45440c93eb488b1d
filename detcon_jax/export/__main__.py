"""Export a trained backbone: python -m detcon_jax.export --workdir=runs/demo --format=torchvision --out=rn18.pt

torchvision: a state dict for torchvision.models.resnet{depth}() that loads
with strict=True (fc is zero; replace it for your task). Needs PyTorch:
pip install -e '.[export]'. Mistakes (a missing workdir, an --out that is a
directory or in a missing or read-only one, an existing --out without --overwrite)
end in one `error:` line.
"""
from __future__ import annotations

import os
import tempfile

from absl import flags

from detcon_jax import cli

FORMATS = ("torchvision",)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (checkpoints/, config.json).")
_FORMAT = flags.DEFINE_enum("format", "torchvision", FORMATS, "Export format.")
_OUT = flags.DEFINE_string("out", None, "Output file, e.g. resnet50.pt.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest that restores).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (refused "
                               "otherwise).")
flags.mark_flags_as_required(["workdir", "out"])


def check_out(out: str, overwrite: bool = False) -> None:
  """Fail before the slow restore when --out cannot be written, or exists (a file the
  user may want: replaced only with --overwrite)."""
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.isdir(out) or out.endswith(os.sep):
    cli.fail(f"--out={out} is a directory; give a file path, e.g. "
             f"--out={os.path.join(out, 'resnet.pt')}.")
  if os.path.lexists(out) and not overwrite:
    cli.fail(f"--out={out} exists; refusing to replace it. Pass --overwrite to replace it, "
             "or choose another --out.")
  if not os.path.isdir(parent):
    cli.fail(f"--out={out}: the directory {parent} does not exist; create it first.")
  try:
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    cli.fail(f"--out={out}: cannot write into {parent} ({e.strerror or e}).")


def main(argv):
  del argv
  check_out(_OUT.value, _OVERWRITE.value)   # before the slow imports and restore
  from detcon_jax.export import torchvision as tv
  from detcon_jax.core import checkpointing
  try:
    import torch  # noqa: F401  (fail before the slow restore)
  except ImportError:
    cli.fail(f"the torchvision export needs PyTorch; install it with {tv.INSTALL_HINT}.")
  try:
    _, model, variables = checkpointing.load_encoder(_WORKDIR.value, _STEP.value)
    state_dict = tv.torchvision_state_dict(variables, depth=model.depth, width=model.width,
                                           stem_pool=model.stem_pool)
    tv.save(state_dict, _OUT.value)
  except (ValueError, OSError, checkpointing.WorkdirError) as e:
    cli.fail(e)
  print(f"Wrote {_OUT.value}: torchvision.models.resnet{model.depth}() state dict "
        f"({len(state_dict)} tensors; fc is zero, replace it for your task). Load with "
        f"model.load_state_dict(torch.load({_OUT.value!r}), strict=True).")


if __name__ == "__main__":
  cli.run(main)
