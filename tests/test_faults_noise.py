"""What the user sees when checkpoint I/O fails: a full disk while saving, a corrupt
latest checkpoint, every checkpoint corrupt, a second Ctrl-C during the final save.
Each is one line (an `error:` line, a warning or a stop line) and no traceback on
stderr; orbax's, asyncio's and TensorStore's tracebacks go to
WORKDIR/checkpoint_errors.log. The runs go through the train CLI's wrappers
(cli.run, train_and_exit) with the tiny objective, in a child process."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from detcon_jax.core import checkpointing
from harness import ENV, ROOT, run, tiny_config


# The train CLI (absl app, its logging, the `error:` line) on the tiny objective.
# argv: workdir steps [enospc_from_step]; with a step, every file write of orbax's
# into checkpoints/STEP* from that step on raises ENOSPC (a full disk).
CHILD = """
import errno, os, re, sys
from etils import epath
from detcon_jax import cli
from detcon_jax.train.__main__ import train_and_exit
from harness import TinyObjective, synthetic_batches, tiny_config
workdir, steps = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
  full_from = int(sys.argv[3])
  cls = type(epath.Path(workdir))
  def full(write):
    def patched(self, *a, **k):
      m = re.search(r"checkpoints/(\\d+)", str(self))
      if m and int(m.group(1)) >= full_from:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
      return write(self, *a, **k)
    return patched
  cls.write_text, cls.write_bytes = full(cls.write_text), full(cls.write_bytes)
def main(argv):
  train_and_exit(tiny_config(steps=steps, log_every_steps=1), workdir, objective=TinyObjective(),
                 batches=synthetic_batches())
sys.argv = [sys.argv[0], "--config=configs/detcon_b.py:demo", f"--workdir={workdir}"]
cli.run(main)
"""
# Lines TensorFlow/XLA's C++ logging prints at start-up, before any of our code runs.
STARTUP = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|I0000 .*port\.cc)")


def child(*args, **kw):
  return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=ENV, cwd=ROOT,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def lines(stderr: str) -> list[str]:
  """stderr without the start-up lines and the progress bar's redraws."""
  return [l for l in stderr.splitlines()
          if l.strip() and not STARTUP.match(l) and not re.match(r"^\s*tiny:\s+\d+%", l)]


def check_quiet(proc, stderr, returncode, max_lines=3):
  shown = lines(stderr)
  assert proc.returncode == returncode, stderr[-3000:]
  assert "Traceback" not in stderr and len(shown) <= max_lines, stderr[-3000:]
  print(f"stderr ({len(stderr.splitlines())} lines in all):", *shown, sep="\n  ")
  return shown


def test_a_full_disk_while_saving_is_one_error_line(tmp_path):
  workdir = tmp_path / "run"
  proc = child(workdir, 12, 6)
  _, err = proc.communicate(timeout=600)
  shown = check_quiet(proc, err, 1, max_lines=1)
  assert shown[0].startswith("error: Saving checkpoint step 6 ") and "the disk is full" in err
  assert "The newest complete checkpoint is step 4" in shown[0]
  log = re.search(r"Full trace: (\S+)$", shown[0]).group(1)
  assert log == str(workdir / checkpointing.ERROR_LOG)
  with open(log) as f:
    text = f.read()                     # what orbax/asyncio/TensorStore printed is kept
  assert "No space left on device" in text and f"{os.sep}orbax{os.sep}" in text
  print(f"{text.count('Traceback')} library tracebacks went to {log}")
  assert checkpointing.complete_steps(workdir / checkpointing.CHECKPOINT_DIR) == [2, 4]


def _corrupt(step_dir):
  """Overwrite the array data of a checkpoint (its metadata stays readable)."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      if os.path.basename(root) == "d":
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.write(b"\0garbage" * max(1, os.path.getsize(path) // 8))


def test_corrupt_checkpoints_are_one_line_each(tmp_path):
  """The latest corrupt: one warning, resumed from the one before. All corrupt: one
  `error:` line (and one warning per step) naming the log with the traces."""
  run(tiny_config(steps=4), tmp_path / "latest")            # checkpoints 2, 4
  ckpts = tmp_path / "latest" / checkpointing.CHECKPOINT_DIR
  shutil.copytree(tmp_path / "latest", tmp_path / "all")
  _corrupt(ckpts / "4")
  for step in (2, 4):
    _corrupt(tmp_path / "all" / checkpointing.CHECKPOINT_DIR / str(step))
  latest, every = child(tmp_path / "latest", 6), child(tmp_path / "all", 6)
  out, err = latest.communicate(timeout=600)
  shown = check_quiet(latest, err, 0, max_lines=1)
  assert "Checkpoint step 4 in " in shown[0] and "DATA_LOSS" in shown[0]
  assert "warning: checkpoint step(s) [4] do not restore; resuming from step 2" in out
  _, err = every.communicate(timeout=600)
  shown = check_quiet(every, err, 1, max_lines=3)    # a warning per step, the error
  assert shown[-1].startswith("error: No checkpoint in ") and "steps [4, 2]" in shown[-1]
  with open(tmp_path / "all" / checkpointing.ERROR_LOG) as f:
    assert f.read().count("DATA_LOSS") >= 2


def test_a_second_ctrl_c_is_one_line_and_the_checkpoint_restores(tmp_path):
  workdir = tmp_path / "run"
  proc = child(workdir, 100000)
  deadline = time.time() + 300
  while not checkpointing.complete_steps(workdir / checkpointing.CHECKPOINT_DIR)[-1:] > [2]:
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)                          # training has written a few checkpoints
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  shown = check_quiet(proc, err, 130, max_lines=2)
  assert re.match(r"Stopped (at once by a second Ctrl-C; the newest checkpoint is step \d+|"
                  r"at step \d+); rerun", shown[-1]), shown
  assert "Finalize" not in err
  steps = checkpointing.complete_steps(workdir / checkpointing.CHECKPOINT_DIR)
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  try:
    state = manager.restore(steps[-1])           # the newest checkpoint is whole
  finally:
    manager.close()
  assert int(state["step"]) == steps[-1]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
