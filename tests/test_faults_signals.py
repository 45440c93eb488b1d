"""Signals and verdicts at the end of a run, where a scheduler's rerun must agree with
the first exit: SIGTERM during the end-of-run evaluation (exit 143; the rerun
evaluates), SIGTERM during the demo build inside train (stops at once, as the
standalone build does), and a corrupt-records fraction crossing its limit at the
last step (judged before the final checkpoint: the rerun fails the same way)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from detcon_jax.evaluate import run as eval_run
from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import (ENV, ROOT, TinyObjective, child_pids, is_alive, records_config, run,
                     tiny_config, tiny_records)


def test_sigterm_during_the_final_evaluation_exits_143_and_the_rerun_evaluates(
    tmp_path, monkeypatch, capsys):
  """The evaluation is replaced by one that takes long (and is stopped by SIGTERM), then by
  one that does what evaluate_workdir does: print the table, write eval/step_N.json."""
  config = tiny_config(steps=4, **{"eval.at_end": True})

  def long_evaluation(config, workdir, step):
    os.kill(os.getpid(), signal.SIGTERM)     # the scheduler stops the job mid-evaluation
    time.sleep(120)
    raise AssertionError("the evaluation was not stopped")

  monkeypatch.setattr(loop, "run_evaluations", long_evaluation)
  t = time.time()
  summary = run(config, tmp_path)
  assert time.time() - t < 100 and summary["step"] == 4
  assert loop.exit_status(summary) == 143 and "eval" not in summary
  assert "Evaluation stopped by SIGTERM" in capsys.readouterr().out
  assert not loop.evaluated(str(tmp_path), 4)

  def evaluation(config, workdir, step):
    print(f"evaluation of {workdir} at step {step}: kNN top-1 42.0%")
    eval_run.write_json(os.path.join(workdir, eval_run.EVAL_DIR, f"step_{step}.json"),
                        {"step": step})
    return {"step": step}

  monkeypatch.setattr(loop, "run_evaluations", evaluation)
  rerun = run(config, tmp_path)
  out = capsys.readouterr().out
  assert rerun["eval"] == {"step": 4} and loop.exit_status(rerun) is None
  assert "trained to step 4 but not evaluated yet" in out and "kNN top-1 42.0%" in out
  assert loop.evaluated(str(tmp_path), 4)
  again = run(config, tmp_path)                # evaluated: now the run is finished
  assert "eval" not in again and "nothing to do" in capsys.readouterr().out


# train's CLI wrappers on the tiny objective with the real input: the demo records are
# built into argv[2] first (config.data.build_demo).
BUILDING = """
import sys
from detcon_jax import cli
from detcon_jax.train.__main__ import train_and_exit
from harness import TinyObjective, tiny_config
workdir, records = sys.argv[1], sys.argv[2]
def main(argv):
  config = tiny_config(**{"data.build_demo": True, "data.records_dir": records})
  train_and_exit(config, workdir, objective=TinyObjective())
sys.argv = [sys.argv[0], "--config=configs/detcon_b.py:demo", f"--workdir={workdir}"]
cli.run(main)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc for child processes")
def test_sigterm_during_the_demo_build_inside_train_stops_it_within_seconds(tmp_path):
  records = tmp_path / "records"
  proc = subprocess.Popen([sys.executable, "-c", BUILDING, str(tmp_path / "run"), str(records)],
                          env=ENV, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while len(child_pids(proc.pid)) < 2:        # the build's workers have started
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  time.sleep(2)
  kids = child_pids(proc.pid)
  proc.send_signal(signal.SIGTERM)
  t = time.time()
  out, err = proc.communicate(timeout=120)
  stopped_in = time.time() - t
  assert proc.returncode == 143, err[-3000:]
  assert "Stopped by SIGTERM while building the demo records" in out
  assert "Traceback" not in err and not (records / "manifest.json").exists()
  assert stopped_in < 5, stopped_in          # the build takes ~40 s on one core
  deadline = time.time() + 5                  # no worker outlives it by more than seconds
  while any(map(is_alive, kids)) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(map(is_alive, kids)), [open(f"/proc/{k}/cmdline").read() for k in kids
                                      if is_alive(k)]
  print(f"SIGTERM during train's demo build: exit 143 after {stopped_in:.1f}s")


def test_a_corrupt_fraction_crossing_at_the_end_fails_the_first_run_and_the_rerun(tmp_path):
  """25% unreadable records, limit 10%: fewer than MIN_RECORDS_JUDGED are read, so only
  the end judges. The last step is not saved, so the rerun (from step 4) judges again
  (and a rerun with the raised limit the error suggests would finish from there)."""
  data = tiny_records(tmp_path / "records", bad=set(range(0, 200, 4)))
  config = records_config(data, steps=6, **{"data.max_corrupt_fraction": 0.1,
                                          "checkpoint.every_steps": 4})
  workdir, ckpts = str(tmp_path / "run"), tmp_path / "run" / checkpointing.CHECKPOINT_DIR
  with pytest.raises(loop.InputError, match=r"unreadable.*last checkpoint: step 4"):
    loop.train(config, workdir, objective=TinyObjective())
  assert checkpointing.complete_steps(ckpts) == [4]
  with pytest.raises(loop.InputError, match=r"unreadable.*last checkpoint: step 4"):
    loop.train(config, workdir, objective=TinyObjective())      # the rerun (from 4) agrees
  assert checkpointing.complete_steps(ckpts) == [4]
