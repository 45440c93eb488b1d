"""tfds segmentation features as GT instance maps (oxford_iiit_pet trimaps, mocked builds)."""
import numpy as np
import pytest

from data_pipelines import build, records, tfds_segmentation
from detcon_jax.evaluate import features, run
from harness import TinyEncoder

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

H, W, N = 32, 40, 12


def _pets():
  """N known examples: a trimap with a pet box (1), its border ring (3), background (2)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, H, W, 3), dtype=np.uint8)
  trimaps = np.full((N, H, W, 1), 2, np.uint8)
  for i in range(N):
    top, left = 3 + i, 4 + i
    trimaps[i, top:top + 12, left:left + 14] = 3
    trimaps[i, top + 1:top + 11, left + 1:left + 13] = 1
  labels = np.arange(N) % 3
  return images, trimaps, labels


def _mock_pets(self, split, decoders=None, read_config=None, shuffle_files=False):
  """as_dataset_fn for tfds.testing.mock_data: the same N examples for train and test."""
  if "validation" in str(split):
    raise ValueError("no validation split")
  images, trimaps, labels = _pets()
  return tf.data.Dataset.from_tensor_slices(dict(
      image=images, segmentation_mask=trimaps, label=labels.astype(np.int64),
      species=labels.astype(np.int64) % 2, file_name=np.array([f"{i}.jpg" for i in range(N)]),
      head_bbox=np.zeros((N, 4), np.float32)))


@pytest.fixture(scope="module")
def pet_records(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pets"))
  with tfds.testing.mock_data(as_dataset_fn=_mock_pets, policy=tfds.testing.MockPolicy.USE_CODE):
    m = build.build("tfds:oxford_iiit_pet", out, masks="grid,gt", workers=1, min_side=16,
                    image_size=H, shard_size=100, progress=False)
  return out, m


def test_pet_build_stores_the_trimap_foreground_as_gt(pet_records):
  out, m = pet_records
  assert m["has_gt"] and m["splits"]["train"]["count"] == N and m["num_classes"] == 37
  _, trimaps, labels = _pets()
  path = records.join(out, m["splits"]["train"]["shards"][0]["file"])
  spec = records.feature_spec(list(m["masks"]), gt=True)
  for i, raw in enumerate(tf.data.TFRecordDataset(path)):
    ex = tf.io.parse_single_example(raw, spec)
    want = (trimaps[i, ..., 0] != 2).astype(np.int32)        # pet (1) + border (3)
    np.testing.assert_array_equal(records.decode_ids(ex[records.GT_INSTANCES].numpy()), want)
    np.testing.assert_array_equal(records.decode_ids(ex["mask/gt"].numpy()), want)  # 'gt' masks
    assert list(ex[records.GT_CLASSES].values.numpy()) == [labels[i]]


def test_the_trimap_converter_and_the_resize_keep_the_pet():
  trimap = np.array([[2, 3, 3], [2, 1, 3], [2, 2, 2]], np.uint8)[..., None]
  np.testing.assert_array_equal(tfds_segmentation.trimap_foreground(trimap),
                                [[0, 1, 1], [0, 1, 1], [0, 0, 0]])
  gt = (np.kron(tfds_segmentation.trimap_foreground(trimap), np.ones((2, 2), int)), [5])
  (inst, classes), _ = tfds_segmentation.fit(gt, (6, 6, 3), (3, 3, 3))     # halved
  np.testing.assert_array_equal(inst, [[0, 1, 1], [0, 1, 1], [0, 0, 0]])
  assert tfds_segmentation.fit(gt, (6, 8, 3), (3, 4, 3)) == (
      None, "segmentation map 6x6 px differs from its image's 8x6")
  np.testing.assert_array_equal(tfds_segmentation.binary_foreground(
      np.array([[0, 127, 128, 255]], np.uint8)), [[0, 0, 1, 1]])
  assert tfds_segmentation.lookup("oxford_iiit_pet:4.*.*") is not None
  assert tfds_segmentation.lookup("mnist") is None


def test_background_evaluation_runs_on_pet_records(pet_records):
  out, m = pet_records
  run.check_data(("background", "masks", "retrieval"), m, out)      # no longer refused
  model = TinyEncoder()
  settings = run.Settings(image_size=H, batch_size=4, linear_sweep="quick",
                          retrieval_dilated=False)
  results, _ = run.evaluate_variables(
      model, {run.BASELINE: features.random_init_variables(model, H)}, out,
      "background,masks,retrieval", settings)
  d = results["details"][run.BASELINE]["background"]
  assert results["rows"][run.BASELINE]["background"] == pytest.approx(
      d["mixed_same"] - d["mixed_rand"])
  assert 0.0 <= results["rows"][run.BASELINE]["retrieval"] <= 1.0
  gt = results["masks"]["gt"]                  # the stored 'gt' maps are the GT itself
  assert gt["abo"] == 1.0 and gt["num_instances"] == N


def test_tfds_without_segmentation_is_still_refused(tmp_path):
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    m = build.build("tfds:mnist", str(tmp_path), masks="grid", workers=1, min_side=16,
                    image_size=32, shard_size=100, progress=False)
    with pytest.raises(ValueError, match="has no instance maps"):
      build.build("tfds:mnist", str(tmp_path / "gt"), masks="grid,gt", workers=1,
                  progress=False)
  assert not m["has_gt"]
  with pytest.raises(ValueError) as e:
    run.check_data(("background",), m, str(tmp_path))
  assert "\n" not in str(e.value) and "background: no ground-truth instance maps" in str(e.value)
