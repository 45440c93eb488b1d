"""The Beam build (DirectRunner, offline) writes the local builder's records byte for byte."""
import os
import sys

import pytest

from data_pipelines import beam, build, records

TINY = dict(num_train=8, num_test=4, shard_size=4, image_size=48, progress=False)


def _files(out):
  return {f: open(os.path.join(out, f), "rb").read()
          for f in sorted(os.listdir(out)) if f.endswith(".tfrecord")}


def test_beam_build_equals_local_build_byte_for_byte(tmp_path, capsys):
  pytest.importorskip("apache_beam")
  local = build.build("demo", str(tmp_path / "local"), masks="fh,grid,gt", workers=1, **TINY)
  # Through the CLI, on 2 DirectRunner worker processes (each imports this checkout).
  build.main(["--source=demo", f"--out={tmp_path / 'beam'}", "--masks=fh,grid,gt",
              "--runner=beam", "--direct_num_workers=2", "--num_train=8", "--num_test=4",
              "--shard_size=4", "--image_size=48"])
  assert "train: 8, test: 4" in capsys.readouterr().out
  on_beam = records.read_manifest(str(tmp_path / "beam"))
  assert on_beam["splits"] == local["splits"]          # counts, sizes and sha256 of every shard
  assert _files(str(tmp_path / "beam")) == _files(str(tmp_path / "local"))
  assert records.verify(str(tmp_path / "beam")) == []


def test_beam_in_process_runner_and_resume(tmp_path):
  pytest.importorskip("apache_beam")
  out = str(tmp_path)
  opts = dict(TINY, num_test=0)
  m = build.build("demo", out, masks="grid", runner="beam", **opts)
  first = os.path.join(out, m["splits"]["train"]["shards"][0]["file"])
  os.remove(first + ".json")                   # as if that worker had failed
  mtime = os.path.getmtime(os.path.join(out, m["splits"]["train"]["shards"][1]["file"]))
  assert build.build("demo", out, masks="grid", runner="beam", **opts)["splits"] == m["splits"]
  assert os.path.getmtime(os.path.join(out, m["splits"]["train"]["shards"][1]["file"])) == mtime


def test_missing_beam_is_a_clear_error(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "apache_beam", None)      # import fails
  with pytest.raises(SystemExit, match="error: --runner=beam needs Apache Beam"):
    build.main(["--source=demo", f"--out={tmp_path}", "--masks=grid", "--runner=beam",
                "--num_train=2", "--num_test=0"])
  with pytest.raises(ImportError, match=r"\.\[beam\]"):
    beam.run(dict(jobs=[1]), [])


def test_beam_options_only_with_the_beam_runner(tmp_path):
  with pytest.raises(SystemExit):
    build.main(["--source=demo", f"--out={tmp_path}", "--direct_num_workers=2"])
