"""The build under trouble: records of another source are never written into (the demo
preset's build_demo included), the folder convention (class = subfolder), extreme
aspect ratios, SIGTERM/SIGINT mid-build leave no worker behind."""
import os
import signal
import subprocess
import sys
import time

import pytest

from data_pipelines import build, records
from detcon_jax.train import loop
from harness import (ENV, ROOT, TinyObjective, child_pids, image_folder, is_alive, run_build,
                     tiny_config)


# --- 12: the folder convention -------------------------------------------------

def test_class_is_the_subfolder_and_the_rest_is_skipped_with_a_reason(tmp_path):
  m = run_build(image_folder(tmp_path / "photos"), tmp_path / "rec")
  assert m["class_names"] == ["cats", "dogs"] and m["num_classes"] == 2
  assert m["splits"]["train"]["count"] == 3
  assert m["splits"]["train"]["class_counts"] == {"cats": 2, "dogs": 1}   # indoor/ is a cat
  reasons = {os.path.basename(s["input"]): s["reason"] for s in m["skipped"]}
  assert set(reasons) == {"strip.png", "loose.png"} and m["num_skipped"] == 2
  assert "extreme aspect ratio: 3000x40" in reasons["strip.png"]
  assert "not in a class subfolder" in reasons["loose.png"]
  flat = run_build(f"folder:{tmp_path / 'photos' / 'dogs'}", tmp_path / "flat")  # no subfolders:
  assert flat["num_classes"] == 0 and flat["splits"]["train"]["count"] == 1   # unlabelled
  assert "class_counts" not in flat["splits"]["train"]


def test_the_evaluation_hint_for_records_that_lack_something_fits_the_source():
  from detcon_jax.evaluate import run as eval_run
  splits = {"train": {}, "test": {}}
  folder = dict(source="folder:photos", num_classes=2, has_gt=False, splits=splits)
  with pytest.raises(ValueError) as e:
    eval_run.check_data(["knn", "masks"], folder, "rec")
  assert "--masks" not in str(e.value) and "only --source=demo" in str(e.value)
  assert "masks: no ground-truth" in str(e.value) and "--evals=knn,linear " in str(e.value)
  eval_run.check_data(["knn", "linear"], folder, "rec")
  unlabelled = dict(folder, num_classes=0, splits={"train": {}})
  with pytest.raises(ValueError, match=r"knn, linear: no image labels.*retrieval, "
                     r"masks: no ground-truth.*No evaluation applies"):
    eval_run.check_data(["knn", "linear", "retrieval", "masks"], unlabelled, "rec")
  no_test = dict(folder, splits={"train": {}})
  with pytest.raises(ValueError, match=r"knn: no test split.*PATH/test/"):
    eval_run.check_data(["knn"], no_test, "rec")


# --- 2: never write into another source's records --------------------------------

def test_the_demo_build_never_writes_into_records_of_another_source(tmp_path):
  out = tmp_path / "rec"
  run_build(image_folder(tmp_path / "photos"), out)
  before = {p: (out / p).read_bytes() for p in os.listdir(out)}
  with pytest.raises(build.OtherSourceError, match=r"built from folder:.*refusing to write demo"):
    build.ensure_demo_records(str(out))
  with pytest.raises(build.OtherSourceError):
    build.build("demo", str(out), masks="grid", workers=1, num_train=4, num_test=0,
                image_size=32, progress=False)
  config = tiny_config(**{"data.records_dir": str(out), "data.build_demo": True})
  with pytest.raises(loop.ConfigError, match=r"refusing to write demo records.*build_demo=False"):
    loop.train(config, str(tmp_path / "run"), objective=TinyObjective())
  assert not (tmp_path / "run" / "config.json").exists()
  config.data.build_demo, config.eval.at_end = False, True   # training on them is fine, but
  with pytest.raises(loop.ConfigError, match=r"No evaluation applies.*at_end=False"):  # the
    loop.train(config, str(tmp_path / "run"), objective=TinyObjective())  # evaluation at the
  assert not (tmp_path / "run" / "config.json").exists()      # end is checked before, not after
  os.remove(out / records.MANIFEST)        # an interrupted rebuild: the sidecars still say
  with pytest.raises(build.OtherSourceError):
    build.ensure_demo_records(str(out))
  after = {p: (out / p).read_bytes() for p in os.listdir(out)}
  assert after == {p: b for p, b in before.items() if p != records.MANIFEST}


# --- 8: signals stop the build's workers ------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc for child processes")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_mid_build_stops_every_worker(tmp_path, signum):
  """The build's workers are busy with shards when the build is signalled: it exits
  with 128+signum (SIGKILL: killed), and none of its child processes outlives it by
  more than seconds (after kill -9 the workers notice that their parent is gone)."""
  err = open(tmp_path / "stderr", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "data_pipelines.build", "--source=demo", f"--out={tmp_path}/rec",
       "--workers=2", "--num_train=400", "--num_test=0", "--image_size=48", "--shard_size=20",
       "--masks=grid"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
  t = time.time()
  while len(child_pids(proc.pid)) < 2 and time.time() - t < 120 and proc.poll() is None:
    time.sleep(0.2)
  time.sleep(2)                            # the workers have started shards
  kids = child_pids(proc.pid)
  assert len(kids) >= 2 and proc.poll() is None
  proc.send_signal(signum)
  assert proc.wait(timeout=30) == (-signum if signum == signal.SIGKILL else 128 + signum)
  deadline = time.time() + 5
  while any(map(is_alive, kids)) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(map(is_alive, kids)), [k for k in kids if is_alive(k)]
  err.seek(0)
  assert ("rerun the same command to resume" in err.read()) == (signum != signal.SIGKILL)
