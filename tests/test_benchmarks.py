"""The benchmarks run: the train-step FLOP count measures the paper's network (the
`train_step` fixture: conftest.py); the input benchmark's jpeg mode times the views."""
import pytest

from harness import benchmark_module


def test_rn50_preset_is_the_standard_stride_32_network(train_step, capsys):
  train_step.main(["--preset", "rn50", "--flops_only", "--depth", "18", "--image_size", "64",
                   "--batch_size", "8"])
  out = capsys.readouterr().out
  assert "(stride 32)" in out
  for line in ("detcon_s / simclr: XLA flops +", "detcon_b / byol: XLA flops +",
               "moco_v2 / simclr: XLA flops x", "swav / simclr: XLA flops x"):
    assert line in out, out                      # DetCon costs more than its base method


JPEG = ["--source=jpeg", "--jpeg_images=4", "--examples=3", "--batch_size=3"]
VIEWS = {"classic two views (BYOL)": 2, "+ FH masks (DetCon-B)": 2,
         "2x224 + 6x96 multi-crop (SwAV)": 8, "MaskCo boxes": 2,
         "saliency-constrained crops (CAST)": 2, "BG Swaps (MoCo v2)": 2,
         "upper bound: JPEG decode + one random-resized crop": 1}


def _table(bench, argv, capsys) -> tuple[str, dict]:
  """(stdout, {row: views}) of one --source=jpeg run."""
  bench.main(argv)
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
  ms = bench.parse_rows(out)
  assert len(ms) == len(rows) and all(v > 0 for v in ms.values()), out
  return out, {r.split("|")[1].strip(): int(r.split("|")[2]) for r in rows}


def test_jpeg_mode_times_detcon_views_from_cached_records(tmp_path, capsys):
  """--source=jpeg builds 224 px JPEG records once under --cache and times DetCon-B's
  imagenet views and the decode + crop bound through the training input (a handful of
  examples: the table, not the speed); a second run reuses the records."""
  bench = benchmark_module("input_pipeline")
  argv = JPEG + [f"--cache={tmp_path}", "--rows=DetCon,upper"]
  out, views = _table(bench, argv, capsys)
  assert "built 4 records" in out and "224 px shorter side" in out, out
  assert views == {k: v for k, v in VIEWS.items() if "DetCon" in k or "upper" in k}, out
  assert bench.jpeg_records(str(tmp_path), 4) in out           # cached: no rebuild
  assert "built" not in capsys.readouterr().out


@pytest.mark.slow
def test_jpeg_mode_prints_every_methods_views(tmp_path, capsys):
  """Every row: each method's imagenet views run on the records (SwAV's 8, BG Swaps'...)."""
  out, views = _table(benchmark_module("input_pipeline"), JPEG + [f"--cache={tmp_path}"], capsys)
  assert views == VIEWS, out
