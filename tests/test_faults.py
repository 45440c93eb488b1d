"""Fault injection: kill -9 and restart, a checkpoint cut mid-write, corrupt records,
a deleted shard, malformed command lines. The trainer runs the tiny objective
(test_train_tiny_objective), in a subprocess where a process must die."""
import concurrent.futures as cf
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from data_pipelines import build, records
from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import (ENV, ROOT, TinyObjective, assert_same_state, latest_step, records_config,
                     run, tiny_config, tiny_records)

STEPS = 16
KILLS = 5


# --- kill -9 ------------------------------------------------------------------

# The run in a child process; it SIGKILLs itself when its input produces batch
# KILL_AT (the input runs a few batches ahead of the step), or runs to the end.
CHILD = """
import os, signal, sys
from harness import run, tiny_config
kill_at, workdir = int(sys.argv[1]), sys.argv[2]
def on_step(step):
  if step == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
run(tiny_config(steps={steps}), workdir, ema=True, on_step=on_step)
""".format(steps=STEPS)


@pytest.mark.slow
def test_kill_9_at_random_steps_then_restart_matches_uninterrupted(tmp_path):
  """Each restart meets the lock of a killed run (stale, taken over) and perhaps a
  checkpoint cut mid-write; the final state equals an uninterrupted run's."""
  run(tiny_config(steps=STEPS), tmp_path / "full", ema=True)
  workdir, rng = str(tmp_path / "killed"), random.Random(13)
  survived = []
  for _ in range(KILLS):
    start = latest_step(workdir)
    kill_at = rng.randint(min(start + 3, STEPS - 1), STEPS - 1)   # past the read-ahead
    proc = subprocess.run([sys.executable, "-c", CHILD, str(kill_at), workdir], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    survived.append((kill_at, start))
  proc = subprocess.run([sys.executable, "-c", CHILD, "-1", workdir], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Taking over the lock" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, checkpointing.LOCK_FILE))
  assert latest_step(workdir) == STEPS
  assert_same_state(tmp_path / "full", workdir)
  print(f"survived {KILLS} kill -9 (batch killed at, resumed from): {survived}")


# --- A checkpoint cut mid-write -------------------------------------------------

def test_checkpoint_cut_mid_write_falls_back_to_the_previous_one(tmp_path, caplog):
  """(a) a write that never finalised (orbax's tmp dir); (b) a step whose files were
  cut short (storage without atomic renames): both resume from the step before and
  end where an uninterrupted run does."""
  config = tiny_config(steps=8)          # checkpoints at 2, 4, 6, 8
  run(config, tmp_path / "full")
  cut = tmp_path / "cut"
  shutil.copytree(tmp_path / "full", cut)
  ckpts = cut / checkpointing.CHECKPOINT_DIR
  os.rename(ckpts / "8", ckpts / "8.orbax-checkpoint-tmp-1234")          # (a)
  resumed = run(config, cut)
  assert resumed["start_step"] == 6 and resumed["step"] == 8
  assert_same_state(tmp_path / "full", cut)

  data = sorted((ckpts / "8").rglob("*"), key=lambda p: -p.stat().st_size)[0]  # (b)
  with open(data, "r+b") as f:
    f.truncate(data.stat().st_size // 2)
  with open(cut / "config.json") as f:
    config_before = f.read()
  resumed = run(config, cut)
  assert resumed["start_step"] == 6 and resumed["step"] == 8
  assert any("step 8" in r.getMessage() and "does not restore" in r.getMessage()
             for r in caplog.records)
  assert len(os.listdir(cut / checkpointing.SET_ASIDE_DIR)) == 1     # kept, not deleted
  assert_same_state(tmp_path / "full", cut)
  with open(cut / "config.json") as f:
    assert f.read() == config_before


# --- Corrupt records and a deleted shard (the real input pipeline) ---------------


def _scalars(workdir, tag):
  out = {}
  for path in (workdir / "tb").glob("events.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor))
  return out


def test_5_percent_corrupt_records_are_skipped_counted_and_the_run_goes_on(tmp_path, capsys):
  data = tiny_records(tmp_path / "records", bad=set(range(5, 200, 20)))   # 10 of 200: 5%
  config = records_config(data, steps=24, **{"data.max_corrupt_fraction": 0.1})
  summary = loop.train(config, str(tmp_path / "run"), objective=TinyObjective())
  assert summary["status"] == "done" and summary["step"] == 24
  skipped, read = summary["records_skipped"], summary["records_read"]
  assert read >= 24 * 8 and 0.02 < skipped / read < 0.08, (skipped, read)
  assert f"{skipped} of {read} records read were unreadable" in capsys.readouterr().out
  counted = _scalars(tmp_path / "run", "data/corrupt_skipped")
  assert counted and max(counted.values()) > 0
  print(f"5% corrupt records: {skipped} of {read} read skipped ({skipped / read:.1%}), "
        "the run finished")


def test_a_deleted_shard_is_a_clear_error_within_seconds(tmp_path):
  data = tiny_records(tmp_path / "records", n=40)
  os.remove(os.path.join(data, "train-00003-of-00010.tfrecord"))
  t = time.time()
  with pytest.raises(loop.ConfigError, match=r"train-00003-of-00010\.tfrecord.*missing"):
    loop.train(records_config(data), str(tmp_path / "run"), objective=TinyObjective())
  assert time.time() - t < 20
  assert not (tmp_path / "run" / "config.json").exists()
  print(f"deleted shard: named error after {time.time() - t:.1f}s")


# --- Ctrl-C on the command line ---------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_on_the_cli_saves_and_exits_130_and_the_rerun_resumes(tmp_path):
  data = tiny_records(tmp_path / "records", n=40)
  argv = TRAIN + [f"--workdir={tmp_path / 'run'}", "--config.steps=400", "--config.batch_size=8",
                  "--config.image_size=32", "--config.model.width=0.125",
                  "--config.head.hidden_dim=32", "--config.head.output_dim=16",
                  "--config.loss.num_masks=4", "--config.log_every_steps=1",
                  f"--config.data.records_dir={data}", "--config.data.mask_source=grid",
                  "--config.data.build_demo=False", "--config.eval.at_end=False"]
  proc = subprocess.Popen([sys.executable, *argv], env=ENV, cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  for line in proc.stdout:                   # training has started
    if "compiled in" in line:
      break
  time.sleep(2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 130, err[-3000:]
  stopped = int(err.split("Stopped at step ")[1].split(";")[0])
  assert 0 <= stopped < 400 and latest_step(str(tmp_path / "run")) == stopped
  assert not (tmp_path / "run" / checkpointing.LOCK_FILE).exists()
  rerun = subprocess.run([sys.executable, *argv], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {stopped}." in rerun.stdout and latest_step(str(tmp_path / "run")) == 400
  print(f"Ctrl-C at step {stopped}: saved, exit 130; the rerun resumed there and finished")


# --- Malformed command lines ----------------------------------------------------

TRAIN = ["-m", "detcon_jax.train", "--config=configs/detcon_b.py:demo"]
EVALUATE = ["-m", "detcon_jax.evaluate"]
EXPORT = ["-m", "detcon_jax.export", "--format=torchvision"]


def malformed(tmp):
  """(argv, what the error line must name): 21 mistakes over the three commands."""
  w = f"--workdir={tmp}/run"
  afile = os.path.join(tmp, "a_file")
  return [
      (TRAIN + [w, "--config.nope=1"], "config.nope"),
      (TRAIN + [w, "--config.model.nope=1"], "config.model.nope"),
      (TRAIN + [w, "--config.stepz=5"], "steps"),
      (["-m", "detcon_jax.train", "--config=configs/detcon_b.py:foo", w], "'foo'"),
      (["-m", "detcon_jax.train", "--config=configs/nope.py", w], "configs/nope.py"),
      (TRAIN + [w, "--config.steps=abc"], "config.steps"),
      (TRAIN + [w, "--config.steps=0"], "config.steps"),
      (TRAIN + [w, "--config.batch_size=0"], "config.batch_size"),
      (TRAIN + [w, "--config.image_size=65"], "config.image_size"),
      (TRAIN + [w, "--config.optimizer.warmup_steps=500"], "config.optimizer.warmup_steps"),
      (TRAIN + [w, "--config.optimizer.warmup_fraction=1.5"], "config.optimizer.warmup_fraction"),
      (TRAIN + [w, "--config.data.max_corrupt_fraction=2"], "config.data.max_corrupt_fraction"),
      (TRAIN + [w, "--config.model.dtype=float16"], "config.model.dtype"),
      (TRAIN + [w, f"--config.data.records_dir={tmp}/no_records",
                "--config.data.build_demo=False"], "no_records"),
      (TRAIN, "--workdir"),
      (TRAIN + [f"--workdir={afile}/run"], afile),
      (TRAIN + [w, "stray"], "stray"),
      (EVALUATE + [f"--workdir={tmp}/no_run"], "no_run"),
      (EXPORT + [w, f"--out={tmp}"], f"--out={tmp}"),
      (EXPORT + [w, f"--out={tmp}/no_dir/rn.pt"], "no_dir"),
      (TRAIN + [w, f"--config.data.records_dir={tmp}/folder_records"], "folder:photos"),
  ]


def _run_cli(argv):
  proc = subprocess.run([sys.executable, *argv], env=ENV, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  return argv, proc


@pytest.mark.slow
def test_20_malformed_command_lines_give_20_one_line_errors(tmp_path):
  check_malformed(tmp_path, malformed(str(tmp_path)))


def test_malformed_command_lines_sample(tmp_path):
  """Five of them, one of each kind (the rest run with -m slow)."""
  cases = malformed(str(tmp_path))
  check_malformed(tmp_path, [cases[i] for i in (0, 3, 4, 18, 20)])


def folder_records(tmp):
  """A records directory whose manifest says it was built from a folder."""
  (tmp / "folder_records").mkdir(exist_ok=True)
  (tmp / "folder_records" / records.MANIFEST).write_text(
      '{"source": "folder:photos", "schema_version": %d}' % records.SCHEMA_VERSION)


def check_malformed(tmp_path, cases):
  (tmp_path / "a_file").write_text("")
  folder_records(tmp_path)
  with cf.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(_run_cli, [argv for argv, _ in cases]))
  for (argv, proc), (_, names) in zip(results, cases):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1, (argv, proc.returncode, proc.stderr[-2000:])
    assert len(errors) == 1 and "Traceback" not in proc.stderr, (argv, proc.stderr[-2000:])
    assert names in errors[0], (argv, errors[0])
    print(" ".join(argv[1:]), "->", errors[0])
  assert not (tmp_path / "run" / "config.json").exists()
  assert os.listdir(tmp_path / "folder_records") == [records.MANIFEST]


def malformed_builds(tmp):
  """(build argv, what the error line must name): the build's own mistakes."""
  (tmp / "empty").mkdir()
  (tmp / "a_file").write_text("")
  folder_records(tmp)
  out = f"--out={tmp}/out"
  return [
      ([f"--source=folder:{tmp}/empty", out], f"folder:{tmp}/empty"),
      ([f"--source=folder:{tmp}/no_such_dir", out], "no_such_dir"),
      (["--source=bogus", out], "--source='bogus'"),
      (["--source=tfds:not_a_dataset", out], "tfds:not_a_dataset"),
      (["--source=demo", f"--out={tmp}/folder_records"], "folder:photos"),
      (["--source=demo", out, "--masks=fh,nope"], "nope"),
      (["--source=demo", f"--out={tmp}/a_file/out"], f"--out={tmp}/a_file/out"),
  ]


def test_malformed_build_command_lines_give_one_line_errors(tmp_path):
  """The build CLI in-process (no jax/tf start-up per case): one `error:` line, exit
  non-zero, naming the path or key, and nothing written to --out."""
  for argv, names in malformed_builds(tmp_path):
    with pytest.raises(SystemExit) as e:
      build.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, (argv, message)
    assert names in message, (argv, message)
    print("python -m data_pipelines.build", " ".join(argv), "->", message)
  assert not (tmp_path / "out").exists()
  assert os.listdir(tmp_path / "folder_records") == [records.MANIFEST]
