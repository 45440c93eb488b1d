"""The tiny objective of tests/harness.py trains and writes a run's outputs."""
from __future__ import annotations

import numpy as np

from harness import run, tiny_config


def test_tiny_run_trains_and_writes_outputs(tmp_path):
  summary = run(tiny_config(steps=8), tmp_path)
  assert summary["status"] == "done" and summary["step"] == 8
  assert sorted(summary["losses"]) == list(range(8))
  assert all(np.isfinite(v) for v in summary["losses"].values())
  assert (tmp_path / "config.json").exists()
  assert list((tmp_path / "tb").iterdir())
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4, 6, 8]
