"""Start-up errors of the training CLI and loop: clear, early, before any compile."""
import json
import subprocess
import sys

import pytest
import tensorflow as tf

from detcon_jax.train import loop
from harness import ROOT, TinyObjective, tiny_config


def test_cli_override_error_names_the_key(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "detcon_jax.train", "--config=configs/detcon_b.py:demo",
       f"--workdir={tmp_path}", "--config.image_size=65"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert "error: config.image_size=65" in proc.stderr and "multiple" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_missing_mask_source_fails_before_compiling(tmp_path):
  """The records hold only grid masks; DetCon asks for FH ones."""
  records = tmp_path / "records"
  records.mkdir()
  (records / "manifest.json").write_text(json.dumps({
      "schema_version": 1, "complete": True, "masks": {"grid_4": {"kind": "grid", "n": 4}},
      "splits": {"train": {"count": 1, "shards": [{"file": "x.tfrecord", "count": 1}]}}}))
  with tf.io.TFRecordWriter(str(records / "x.tfrecord")) as w:   # present: verified first
    w.write(b"")
  config = tiny_config(batch_size=1)   # no larger than the records' 1 train image
  config.data.update(records_dir=str(records), mask_source="fh")
  with pytest.raises(loop.ConfigError, match=r"config.data.*'fh'.*grid_4"):
    loop.train(config, str(tmp_path / "run"), objective=TinyObjective())
