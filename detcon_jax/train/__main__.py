"""Pretrain: python -m detcon_jax.train --config=configs/detcon_b.py:demo --workdir=runs/demo

Every config key can be overridden, e.g. --config.steps=200
--config.batch_size=64. Rerunning with the same --workdir resumes from its
latest checkpoint (one run per workdir at a time: it is locked). SIGTERM and
SIGINT (Ctrl-C) save a checkpoint and exit with 143 and 130. Multi-host runs
call jax.distributed.initialize() first (see
detcon_jax.core.sharding.maybe_initialize_distributed).
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from detcon_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/<method>.py:<preset>, preset one of demo | imagenet[-EPOCHS] | "
    "coco[-EPOCHS].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tb/, config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from detcon_jax.core import sharding
  sharding.maybe_initialize_distributed()   # before anything touches jax devices
  train_and_exit(_CONFIG.value, _WORKDIR.value)


def train_and_exit(config, workdir, **train_kw):
  """loop.train, its outcome as the exit status and at most a line on stderr: an
  `error:` line (status 1) for a user error, 128+signal when stopped."""
  import jax
  from detcon_jax.core import checkpointing
  from detcon_jax.train import loop
  try:
    summary = loop.train(config, workdir, **train_kw)
  except loop.USER_ERRORS as e:
    if jax.process_count() == 1:   # the run is closed: leave before interpreter teardown,
      print("error: " + " ".join(str(e).split()), file=sys.stderr)   # where a failed
      sys.stdout.flush()           # save's abandoned coroutines and tasks would print
      sys.stderr.flush()           # ("never awaited", "never retrieved") below the line
      os._exit(1)
    cli.fail(e)
  except KeyboardInterrupt:   # a second Ctrl-C: stopped at once (the pending save finished)
    steps = checkpointing.complete_steps(
        f"{checkpointing.resolve_workdir(workdir)}/{checkpointing.CHECKPOINT_DIR}")
    where = (f"the newest checkpoint is step {steps[-1]}; rerun the same command to resume"
             if steps else "no checkpoint was written")
    print(f"Stopped at once by a second Ctrl-C; {where}.", file=sys.stderr)
    if jax.process_count() == 1:   # the interrupt may have landed inside a save: exit
      sys.stdout.flush()           # handlers would then join a checkpoint thread whose
      sys.stderr.flush()           # executor is shut down, and hang (seen once at load 8)
      os._exit(130)
    sys.exit(130)
  status = loop.exit_status(summary)
  if status is not None:
    if summary["status"] == "preempted":
      print(f"Stopped at step {summary['step']}; rerun the same command to resume.",
            file=sys.stderr)
    if jax.process_count() == 1:
      # Everything is saved and closed: leave now, as the build's CLI does. Exit
      # handlers would join the worker pool of a demo build stopped mid-way (forever
      # if the signal landed inside its lock), and tearing down XLA and TensorFlow
      # takes seconds that a scheduler's grace period may not have. (Several hosts
      # exit normally: jax.distributed shuts down at exit.)
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
  cli.run(main, _CONFIG)
