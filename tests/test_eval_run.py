"""The evaluation runner on tiny records with known answers: registry, table, pictures, JSON."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import build
from detcon_jax.evaluate import features, run
from detcon_jax.models.resnet import ResNet

SIZE = 32
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], np.uint8)


def example(cls, rng):
  """A grey image with a coloured 16x8 box (the one instance) in the top-left quadrant."""
  image = np.full((SIZE, SIZE, 3), 128, np.uint8)
  image[:16, :8] = COLOURS[cls]
  image = np.clip(image + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
  inst = np.zeros((SIZE, SIZE), np.int32); inst[:16, :8] = 1
  grid = (np.arange(SIZE)[:, None] // 16) * 2 + np.arange(SIZE)[None, :] // 16
  return dict(image=image, label=cls, instances=inst, classes=[cls],
              masks={"gt": inst, "grid_2": grid.astype(np.int32)})


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  out = str(tmp_path_factory.mktemp("records"))
  build.write_records(out, {"train": [example(c, rng) for c in range(3) for _ in range(4)],
                            "test": [example(c, rng) for c in range(3) for _ in range(2)]},
                      num_classes=3, class_names=["r", "g", "b"])
  return out


def test_evaluate_variables_known_answers(records_dir):
  model = ResNet(depth=18, width=0.25)
  variables = features.random_init_variables(model, SIZE)
  settings = run.Settings(image_size=SIZE, batch_size=8, linear_sweep="quick")
  results, pictures = run.evaluate_variables(model, {run.BASELINE: variables}, records_dir,
                                             "masks,retrieval,linear,knn", settings)
  row = results["rows"][run.BASELINE]
  assert list(row) == ["knn", "linear", "retrieval"]           # registry order
  assert row["knn"] == 1.0 and row["linear"] == 1.0            # colour = class: separable
  assert 0.0 <= row["retrieval"] <= 1.0
  masks = results["masks"]
  assert masks["gt"]["abo"] == 1.0
  assert masks["grid_2"]["abo"] == pytest.approx(0.5)          # 128 px box in a 256 px cell
  assert masks["grid_2"]["mean_segments"] == 4.0
  assert pictures[run.BASELINE]["retrieval"].shape == (run.NUM_PICTURES, SIZE, 3 * SIZE + 4, 3)
  table = run.format_table(results)
  assert "random init" in table and "kNN top-1" in table and "100.0%" in table
  assert "grid_2" in table
  json.dumps(run._jsonable(results))                            # JSON-able as written


def test_parse_evals_and_data_checks(records_dir):
  assert run.parse_evals("masks, knn") == ("knn", "masks")
  assert run.parse_evals(("knn,linear", "masks")) == ("knn", "linear", "masks")
  with pytest.raises(ValueError, match="choose from"):
    run.parse_evals("knn,segmentation")
  with pytest.raises(ValueError, match="image size"):
    run.resolve_settings(run.Settings(), {"image_size": None})
  with pytest.raises(ValueError, match="multiple of 32"):
    run.resolve_settings(run.Settings(image_size=40), {"image_size": 96})
  assert run.resolve_settings(run.Settings(), {"image_size": 100}).retrieval_resolution == 12
  assert run.resolve_settings(run.Settings(), {"image_size": 100}, stride=16).image_size == 96
  assert run.resolve_settings(run.Settings(image_size=48), {}, stride=16).image_size == 48


def test_evaluate_workdir_after_real_training(records_dir, tmp_path, capsys):
  """Train DetCon-B for 2 steps on the tiny records, then the workdir entry point."""
  from configs import detcon_b
  from detcon_jax.export import torchvision as tv
  from detcon_jax.core import checkpointing
  from detcon_jax.train import loop

  config = detcon_b.get_config("demo")
  config.update(steps=2, batch_size=4, image_size=SIZE, log_every_steps=1)
  config.optimizer.warmup_steps = 0
  config.data.update(records_dir=records_dir, mask_source="grid", build_demo=False)
  config.eval.at_end = False
  workdir = str(tmp_path / "run")
  loop.train(config, workdir)

  settings = run.Settings(batch_size=8, linear_sweep="quick")
  results = run.evaluate_workdir(workdir, evals="knn,retrieval,masks", settings=settings)
  assert set(results["rows"]) == {run.BASELINE, "step 2"} and results["step"] == 2
  assert "step 2" in capsys.readouterr().out
  with open(tmp_path / "run" / "eval" / "step_2.json") as f:
    assert json.load(f)["rows"]["step 2"]["knn"] == results["rows"]["step 2"]["knn"]
  assert (tmp_path / "run" / "tb" / "eval").is_dir()
  assert (tmp_path / "run" / "tb" / "eval_random_init").is_dir()

  again = run.evaluate_workdir(workdir, evals="knn", settings=settings, verbose=False)
  assert again["baseline_cached"].endswith(run.BASELINE_FILE)      # baseline not recomputed
  assert again["rows"][run.BASELINE]["knn"] == results["rows"][run.BASELINE]["knn"]
  # A narrower evaluation adds to the results file; one on other records goes beside it.
  own = tmp_path / "run" / "eval" / "step_2.json"
  kept = json.loads(own.read_text())
  assert set(kept["rows"]["step 2"]) == {"knn", "retrieval"} and set(kept["masks"]) == {
      "gt", "grid_2"}
  import shutil
  other = str(tmp_path / "other_records")
  shutil.copytree(records_dir, other)
  run.evaluate_workdir(workdir, evals="knn", data_dir=other, settings=settings)
  assert json.loads(own.read_text()) == kept
  (elsewhere,) = (tmp_path / "run" / "eval").glob("on_other_records_*/step_2.json")
  assert json.loads(elsewhere.read_text())["data"]["records_dir"] == other
  assert "not the run's own records" in capsys.readouterr().out

  _, _, variables = checkpointing.load_encoder(workdir)
  with pytest.raises(ValueError, match="width"):                    # demo preset: width 0.25
    tv.torchvision_state_dict(variables, depth=18, width=config.model.width)
  # The export CLI refuses the same run with a message, not a traceback.
  cli = subprocess.run([sys.executable, "-m", "detcon_jax.export", f"--workdir={workdir}",
                        "--format=torchvision", f"--out={tmp_path / 'rn.pt'}"],
                       capture_output=True, text=True, timeout=300)
  has_torch = importlib.util.find_spec("torch") is not None
  assert cli.returncode != 0 and "Traceback" not in cli.stderr
  assert ("width" if has_torch else "PyTorch") in cli.stderr, cli.stderr[-2000:]
  assert not (tmp_path / "rn.pt").exists()
