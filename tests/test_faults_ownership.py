"""Never overwrite what the project did not write (issue 20, part 3): a workdir, a records
--out or the demo's records_dir is used only when it is empty, missing or holds this
project's own files; an empty --workdir, a same-source rebuild with other settings
(without --overwrite) and an existing export --out (without --overwrite) are refused.
Each refusal: exit status 1, one `error:` line naming the file, the user's file
byte-identical."""
import os
import subprocess
import sys

import pytest

from data_pipelines import build
from detcon_jax.errors import ConfigError, WorkdirError
from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import (ENV, ROOT, TinyObjective, files, image_folder, refused, run, run_build,
                     tiny_config)

TRAIN = [sys.executable, "-m", "detcon_jax.train",
         f"--config={os.path.join(ROOT, 'configs', 'detcon_b.py')}:demo"]
BUILD = [sys.executable, "-m", "data_pipelines.build"]
USER_CONFIG = b'{"my_app_setting": 42}\n'


# --- workdirs --------------------------------------------------------------------

def test_an_empty_workdir_is_refused_and_the_current_directory_untouched(tmp_path):
  (tmp_path / "config.json").write_bytes(USER_CONFIG)
  before = files(tmp_path)
  line = refused(TRAIN + ["--workdir="], "--workdir", cwd=tmp_path)
  assert "empty" in line
  assert files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["config.json"]
  with pytest.raises(WorkdirError, match="--workdir is empty"):   # the library too
    run(tiny_config(), "")


@pytest.mark.slow   # the CLI form of the library test below (a train start-up, ~15 s)
def test_a_workdir_whose_config_json_is_not_a_runs_is_refused(tmp_path):
  (tmp_path / "config.json").write_bytes(USER_CONFIG)
  refused(TRAIN + [f"--workdir={tmp_path}"], str(tmp_path / "config.json"))
  assert files(tmp_path) == {"config.json": USER_CONFIG}   # no lock, no checkpoints/ left


def test_a_workdir_holding_other_files_is_refused_in_the_library(tmp_path):
  (tmp_path / "config.json").write_bytes(USER_CONFIG)
  with pytest.raises(WorkdirError, match=r"config.json is not a training run's config"):
    run(tiny_config(), tmp_path)
  os.remove(tmp_path / "config.json")
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(WorkdirError, match=r"notes.txt was not written by a training run"):
    run(tiny_config(), tmp_path)
  assert files(tmp_path) == {"notes.txt": b"mine"}


def test_a_runs_own_workdir_is_accepted(tmp_path):
  """What train and evaluate write: config.json (a run's), lock, checkpoints/, tb/,
  tb_random_init/, eval/, checkpoints_unrestorable/, config.json's temporary and
  checkpoint_errors.log (orbax's noise, e.g. under load: a run that wrote it resumes)."""
  checkpointing.save_config(str(tmp_path), tiny_config())
  for d in ("checkpoints/2", "tb", "tb_random_init", "eval", "checkpoints_unrestorable"):
    os.makedirs(tmp_path / d)
  (tmp_path / "lock").write_text("")
  (tmp_path / "config.json.tmp123").write_text("{}")
  with checkpointing.quiet_library_errors(str(tmp_path)) as log:
    log.write("Exception in thread asyncio_0: ...")
  assert os.path.exists(tmp_path / checkpointing.ERROR_LOG)
  checkpointing.check_own_workdir(str(tmp_path))
  checkpointing.check_own_workdir(str(tmp_path / "missing"))
  assert not checkpointing.is_run_config('{"my_app_setting": 42}')
  assert not checkpointing.is_run_config("not json")


# --- records --out -----------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_records(tmp_path_factory):
  """A small folder source built into records (grid masks, 32 px)."""
  tmp = tmp_path_factory.mktemp("own")
  source = image_folder(tmp / "photos")
  run_build(source, tmp / "rec")
  return source, tmp / "rec"


def test_build_refuses_an_out_holding_the_users_own_manifest(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "manifest.json").write_bytes(USER_CONFIG)
  refused(BUILD + ["--source=demo", f"--out={out}", "--masks=grid", "--num_train=2",
                   "--num_test=0", "--image_size=32", "--workers=1"],
          str(out / "manifest.json"))
  assert files(out) == {"manifest.json": USER_CONFIG}


def test_build_refuses_an_out_holding_the_users_own_shard_without_a_manifest(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "train-00000-of-00001.tfrecord").write_bytes(b"my own records")
  refused(BUILD + ["--source=demo", f"--out={out}", "--masks=grid", "--num_train=2",
                   "--num_test=0", "--image_size=32", "--workers=1"],
          str(out / "train-00000-of-00001.tfrecord"))
  assert files(out) == {"train-00000-of-00001.tfrecord": b"my own records"}


def test_rebuilding_the_same_source_with_other_masks_needs_overwrite(folder_records):
  source, out = folder_records
  before = files(out)
  line = refused(BUILD + [f"--source={source}", f"--out={out}", "--masks=grid",
                          "--grid_sizes=2", "--image_size=32", "--workers=1"], "--overwrite")
  assert "masks: grid_4 -> grid_2" in line and str(out) in line
  assert files(out) == before
  with pytest.raises(build.OtherSourceError, match=r"image_size: 32 -> 48"):
    build.plan_build(source, str(out), "grid", image_size=48)
  again = build.plan_build(source, str(out), "grid", image_size=32)   # same settings:
  assert not again["jobs"]                                            # nothing to redo
  forced = build.plan_build(source, str(out), "grid", image_size=32, grid_sizes=(2,),
                            overwrite=True)                           # --overwrite: every
  assert [j["fname"] for j in forced["jobs"]] == ["train-00000-of-00001.tfrecord"]  # shard
  assert files(out) == before


def test_an_interrupted_builds_leftovers_are_the_projects_own(folder_records, tmp_path):
  source, out = folder_records
  copy = tmp_path / "rec"
  copy.mkdir()
  for name, data in files(out).items():
    (copy / name).write_bytes(data)
  (copy / "manifest.json.tmp").write_text("{")
  (copy / "tmpab12.tfrecord.tmp").write_bytes(b"")
  build.check_out_dir(str(copy), source)
  (copy / "photo.png").write_bytes(b"")
  with pytest.raises(build.OtherSourceError, match=r"photo.png is not part of this project"):
    build.check_out_dir(str(copy), source)


def test_the_demo_preset_never_builds_over_the_users_manifest(tmp_path):
  rec = tmp_path / "rec"
  rec.mkdir()
  (rec / "manifest.json").write_bytes(USER_CONFIG)
  config = tiny_config(**{"data.records_dir": str(rec), "data.build_demo": True})
  with pytest.raises(ConfigError, match=r"manifest.json is not part of this project's records"):
    loop.train(config, str(tmp_path / "run"), objective=TinyObjective())
  assert files(rec) == {"manifest.json": USER_CONFIG}
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow   # the CLI form of the test above (a train start-up, ~20 s)
def test_the_demo_preset_cli_never_builds_over_the_users_manifest(tmp_path):
  rec = tmp_path / "rec"
  rec.mkdir()
  (rec / "manifest.json").write_bytes(USER_CONFIG)
  refused(TRAIN + [f"--workdir={tmp_path / 'run'}", f"--config.data.records_dir={rec}"],
          str(rec / "manifest.json"))
  assert files(rec) == {"manifest.json": USER_CONFIG}


# --- export --out ---------------------------------------------------------------------

def test_export_refuses_an_existing_out_unless_overwrite(tmp_path):
  out = tmp_path / "rn.pt"
  out.write_bytes(b"my model")
  refused([sys.executable, "-m", "detcon_jax.export", f"--workdir={tmp_path / 'run'}",
           f"--out={out}"], f"--out={out}")
  assert out.read_bytes() == b"my model"
  check = ("import sys; from detcon_jax.export.__main__ import check_out; "   # its own process:
           "check_out(sys.argv[1], overwrite=True); print('ok')")              # absl flags
  proc = subprocess.run([sys.executable, "-c", check, str(out)], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
