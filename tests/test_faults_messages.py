"""Mistakes a hostile user made on the command lines (issue 20), each of which used to end
in a traceback or a misleading line: now exit 1 with one `error:` line naming the key,
file or path and the fix. Every command runs in a subprocess, all of them at once (one
fixture, four at a time); almost all fail before anything is compiled."""
import concurrent.futures as cf
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import detcon_b, simclr
from data_pipelines import demo, records, sources
from data_pipelines import input as data_input
from detcon_jax import cli as cli_lib
from detcon_jax.errors import ConfigError, NonFiniteLossError, WorkdirError
from detcon_jax.objectives import registry
from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import ROOT, TESTS, read_only, run, tiny_config

# No GCE metadata probe and no retries: an unreachable gs:// fails in milliseconds, not 40 s.
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([TESTS, ROOT]),
           NO_GCE_CHECK="True", GCS_RETRY_CONFIG_MAX_RETRIES="0")
TRAIN = ["-m", "detcon_jax.train", "--config=configs/detcon_b.py:demo"]
NO_BUCKET = "gs://detcon-jax-no-such-bucket-20"
BAD_NAME = b"bad\xff.png"   # Latin-1, not UTF-8

# The NaN case: the tiny objective, as the CLI runs a training (USER_ERRORS -> cli.fail).
NAN_CHILD = """
import sys
from detcon_jax import cli
from detcon_jax.train import loop
from harness import run, tiny_config
try:
  run(tiny_config(steps=8), sys.argv[2], nan_at=int(sys.argv[1]))
except loop.USER_ERRORS as e:
  cli.fail(e)
"""


def _trained_looking_workdir(path, config_text: str):
  """A workdir with config.json and a checkpoint folder for step 2 (enough for orbax to
  list it; nothing here gets as far as restoring it)."""
  os.makedirs(os.path.join(path, checkpointing.CHECKPOINT_DIR, "2"))
  with open(os.path.join(path, checkpointing.CONFIG_FILE), "w") as f:
    f.write(config_text)
  return str(path)


def _records_dir(path, manifest_text: str) -> str:
  os.makedirs(path)
  with open(os.path.join(path, records.MANIFEST), "w") as f:
    f.write(manifest_text)
  return str(path)


def _cases(tmp) -> dict:
  """name -> argv (after `python`); builds the files each case needs under tmp."""
  w = f"--workdir={tmp}/run"
  config_json = detcon_b.get_config("demo").to_json_best_effort(indent=2, sort_keys=True)
  run = _trained_looking_workdir(tmp / "trained", config_json)
  cut = _trained_looking_workdir(tmp / "cut", config_json[:len(config_json) // 2])
  (tmp / "empty.py").write_text("")
  no_shards = _records_dir(tmp / "no_shards", json.dumps({
      "schema_version": records.SCHEMA_VERSION, "complete": True, "source": "folder:photos",
      "masks": {"grid_4": {"kind": "grid", "n": 4}},
      "splits": {"train": {"count": 0, "shards": []}}}))
  cut_manifest = _records_dir(tmp / "cut_manifest",
                              '{"schema_version": 2, "complete": true, "spl')
  # Current, complete demo records without the tiled backgrounds BG Swaps reads: the
  # demo build would add them, but the directory is read-only.
  _records_dir(tmp / "ro_records", json.dumps({
      "schema_version": records.SCHEMA_VERSION, "complete": True, "source": "demo",
      "demo_version": demo.VERSION, "image_size": 96, "demo": {"bg_correlation": 0.0},
      "masks": {"grid_4": {"kind": "grid", "n": 4}}, "saliency": {"detector": "mbd"},
      "splits": {"train": {"count": 0, "shards": []}}}))
  images = tmp / "images"
  images.mkdir()
  for i, name in enumerate([b"ok0.png", b"ok1.png", BAD_NAME]):
    Image.fromarray(np.random.RandomState(i).randint(0, 255, (48, 48, 3), np.uint8)).save(
        os.path.join(os.fsencode(images), name), format="PNG")
  data = ["--config.data.build_demo=False", "--config.data.mask_source=grid",
          "--config.eval.at_end=False"]
  return {
      "method": TRAIN + [w, "--config.method=nope"],
      "key_after_valid": TRAIN + [w, "--config.steps=6", "--config.optimiser.base_lr=1"],
      "empty_config": ["-m", "detcon_jax.train", f"--config={tmp}/empty.py", w],
      "cut_config_json": TRAIN + [f"--workdir={cut}"],
      "read_only_records": ["-m", "detcon_jax.train", "--config=configs/simclr.py:demo", w,
                            "--config.background.mode=swaps",
                            f"--config.data.records_dir={tmp}/ro_records"],
      "gs_workdir": TRAIN + [f"--workdir={NO_BUCKET}/run"],
      "gs_records": TRAIN + [w, f"--config.data.records_dir={NO_BUCKET}/records"],
      "evaluate_step": ["-m", "detcon_jax.evaluate", f"--workdir={run}", "--step=7"],
      "export_step": ["-m", "detcon_jax.export", f"--workdir={run}", "--step=7",
                      f"--out={tmp}/rn.pt"],
      "no_shards": TRAIN + [w, f"--config.data.records_dir={no_shards}"] + data,
      "cut_manifest": TRAIN + [w, f"--config.data.records_dir={cut_manifest}"] + data,
      "nan_nothing_saved": ["-c", NAN_CHILD, "1", f"{tmp}/nan1"],
      "nan_after_a_checkpoint": ["-c", NAN_CHILD, "3", f"{tmp}/nan3"],
      "folder_bad_name": ["-m", "data_pipelines.build", f"--source=folder:{images}",
                          f"--out={tmp}/folder_out", "--masks=grid", "--workers=1"],
  }


# name -> (what the error line must hold, what it must not): exit 1, one line, no traceback.
EXPECT = {
    "method": (["config.method='nope'", "detcon_b", "simclr"], []),
    "key_after_valid": (["error: --config.optimiser.base_lr=1: config.optimiser is not",
                         "did you mean optimizer"], ["config.steps"]),
    "empty_config": (["empty.py", "defines no get_config()"], ["not a config key"]),
    "cut_config_json": ([f"cut/{checkpointing.CONFIG_FILE} is not valid JSON", "new --workdir"],
                        []),
    "read_only_records": (["config.data.records_dir=", "ro_records", "tiled backgrounds",
                           "cannot be written"], ["--out"]),
    "gs_workdir": ([f"error: --workdir={NO_BUCKET}/run: cannot access", "credentials"], []),
    "gs_records": ([f"error: --config.data.records_dir={NO_BUCKET}/records: cannot access",
                    "credentials"], []),
    "evaluate_step": (["No checkpoint step 7", "holds steps [2]", "--step"],
                      ["does not restore"]),
    "export_step": (["No checkpoint step 7", "holds steps [2]", "--step"], ["does not restore"]),
    "no_shards": (["lists no shards", "--source=folder:photos"], ["shard_size"]),
    "cut_manifest": ([f"cut_manifest/{records.MANIFEST} is not valid JSON",
                      "python -m data_pipelines.build"], []),
    # Nothing saved: the same workdir starts over. A checkpoint saved: a lower learning
    # rate is a config change, which a resume refuses, so the advice is a new workdir.
    "nan_nothing_saved": (["Loss is nan at step 1", "--config.optimizer.base_lr",
                           "nothing was saved", "same --workdir starts over"], []),
    "nan_after_a_checkpoint": (["step 3", "no checkpoint was written after step 2",
                                "in a new --workdir", "--config.optimizer.base_lr"], []),
}
# The default run's sample, one per kind of failure (argument parsing, the workdir, a
# storage URL); each command costs ~8 s of CPU (the jax and TF imports), so the others run
# with -m slow, and the fast in-process tests below cover them in the default run.
SAMPLE = ("key_after_valid", "empty_config", "cut_config_json", "gs_workdir")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
  """cli(*names) -> {name: (argv, CompletedProcess)}: runs the cases not run yet, four at
  a time, with the records dir of read_only_records made read-only meanwhile."""
  tmp = tmp_path_factory.mktemp("messages")
  cases, done = _cases(tmp), {}

  def call(argv):
    return subprocess.run([sys.executable, *argv], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)

  def results(*names):
    todo = [n for n in names if n not in done]
    locked = read_only(tmp / "ro_records") if "read_only_records" in todo else \
        contextlib.nullcontext()
    with locked, cf.ThreadPoolExecutor(4) as pool:
      done.update(zip(todo, pool.map(call, [cases[n] for n in todo])))
    return {n: (cases[n], done[n]) for n in names}
  results.tmp = tmp
  return results


def check_error(name, argv, proc) -> str:
  """One `error:` line, exit 1, no traceback, holding what EXPECT says."""
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1, (argv, proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, (argv, proc.stderr[-3000:])
  assert len(errors) == 1, (argv, proc.stderr[-3000:])
  must, must_not = EXPECT[name]
  assert all(m in errors[0] for m in must), (name, errors[0], must)
  assert not any(m in errors[0] for m in must_not), (name, errors[0], must_not)
  print(name, "->", errors[0])
  return errors[0]


def test_command_line_mistakes_sample(cli):
  for name, (argv, proc) in cli(*SAMPLE).items():
    check_error(name, argv, proc)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECT))
def test_command_line_mistake(cli, name):
  cli(*EXPECT, "folder_bad_name")          # all at once, the first time
  check_error(name, *cli(name)[name])


@pytest.mark.slow
def test_a_non_utf8_file_name_is_skipped_and_named_by_the_build(cli):
  (argv, proc), = cli("folder_bad_name").values()
  assert proc.returncode == 0, (argv, proc.stderr[-3000:])
  assert "bad\\xff.png" in proc.stdout and "not valid UTF-8" in proc.stdout
  manifest = records.read_manifest(str(cli.tmp / "folder_out"))
  assert manifest["splits"]["train"]["count"] == 2
  [skipped] = manifest["skipped"]
  assert skipped["input"].endswith("bad\\xff.png") and "UTF-8" in skipped["reason"]


# --- The same cases in-process (the default run) ------------------------------------

def test_an_unknown_method_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config.method='nope': unknown method; choose one "
                                        r"of \[.*'detcon_b'.*\]"):
    registry.get_objective("nope")


def test_a_read_only_records_dir_that_needs_an_upgrade(tmp_path):
  _cases(tmp_path)
  config = simclr.get_config("demo")
  config.background.mode = "swaps"
  config.data.records_dir = str(tmp_path / "ro_records")
  with read_only(tmp_path / "ro_records"), pytest.raises(ConfigError) as e:
    loop.ensure_records(config)
  assert all(m in str(e.value) for m in EXPECT["read_only_records"][0]), e.value
  assert "--out" not in str(e.value)


def test_a_storage_error_on_a_url_names_the_flag_that_gave_it():
  import tensorflow as tf
  error = tf.errors.FailedPreconditionError(None, None, (   # as TF words it offline
      "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve hostname', "
      "error details: Could not resolve host: www.googleapis.com\n\t when reading metadata "
      f"of {NO_BUCKET}/records/manifest.json"))
  argv = ["train", f"--config.data.records_dir={NO_BUCKET}/records"]
  assert cli_lib.storage_error(error, argv) == (
      f"--config.data.records_dir={NO_BUCKET}/records: cannot access {NO_BUCKET}/records/"
      "manifest.json (FailedPreconditionError: Could not resolve host: www.googleapis.com); "
      "check the network, the bucket name and the credentials (gcloud auth "
      "application-default login), or use a local path.")
  assert cli_lib.storage_error(error, ["train"]).startswith(f"cannot access {NO_BUCKET}/")
  assert cli_lib.storage_error(ValueError(NO_BUCKET), argv) is None          # not TF's: a bug
  assert cli_lib.storage_error(tf.errors.InternalError(None, None, "no url"), argv) is None


def test_a_step_that_does_not_exist_lists_the_steps_that_do(tmp_path):
  config_json = detcon_b.get_config("demo").to_json_best_effort()
  workdir = _trained_looking_workdir(tmp_path / "run", config_json)
  with pytest.raises(WorkdirError) as e:      # before any model is traced
    checkpointing.restore_train_state(workdir, step=7)
  assert all(m in str(e.value) for m in EXPECT["export_step"][0]), e.value


def test_a_manifest_without_shards_and_a_cut_manifest(tmp_path):
  _cases(tmp_path)
  manifest = records.read_manifest(str(tmp_path / "no_shards"))
  with pytest.raises(ValueError) as e:
    data_input.host_shards(str(tmp_path / "no_shards"), manifest, "train", 0, 1)
  assert all(m in str(e.value) for m in EXPECT["no_shards"][0]) and "shard_size" not in str(e.value)
  with pytest.raises(ValueError) as e:
    records.read_manifest(str(tmp_path / "cut_manifest"))
  assert all(m in str(e.value) for m in EXPECT["cut_manifest"][0]), e.value


def test_the_nan_advice_depends_on_whether_a_checkpoint_was_saved(tmp_path):
  with pytest.raises(NonFiniteLossError) as e:
    run(tiny_config(steps=8), tmp_path / "run", nan_at=3)
  assert all(m in str(e.value) for m in EXPECT["nan_after_a_checkpoint"][0]), e.value
  advice = loop.diverged_advice(str(tmp_path / "run"), None)
  assert "nothing was saved" in advice and "same --workdir starts over" in advice


def test_a_folder_with_a_non_utf8_file_name_skips_it_with_its_reason(tmp_path):
  _cases(tmp_path)
  plan = sources.plan_folder(str(tmp_path / "images"))
  assert [os.path.basename(f) for f, _ in plan["splits"]["train"]] == ["ok0.png", "ok1.png"]
  [outside] = plan["outside"]
  assert outside["input"].endswith("bad\\xff.png") and "not valid UTF-8" in outside["reason"]
  json.dumps(outside, ensure_ascii=False).encode("utf-8")   # printable, storable
