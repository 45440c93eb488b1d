"""Pretrain: python -m detcon_jax.train --config=configs/detcon_b.py:demo --workdir=runs/demo

Every config key can be overridden, e.g. --config.steps=200
--config.batch_size=64. Rerunning with the same --workdir resumes from its
latest checkpoint. Multi-host runs call jax.distributed.initialize() first
(see detcon_jax.train.sharding.maybe_initialize_distributed).
"""
from __future__ import annotations

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<method>.py:<preset>, preset one of demo | imagenet[-EPOCHS] | "
    "coco[-EPOCHS].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tb/, config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:   # orbax/jax INFO lines drown the progress bar
    logging.set_verbosity(logging.WARNING)
  from detcon_jax.train import loop, sharding
  sharding.maybe_initialize_distributed()   # before anything touches jax devices
  try:
    summary = loop.train(_CONFIG.value, _WORKDIR.value)
  except (loop.ConfigError, loop.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")
  if summary["status"] == "preempted":
    # Checkpoint saved; exit as a SIGTERM-killed process would (143), so schedulers
    # that restart failed jobs rerun the same command, which resumes.
    print(f"Preempted at step {summary['step']}; rerun the same command to resume.",
          file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
  app.run(main)
