"""The trainer under trouble: a stalled input, signals while waiting, a held or stale
workdir lock, resumes that would not be exact, a failed rerun of a finished run,
unreadable records, checkpoints that do not restore, read-only workdirs."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from data_pipelines import build
from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import (ENV, ROOT, TinyObjective, read_only, run, small_config, synthetic_batches,
                     tiny_config)


def blocking_batches(block_at, on_block=None):
  """synthetic_batches that never deliver batch `block_at` (a stalled input)."""
  inner = synthetic_batches()
  def source(config, start_step, host_index, host_count):
    for step, b in enumerate(inner(config, start_step, host_index, host_count), start_step):
      if step == block_at:
        if on_block is not None:
          on_block()
        threading.Event().wait()
      yield b
  return source


# --- 1: the input never blocks without bound; signals end any wait -------------

def test_a_stalled_input_is_an_error_after_config_data_timeout_s(tmp_path):
  config = tiny_config(steps=8, **{"data.timeout_s": 1.0})
  t = time.time()
  with pytest.raises(loop.InputError, match=r"No batch .* in 1s \(config.data.timeout_s\)"):
    loop.train(config, str(tmp_path), objective=TinyObjective(), batches=blocking_batches(5))
  assert time.time() - t < 60
  assert not os.path.exists(tmp_path / checkpointing.LOCK_FILE)      # released on errors


def test_ctrl_c_while_waiting_for_input_saves_and_stops(tmp_path, signum=signal.SIGINT):
  """SIGTERM takes the same path (test_train_loop preempts with it)."""
  config = tiny_config(steps=8, **{"data.timeout_s": 600.0})
  kill = lambda: threading.Timer(0.5, os.kill, (os.getpid(), signum)).start()
  t = time.time()
  summary = loop.train(config, str(tmp_path), objective=TinyObjective(),
                       batches=blocking_batches(5, on_block=kill))
  assert time.time() - t < 60
  assert summary["status"] == "preempted" and summary["signal"] == signum
  assert 0 < summary["step"] <= 5
  assert checkpointing.make_manager(str(tmp_path)).latest_step() == summary["step"]
  assert loop.exit_status(summary) == 130                  # the CLI's exit status
  assert loop.exit_status(dict(summary, signal=signal.SIGTERM)) == 143
  assert loop.exit_status(dict(summary, status="done", signal=None)) is None


# --- 3: one run per workdir --------------------------------------------------------

HOLD = """
import sys, time
from detcon_jax.core import checkpointing
with checkpointing.workdir_lock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


def test_a_second_run_refuses_naming_the_holder_and_a_dead_holders_lock_is_taken_over(
    tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpointing.WorkdirError,
                       match=rf"in use by another run \(pid {holder.pid} on host "
                             rf"{socket.gethostname()}"):
      run(tiny_config(), tmp_path)
    assert not (tmp_path / "config.json").exists()
  finally:
    holder.kill()                # kill -9: the lock file stays, the kernel drops the flock
    holder.wait()
  assert json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())["pid"] == holder.pid
  assert run(tiny_config(steps=2), tmp_path)["status"] == "done"
  assert any("Taking over the lock" in r.getMessage() and str(holder.pid) in r.getMessage()
             for r in caplog.records)
  assert not os.path.exists(tmp_path / checkpointing.LOCK_FILE)     # released at the end


# --- 4: unreadable records counted, and too many stop the run -----------------------

class CountingSource:
  """Synthetic batches whose `stats` say one record in 16 was unreadable (6%)."""

  def __init__(self, config, start_step, host_index, host_count):
    self._it = synthetic_batches()(config, start_step, host_index, host_count)
    self.stats = {"corrupt_skipped": 0, "batches": 0}

  def __iter__(self):
    return self

  def __next__(self):
    self.stats["batches"] += 1
    self.stats["corrupt_skipped"] += self.stats["batches"] % 2
    return next(self._it)


def test_unreadable_records_are_counted_and_too_many_stop_the_run(tmp_path, capsys):
  config = tiny_config(steps=4)                      # max_corrupt_fraction 0.01: the default
  with pytest.raises(loop.InputError, match=r"unreadable, more than "
                                            r"config.data.max_corrupt_fraction=0.01.*"
                                            r"last checkpoint: step 2"):
    loop.train(config, str(tmp_path), objective=TinyObjective(), batches=CountingSource)
  # Judged at the last step, before its checkpoint: the run is not "done" (no summary
  # line, step 4 unsaved), so its rerun judges again (tests/test_faults_signals.py).
  assert "[tiny] done" not in capsys.readouterr().out
  assert checkpointing.complete_steps(tmp_path / checkpointing.CHECKPOINT_DIR) == [2]


# --- 7: nothing written before everything is checked; exact resumes only ------------

def test_an_invalid_config_writes_nothing(tmp_path):
  with pytest.raises(loop.ConfigError, match="config.steps"):
    run(tiny_config(steps=0), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_failed_rerun_leaves_a_finished_run_as_it_was_and_steps_may_be_raised(tmp_path):
  run(tiny_config(steps=4), tmp_path)
  before = (tmp_path / "config.json").read_text()
  config = tiny_config(steps=8, **{"data.records_dir": str(tmp_path / "typo")})
  with pytest.raises(loop.ConfigError, match=r"records_dir=.*typo"):
    loop.train(config, str(tmp_path), objective=TinyObjective())   # the real input
  assert (tmp_path / "config.json").read_text() == before
  assert checkpointing.make_manager(str(tmp_path)).all_steps() == [2, 4]
  two = tiny_config(steps=4, seed=1, batch_size=16)
  with pytest.raises(loop.ConfigError) as e:          # every changed key, in one message
    run(two, tmp_path)
  assert "config.batch_size=8 (this run: 16)" in str(e.value)
  assert "config.seed=0 (this run: 1)" in str(e.value)
  # More steps, and keys that do not change the math, resume.
  config = tiny_config(steps=6, log_every_steps=1, **{
      "checkpoint.every_steps": 3, "eval.every_steps": 0, "data.timeout_s": 60.0,
      "data.max_corrupt_fraction": 0.5})
  summary = run(config, tmp_path)
  assert summary["start_step"] == 4 and summary["step"] == 6


@pytest.mark.parametrize("key,value", [
    ("batch_size", 16), ("seed", 1), ("model.width", 0.5), ("method", "other"),
    ("data.records_dir", "elsewhere"), ("data.augment", "byol"), ("views.global_area", (0.2, 1.0)),
    ("loss.temperature", 0.2), ("head.output_dim", 32), ("optimizer.base_lr", 0.1),
    ("optimizer.warmup_steps", 2), ("image_size", 64), ("steps", 3), ("optimizer.momentum", 0.8),
])
def test_a_resume_that_would_not_be_exact_is_refused(tmp_path, key, value):
  stored = tiny_config(steps=4)
  checkpointing.save_config(str(tmp_path), stored)
  stored = checkpointing.load_config(str(tmp_path))
  config = tiny_config(**{"steps": 4, key: value})
  with pytest.raises(loop.ConfigError, match=rf"config\.{key}=.*this run: .*new --workdir"):
    loop.check_resumable(config, stored, str(tmp_path))


def test_a_warmup_count_and_the_fraction_that_gives_it_are_the_same_run(tmp_path):
  stored = tiny_config(steps=4, **{"optimizer.warmup_steps": 2})   # e.g. an older config.json
  checkpointing.save_config(str(tmp_path), stored)
  stored = checkpointing.load_config(str(tmp_path))
  same = tiny_config(steps=8, **{"optimizer.warmup_steps": None,
                                 "optimizer.warmup_fraction": 0.5})
  loop.check_resumable(same, stored, str(tmp_path))
  same.optimizer.warmup_fraction = 0.25
  with pytest.raises(loop.ConfigError, match=r"config.optimizer.warmup_steps=2 \(this run: 1\)"):
    loop.check_resumable(same, stored, str(tmp_path))


# --- 5 and 9: checkpoints that do not restore; read-only workdirs --------------------

SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A DetCon-B workdir (tiny ResNet) with checkpoints at steps 1 and 2 of a random
  state (made, not initialised: compiling the init is slow), and labelled records."""
  import jax
  from detcon_jax.objectives import registry
  from detcon_jax.core import state as state_lib
  root = tmp_path_factory.mktemp("trained")
  rng = np.random.default_rng(0)
  grid = (np.arange(SIZE)[:, None] // 16 * 2 + np.arange(SIZE)[None, :] // 16).astype(np.int32)
  exs = [dict(image=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), label=i % 2,
              masks={"grid_2": grid}, instances=(grid == 0).astype(np.int32), classes=[i % 2])
         for i in range(12)]
  data = str(root / "records")
  build.write_records(data, {"train": exs[:8], "test": exs[8:]}, num_classes=2)
  config = small_config("detcon_b", steps=2)
  config.data.records_dir = data
  objective = registry.get_objective("detcon_b")
  tx, _ = state_lib.make_optimizer(objective, config)
  shapes = jax.eval_shape(lambda r, b: state_lib.init_train_state(objective, tx, config, r, b),
                          jax.random.PRNGKey(0), loop.abstract_batch(objective, config))
  ts = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape) if x.ndim > 1
                               else np.ones(x.shape)).astype(x.dtype), shapes)
  manager = checkpointing.make_manager(str(root / "run"), keep=5)
  for step in (1, 2):
    checkpointing.save(manager, step, ts)
  manager.close()
  checkpointing.save_config(str(root / "run"), config)
  return root


def _damage(step_dir):
  """Cut the largest file of a checkpoint step in half."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def test_evaluation_falls_back_past_a_checkpoint_that_does_not_restore(trained, tmp_path,
                                                                       caplog, capsys):
  import shutil
  from detcon_jax.evaluate import run as eval_run
  workdir = tmp_path / "run"
  shutil.copytree(trained / "run", workdir)
  _damage(workdir / checkpointing.CHECKPOINT_DIR / "2")
  _, _, _, step = checkpointing.restore_encoder(str(workdir))
  assert step == 1
  assert any("step 2" in r.getMessage() and "does not restore" in r.getMessage()
             for r in caplog.records)
  with pytest.raises(checkpointing.WorkdirError, match="step 2 .* does not restore"):
    checkpointing.load_encoder(str(workdir), step=2)           # asked for: an error
  settings = eval_run.Settings(batch_size=8, linear_sweep="quick")
  (workdir / "eval").mkdir()
  with read_only(workdir / "eval"):       # results are printed before any file is written
    with pytest.raises(checkpointing.WorkdirError, match="Cannot write the results"):
      eval_run.evaluate_workdir(str(workdir), evals="knn", baseline=False, settings=settings)
  out = capsys.readouterr().out
  assert "at step 1" in out and "kNN top-1" in out


def test_read_only_workdirs_and_outputs_are_one_line_errors(trained, tmp_path):
  """train and evaluate on a read-only workdir, export into a read-only directory."""
  (tmp_path / "ro").mkdir()
  with read_only(tmp_path / "ro"):
    with pytest.raises(checkpointing.WorkdirError, match=r"Cannot write to the workdir"):
      run(tiny_config(), tmp_path / "ro" / "run")
    evaluate = [sys.executable, "-m", "detcon_jax.evaluate", f"--workdir={trained / 'run'}",
                "--evals=knn", "--nobaseline", "--linear_sweep=quick"]
    with read_only(trained / "run"):
      procs = [subprocess.Popen(argv, env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for argv in (
          evaluate,
          [sys.executable, "-m", "detcon_jax.export", f"--workdir={trained / 'run'}",
           f"--out={tmp_path / 'ro' / 'rn.pt'}"])]
      outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert p.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
  (eval_out, eval_err), (_, export_err) = outputs
  assert "kNN top-1" in eval_out and "Cannot write the results" in eval_err
  assert not [line for line in eval_err.splitlines() if "orbax" in line.lower()], eval_err
  assert "cannot write into" in export_err and str(tmp_path / "ro") in export_err
