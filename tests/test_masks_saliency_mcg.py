"""Saliency detectors, saliency metrics, and the MCG-role grouping hierarchy."""

import numpy as np
import pytest
from skimage.morphology import reconstruction
from sklearn.metrics import roc_auc_score

from data_pipelines import build, records
from data_pipelines import input as input_lib
from data_pipelines import masks as masks_lib
from data_pipelines import views as V
from data_pipelines.masks import mcg, saliency
from detcon_jax.evaluate import mask_quality as Q
from detcon_jax.evaluate import run


def _blob_image(size=64, radius=6, seed=0):
  """A small red disc off-centre on a grey noise background: (uint8 RGB, disc mask).
  (Spectral residual finds small objects; on large ones it marks only their edges.)"""
  rng = np.random.default_rng(seed)
  img = np.clip(rng.normal(120, 25, (size, size, 3)), 0, 255).astype(np.uint8)
  yy, xx = np.mgrid[:size, :size]
  disc = (yy - 0.45 * size) ** 2 + (xx - 0.55 * size) ** 2 <= radius ** 2
  img[disc] = (220, 40, 30)
  return img, disc


@pytest.mark.parametrize("name", sorted(saliency.REGISTRY))
def test_detectors_find_a_salient_blob(name):
  img, disc = _blob_image()
  sal = saliency.compute(img, name)
  assert sal.shape == disc.shape and sal.dtype == np.float32
  assert sal.min() == 0.0 and sal.max() == 1.0
  auc = Q.summarize_saliency(Q.saliency_quality(sal[None], disc[None]))["auc"]
  assert auc > 0.9, (name, auc)


def test_detector_errors():
  with pytest.raises(ValueError, match="choose one of"):
    saliency.compute(np.zeros((8, 8, 3), np.uint8), "deepusps")
  with pytest.raises(ValueError, match="uint8 RGB"):
    saliency.compute(np.zeros((8, 8), np.uint8))


def test_mbd_scans_known_answer():
  """Barrier distance to the border: 0 on a flat image; a bright square on a dark field
  has barrier (max - min along the best path) = its contrast inside, 0 outside."""
  flat = np.full((9, 9), 0.3, np.float32)
  np.testing.assert_array_equal(saliency._mbd_scans(flat, 3), 0)
  img = np.zeros((9, 9), np.float32)
  img[3:6, 3:6] = 0.8
  want = np.where(img > 0, 0.8, 0.0)
  np.testing.assert_allclose(saliency._mbd_scans(img, 3), want, atol=1e-6)


def test_reconstruction_equals_scikit_image():
  rng = np.random.default_rng(1)
  mask = rng.random((30, 40)).astype(np.float32)
  marker = np.minimum(mask, rng.random((30, 40)).astype(np.float32) * 0.5)
  np.testing.assert_array_equal(saliency._reconstruct(marker, mask),
                                reconstruction(marker, mask, method="dilation"))


def test_saliency_metrics_hand_computed():
  s = np.array([[[1.0, 0.5], [0.5, 0.0]]])
  g = np.array([[[True, True], [False, False]]])
  out = Q.summarize_saliency(Q.saliency_quality(s, g))
  assert out["mae"] == pytest.approx(0.25)                   # (0 + .5 + .5 + 0) / 4
  assert out["auc"] == pytest.approx(3.5 / 4)               # pairs: 1, 1, 1/2, 1
  # t <= 0: P 1/2, R 1 -> 0.565; t <= 0.5: P 2/3, R 1 -> 0.722; above: P 1, R 1/2 -> 0.8125
  assert out["max_f"] == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))
  assert out["max_f_threshold"] == pytest.approx(129 / 255)
  # Images with an empty foreground are left out and counted; sums merge.
  empty = Q.saliency_quality(s, np.zeros_like(g))
  assert empty["num_images"] == 0 and empty["num_skipped"] == 1
  merged = Q.summarize_saliency(Q.merge_saliency([Q.saliency_quality(s, g), empty]))
  assert merged["auc"] == pytest.approx(out["auc"]) and merged["num_skipped"] == 1


def test_saliency_auc_matches_sklearn_and_mean_f_over_images():
  rng = np.random.default_rng(0)
  s = np.round(rng.random((3, 12, 12)) * 255) / 255
  g = rng.random((3, 12, 12)) < 0.3
  out = Q.summarize_saliency(Q.saliency_quality(s, g))
  assert out["auc"] == pytest.approx(np.mean([roc_auc_score(gi.ravel(), si.ravel())
                                              for si, gi in zip(s, g)]))
  assert out["mae"] == pytest.approx(np.abs(s - g).mean())
  t = out["max_f_threshold"]
  f = []
  for si, gi in zip(s, g):
    pred = si >= t - 1e-9
    p, r = (pred & gi).sum() / pred.sum(), (pred & gi).sum() / gi.sum()
    f.append(1.3 * p * r / (0.3 * p + r))
  assert out["max_f"] == pytest.approx(np.mean(f))


def _quadrants(size=64, seed=0):
  rng = np.random.default_rng(seed)
  colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]])
  quad = (np.arange(size)[:, None] >= size // 2) * 2 + (np.arange(size)[None] >= size // 2)
  img = np.clip(colours[quad] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
  return img, quad.astype(np.int32)


def test_mcg_levels_are_nested_partitions_with_the_asked_counts():
  img, quad = _quadrants()
  levels = mcg.compute_levels(img, (16, 8, 4), superpixels=50)
  for level, k in zip(levels, (16, 8, 4)):
    assert level.shape == quad.shape and level.dtype == np.int32
    assert len(np.unique(level)) == k and level.min() == 0 and level.max() == k - 1
  for fine, coarse in zip(levels, levels[1:]):
    pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()], 1), axis=0)
    assert len(pairs) == len(np.unique(fine))       # each fine segment in one coarse one
  # The weakest boundaries merge first: four regions are the four quadrants (up to a
  # few pixels where SLIC follows the noise).
  assert Q.best_overlaps(quad + 1, levels[2]).min() > 0.99


def test_mcg_merge_sequence_known_answer():
  """Three regions in a row, boundary 0-1 weak (0.1) and 1-2 strong (0.9): 0 and 1 merge
  first; merged boundaries keep summed strength and length."""
  pairs = np.array([[0, 1], [1, 2], [0, 2]])
  merges = mcg.merge_sequence(3, pairs, np.array([0.2, 1.8, 2.0]), np.array([2.0, 2.0, 4.0]))
  assert {frozenset(merges[0])} == {frozenset((0, 1))} and len(merges) == 2
  lv = mcg.levels_from_merges(3, merges, (3, 2, 1))
  np.testing.assert_array_equal(lv[0], [0, 1, 2])
  assert lv[1][0] == lv[1][1] != lv[1][2] and len(set(lv[2])) == 1


def test_build_with_mcg_and_saliency_then_train_and_evaluate(tmp_path):
  out = str(tmp_path)
  m = build.build("demo", out, masks="fh,mcg,gt,saliency", num_train=6, num_test=2,
                  image_size=48, shard_size=6, workers=1, progress=False)
  assert {n for n in m["masks"] if n.startswith("mcg_")} == {"mcg_16", "mcg_8", "mcg_4"}
  assert m["saliency"]["detector"] == saliency.DEFAULT and records.has_field(m, "saliency")
  assert masks_lib.expand("mcg", mcg_levels=(5,)) == {
      "mcg_5": dict(kind="mcg", level=5, superpixels=mcg.SUPERPIXELS, sigma=mcg.EDGE_SIGMA)}
  views = (V.ViewSpec("view1", 32, fields=(V.MASKS, V.FOREGROUND)),
           V.ViewSpec("view2", 32, augment="byol2", fields=(V.MASKS,)))
  b = next(input_lib.train_iterator(out, batch_size=2, views=views, mask_source="mcg",
                                    host_index=0, host_count=1))
  assert b["view1/masks"].max() < 16 and b["view1/foreground"].shape == (2, 32, 32)
  res = run._masks(out, m, run.Settings(batch_size=4), 48)
  assert set(res) >= {"mcg_16", "mcg (all maps)", "fh (all maps)", "saliency"}
  assert res["mcg (all maps)"]["abo"] >= max(res[n]["abo"] for n in ("mcg_16", "mcg_8", "mcg_4"))
  assert res["mcg_4"]["kind_images_per_s_core"] > 0
  assert res["saliency"]["auc"] > 0.6 and res["saliency"]["detector"] == "mbd"
  text = run.format_table({"rows": {}, "masks": {k: v for k, v in res.items() if k != "saliency"},
                           "saliency": res["saliency"], "settings": {"mask_split": "train"}})
  assert "mcg (all maps)" in text and "max F (beta^2=0.3)" in text
