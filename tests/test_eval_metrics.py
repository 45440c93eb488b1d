"""Known-answer tests of the evaluation math: kNN, linear probe, retrieval, ABO."""
import numpy as np
import pytest

from detcon_jax.evaluate import knn, linear_probe, mask_quality, retrieval


def separable(n_per_class=40, num_classes=4, dim=16, seed=0):
  """Clusters around orthogonal directions: linearly separable, cosine-separable."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), n_per_class)
  centers = np.eye(dim)[:num_classes] * 5.0
  feats = centers[labels] + rng.normal(scale=0.3, size=(len(labels), dim))
  perm = rng.permutation(len(labels))
  return feats[perm].astype(np.float32), labels[perm]


def test_knn_separable_is_perfect():
  x, y = separable()
  xt, yt = separable(seed=1)
  assert knn.knn_top1(x, y, xt, yt, num_classes=4) == 1.0


def test_knn_random_labels_is_chance():
  rng = np.random.default_rng(0)
  x, xt = rng.normal(size=(2000, 32)), rng.normal(size=(1000, 32))
  y, yt = rng.integers(0, 4, 2000), rng.integers(0, 4, 1000)
  assert abs(knn.knn_top1(x, y, xt, yt, num_classes=4) - 0.25) < 0.06


def test_knn_weights_votes_by_similarity():
  # Two near neighbours of class 1 outweigh three far ones of class 0 at T = 0.07.
  mem = np.array([[1, 0.05], [1, -0.05], [0.6, 0.8], [0.6, -0.8], [0.5, 0.85]])
  labels = np.array([1, 1, 0, 0, 0])
  pred = knn.knn_predict(mem, labels, np.array([[1.0, 0.0]]), num_classes=2, k=5)
  assert pred.tolist() == [1]


def test_knn_skips_unlabelled_and_rejects_bad_labels():
  x, y = separable()
  y = y.copy(); y[:5] = -1
  assert knn.knn_top1(x, y, x, y, num_classes=4) == 1.0
  with pytest.raises(ValueError, match="train labels"):
    knn.knn_predict(x, y, x, num_classes=4)


def test_linear_probe_separable_is_perfect():
  x, y = separable()
  xt, yt = separable(seed=1)
  out = linear_probe.linear_probe(x, y, xt, yt, sweep="quick")
  assert out["top1"] == 1.0
  assert "5 values" in out["sweep"]


def test_linear_probe_random_labels_is_chance():
  rng = np.random.default_rng(0)
  x, xt = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  y, yt = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
  assert abs(linear_probe.linear_probe(x, y, xt, yt, sweep="quick")["top1"] - 0.25) < 0.08


def test_linear_probe_grid():
  assert len(linear_probe.l2_grid("full")) == 45
  np.testing.assert_allclose(linear_probe.l2_grid("full")[[0, -1]], [1e-5, 1e5])
  with pytest.raises(ValueError, match="sweep"):
    linear_probe.l2_grid("huge")


def scenes(n, size=16, num_classes=3, seed=0):
  """Semantic maps with two rectangles of random classes on background."""
  rng = np.random.default_rng(seed)
  sem = np.zeros((n, size, size), np.int32)
  for i in range(n):
    for _ in range(2):
      r, c = rng.integers(0, size - 4, 2)
      h, w = rng.integers(3, 8, 2)
      sem[i, r:r + h, c:c + w] = rng.integers(1, num_classes + 1)
  return sem


def test_retrieval_one_hot_ground_truth_is_perfect():
  train, test = scenes(20), scenes(10, seed=1)
  one_hot = lambda s: np.eye(4, dtype=np.float32)[s]
  out = retrieval.segment_retrieval(one_hot(train), train, one_hot(test), test, num_classes=3)
  assert out["miou"] == 1.0
  np.testing.assert_array_equal(out["predictions"], test)


def test_retrieval_upsampled_coarse_features_keep_labels():
  # 4x4 one-hot features of 16x16 block maps; clustering at 8x8 after upsampling.
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 4, (12, 4, 4)).astype(np.int32)
  sem = np.repeat(np.repeat(coarse, 4, 1), 4, 2)
  feats = np.eye(4, dtype=np.float32)[coarse]
  out = retrieval.segment_retrieval(feats[:8], sem[:8], feats[8:], sem[8:], num_classes=3,
                                    resolution=8)
  assert out["miou"] > 0.6 and "upsampled to 8x8" in out["resolution"]


def test_retrieval_random_features_are_poor():
  train, test = scenes(20), scenes(10, seed=1)
  rng = np.random.default_rng(0)
  out = retrieval.segment_retrieval(rng.normal(size=(20, 16, 16, 8)), train,
                                    rng.normal(size=(10, 16, 16, 8)), test, num_classes=3)
  assert out["miou"] < 0.5


def test_kmeans_separates_distinct_points():
  import jax
  feats = np.zeros((1, 4, 4, 3), np.float32)
  feats[0, :2, :, 0] = 1; feats[0, 2:, :2, 1] = 1; feats[0, 2:, 2:, 2] = 1
  _, valid, assign = retrieval.image_regions(feats, jax.random.PRNGKey(0), k=5)
  a = np.asarray(assign[0])
  assert len(np.unique(a[:2])) == 1 and len(np.unique(a[2:, :2])) == 1
  assert len({a[0, 0], a[2, 0], a[2, 2]}) == 3
  assert np.asarray(valid).sum() >= 3


def test_miou_counts_background_and_skips_absent_classes():
  gt = np.array([[[0, 0, 1, 1]]]); pred = np.array([[[0, 1, 1, 1]]])
  iou = retrieval.iou_from_confusion(retrieval.confusion_matrix(gt, pred, 3))
  np.testing.assert_allclose(iou[:2], [0.5, 2 / 3]); assert np.isnan(iou[2])


def test_abo_of_ground_truth_is_one():
  inst = np.zeros((2, 8, 8), np.int32)
  inst[0, 1:4, 1:4] = 1; inst[0, 4:8, 2:6] = 7; inst[1, 0:2, :] = 3
  out = mask_quality.average_best_overlap(inst, inst)
  assert out["abo"] == 1.0 and out["num_instances"] == 3
  assert out["mean_segments"] == 2.5  # 3 ids in image 0, 2 in image 1


def test_abo_partial_overlap_known_answer():
  inst = np.zeros((1, 4, 4), np.int32); inst[0, :, :2] = 1        # left half: 8 px
  seg = np.zeros((1, 4, 4), np.int32); seg[0, :2, :] = 5          # top half: 8 px
  # intersections with instance 1: top 4 px (IoU 4/12), bottom 4 px (IoU 4/12)
  out = mask_quality.average_best_overlap(inst, seg)
  assert out["abo"] == pytest.approx(1 / 3)
  grid = np.arange(16).reshape(1, 4, 4)                           # 1-pixel segments: IoU 1/8
  assert mask_quality.average_best_overlap(inst, grid)["abo"] == pytest.approx(1 / 8)


def test_abo_merge_weights_by_instances():
  a = {"abo": 1.0, "num_instances": 3, "mean_segments": 2.0, "num_images": 1}
  b = {"abo": 0.0, "num_instances": 1, "mean_segments": 4.0, "num_images": 3}
  m = mask_quality.merge([a, b])
  assert m["abo"] == 0.75 and m["mean_segments"] == 3.5


def test_abo_dense_and_per_image_paths_agree():
  rng = np.random.default_rng(0)
  inst = rng.integers(0, 4, (3, 12, 12)); seg = rng.integers(0, 9, (3, 12, 12)) * 1000
  dense = mask_quality.batch_best_overlaps(inst, seg)
  per_image = mask_quality.batch_best_overlaps(inst, seg, max_table=0)
  np.testing.assert_allclose(dense, per_image)
  assert len(dense) == sum(len(set(np.unique(i)) - {0}) for i in inst)
