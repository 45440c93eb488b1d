"""Background robustness (ImageNet-9 variants, BG-Gap) and the correlated demo option."""
import numpy as np
import pytest

from configs import moco_v2
from data_pipelines import batch as B
from data_pipelines import build, records
from detcon_jax.evaluate import background_robustness, features, run
from detcon_jax.train import loop
from harness import TinyEncoder

SIZE = 16


def _batch(labels, rng):
  """Noise images with a square foreground (instance 1) in the middle."""
  n = len(labels)
  inst = np.zeros((n, SIZE, SIZE), np.int32)
  inst[:, 4:12, 4:12] = 1
  return {B.IMAGE: rng.uniform(0.05, 1.0, (n, SIZE, SIZE, 3)).astype(np.float32),
          B.INSTANCES: inst, B.LABEL: np.asarray(labels)}


def _pool(num_classes=3, per_class=2):
  """Constant backgrounds: class k's are grey 0.1 * (k + 1) (distinct per class)."""
  labels = np.repeat(np.arange(num_classes), per_class)
  return np.ones((len(labels), SIZE, SIZE, 3), np.float32) * (0.1 * (labels + 1))[:, None, None,
                                                                                     None], labels


def test_only_fg_is_the_image_inside_and_black_outside():
  batch = _batch([0, 1, 2], np.random.default_rng(0))
  out = background_robustness.variant_images(batch, "only_fg", _pool(), first=0)
  fg = batch[B.INSTANCES] > 0
  assert np.all(out[~fg] == 0)
  np.testing.assert_array_equal(out[fg], batch[B.IMAGE][fg])
  assert np.all(batch[B.IMAGE][~fg] > 0)        # the zeros are not the image's own pixels


def test_mixed_backgrounds_come_from_the_right_class():
  batch = _batch([0, 1, 2, 0, 1, 2], np.random.default_rng(1))
  fg = batch[B.INSTANCES] > 0
  pool = _pool()
  for variant, same in (("mixed_same", True), ("mixed_rand", False)):
    out = background_robustness.variant_images(batch, variant, pool, first=0, seed=3)
    np.testing.assert_array_equal(out[fg], batch[B.IMAGE][fg])
    for img, label in zip(out, batch[B.LABEL]):
      bg = img[~fg[0]]
      assert np.all(bg == bg[0])                 # one pool background, whole
      bg_class = int(round(bg[0, 0] / 0.1)) - 1
      assert (bg_class == label) == same, (variant, label, bg_class)
  # Same seed and split positions -> the same picks (every model row sees the same images).
  np.testing.assert_array_equal(background_robustness.variant_images(batch, "mixed_rand", pool, 0, 3),
                                background_robustness.variant_images(batch, "mixed_rand", pool, 0, 3))


def test_only_bg_t_fills_the_hole_from_the_background():
  image = np.zeros((SIZE, SIZE, 3), np.float32) + 0.5
  fg = np.zeros((SIZE, SIZE), bool)
  fg[5:10, 5:10] = True
  image[fg] = 1.0
  out = background_robustness.tiled_background(image, fg)
  np.testing.assert_allclose(out, 128 / 255, atol=1 / 255)   # the white object is gone


def test_bg_gap_on_a_hand_made_case():
  assert background_robustness.bg_gap({"mixed_same": 0.75, "mixed_rand": 0.5}) == pytest.approx(0.25)
  # Separable train features (one-hot class codes); test variants where the probe's
  # answers are known: all right, half right, none right.
  eye = np.eye(3)
  train_y = np.repeat(np.arange(3), 10)
  test_y = np.tile(np.arange(3), 4)
  right, wrong = eye[test_y], eye[(test_y + 1) % 3]
  half = np.where((np.arange(len(test_y)) % 2 == 0)[:, None], right, wrong)
  feats = {"original": right, "only_fg": right, "mixed_same": right, "mixed_rand": half,
           "only_bg_t": wrong}
  out = background_robustness.evaluate(eye[train_y], train_y, feats, test_y, sweep="quick")
  assert (out["original"], out["mixed_same"], out["mixed_rand"], out["only_bg_t"]) == (
      1.0, 1.0, 0.5, 0.0)
  assert out["bg_gap"] == pytest.approx(0.5)


# --- On records: the runner, the refusal, the demo option --------------------------

def _example(cls, rng, bg_class):
  """A box of class colour (the one instance) on a background of bg_class's grey."""
  image = np.full((32, 32, 3), 40 + 60 * bg_class, np.uint8)
  image[8:24, 8:24] = (np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])[cls])
  image = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
  inst = np.zeros((32, 32), np.int32)
  inst[8:24, 8:24] = 1
  return dict(image=image, label=cls, instances=inst, classes=[cls], masks={"gt": inst})


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  out = str(tmp_path_factory.mktemp("bgrecords"))
  build.write_records(out, {  # train: background = class; test: background random
      "train": [_example(c, rng, c) for c in range(3) for _ in range(4)],
      "test": [_example(c, rng, int(rng.integers(3))) for c in range(3) for _ in range(2)]},
      num_classes=3, class_names=["r", "g", "b"])
  return out


def test_background_evaluation_in_the_runner(records_dir, tmp_path):
  model = TinyEncoder()
  settings = run.Settings(image_size=32, batch_size=8, linear_sweep="quick",
                          retrieval_dilated=False)
  results, pictures = run.evaluate_variables(
      model, {run.BASELINE: features.random_init_variables(model, 32)}, records_dir,
      "linear,background", settings)
  d = results["details"][run.BASELINE]["background"]
  assert d["original"] == results["rows"][run.BASELINE]["linear"]   # the same probe
  assert results["rows"][run.BASELINE]["background"] == pytest.approx(
      d["mixed_same"] - d["mixed_rand"])
  assert pictures["background"].shape == (4, 32, 5 * 32 + 4 * 2, 3)
  table = run.format_table(results)
  assert "BG-Gap" in table and "mixed_rand" in table
  run.write_tensorboard(str(tmp_path), 0, results, pictures)


def test_background_evaluation_needs_gt_foregrounds():
  manifest = {"num_classes": 3, "splits": {"train": {}, "test": {}}, "has_gt": False}
  with pytest.raises(ValueError, match=r"background: no ground-truth instance maps"):
    run.check_data(("background",), manifest, "rec")


def test_demo_correlation_is_recorded_and_never_reused(tmp_path):
  out = str(tmp_path / "demo")
  opts = dict(num_train=4, num_test=2, image_size=32, workers=1, progress=False)
  with pytest.raises(build.DemoSettingsError, match=r"in \[0, 1\]"):
    build.ensure_demo_records(out, bg_correlation=1.5, **opts)      # before any build
  assert not (tmp_path / "demo").exists()
  m = build.ensure_demo_records(out, bg_correlation=0.9, **opts)
  assert m["demo"]["bg_correlation"] == 0.9
  before = {p.name: p.read_bytes() for p in (tmp_path / "demo").iterdir()}
  assert build.ensure_demo_records(out, bg_correlation=0.9, **opts) == m   # reused
  with pytest.raises(build.DemoSettingsError, match=r"bg_correlation=0.9, not 0;.*records_dir"):
    build.ensure_demo_records(out, **opts)
  assert {p.name: p.read_bytes() for p in (tmp_path / "demo").iterdir()} == before
  assert records.read_manifest(out) == m


def test_config_passes_the_correlation_to_the_demo_build(monkeypatch):
  seen = {}
  monkeypatch.setattr(build, "ensure_demo_records", lambda out, **kw: seen.update(kw, out=out))
  config = moco_v2.get_config("demo")
  assert config.data.demo_bg_correlation == 0.0
  config.data.demo_bg_correlation, config.data.records_dir = 0.9, "data/demo_bgcorr"
  loop.ensure_records(config)
  assert seen["bg_correlation"] == 0.9 and seen["out"] == "data/demo_bgcorr"
