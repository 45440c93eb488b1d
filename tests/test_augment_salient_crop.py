"""CAST's saliency-constrained crop: coverage of accepted crops, phi = 0 is the plain crop,
the whole-image fallback, and the op inside tf.data."""
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import augment as aug
from data_pipelines import views as V


def _seed(i):
  return tf.constant([i, 7], tf.int64)


def _coverage(saliency, box):
  y, x, h, w = (int(v) for v in box)
  salient = saliency > aug.SALIENT
  return salient[y:y + h, x:x + w].sum() / salient.sum()


def _blob(h=48, w=64, box=(30, 40, 12, 16)):
  s = np.zeros((h, w), np.float32)
  y, x, bh, bw = box
  s[y:y + bh, x:x + bw] = 0.9
  return s


def test_accepted_crops_cover_phi_of_the_salient_area():
  saliency = _blob()                       # 6% of the image, in a corner
  plain_cov, fallbacks = [], 0
  sample = tf.function(lambda seed: aug.salient_crop_box(seed, tf.constant(saliency),
                                                         (0.2, 1.0), phi=0.2))
  for i in range(60):
    box, fell_back = sample(_seed(i))
    if bool(fell_back):
      fallbacks += 1
      np.testing.assert_array_equal(box, [0, 0, 48, 64])        # the whole image
      continue
    assert _coverage(saliency, box) >= 0.2 - 1e-6
    plain_cov.append(_coverage(saliency, aug.crop_box(_seed(i), 48, 64, (0.2, 1.0))))
  # The constraint matters here: unconstrained crops often miss the object.
  assert fallbacks < 60 and np.mean(np.asarray(plain_cov) < 0.2) > 0.1


def test_phi_zero_is_the_plain_crop_exactly():
  saliency = tf.constant(_blob())
  sample = tf.function(lambda seed: aug.salient_crop_box(seed, saliency, (0.08, 1.0),
                                                         (0.75, 4 / 3), phi=0.0))
  for i in range(20):
    box, fell_back = sample(_seed(i))
    np.testing.assert_array_equal(box, aug.crop_box(_seed(i), 48, 64, (0.08, 1.0), (0.75, 4 / 3)))
    assert not bool(fell_back)


def test_impossible_constraint_falls_back_to_the_whole_image():
  # Two far-apart salient corners: no crop of <= 20% of the image covers 90% of both.
  s = np.zeros((40, 40), np.float32)
  s[:4, :4] = s[-4:, -4:] = 1.0
  box, fell_back = aug.salient_crop_box(_seed(0), tf.constant(s), (0.05, 0.2), phi=0.9)
  assert bool(fell_back)
  np.testing.assert_array_equal(box, [0, 0, 40, 40])


def test_phi_lowered_as_the_reference_when_small_crops_cannot_reach_it():
  # Salient area = the whole image: a 20% crop covers 20%, so phi 0.5 becomes 0.2.
  box, fell_back = aug.salient_crop_box(_seed(3), tf.ones((32, 32)), (0.2, 0.2), phi=0.5)
  assert not bool(fell_back) and _coverage(np.ones((32, 32)), box) >= 0.19


def test_no_salient_pixel_takes_the_first_draw():
  box, fell_back = aug.salient_crop_box(_seed(5), tf.zeros((32, 32)), (0.2, 1.0), phi=0.2)
  np.testing.assert_array_equal(box, aug.crop_box(_seed(5), 32, 32, (0.2, 1.0)))
  assert not bool(fell_back)


def test_view_params_use_it_only_when_asked_and_inside_tf_data():
  plain = V.ViewSpec("view1", 16, (0.2, 1.0), "moco_v2", (V.SALIENCY,))
  constrained = V.ViewSpec("view1", 16, (0.2, 1.0), "moco_v2", (V.SALIENCY,),
                           min_salient_cover=0.2)
  saliency = tf.constant(_blob())
  p = aug.sample_view_params(_seed(1), 48, 64, plain, saliency)
  assert "crop_fallback" not in p
  with pytest.raises(ValueError, match="needs the image's saliency|need the image's saliency"):
    aug.sample_view_params(_seed(1), 48, 64, constrained)

  def params(i):
    return aug.sample_view_params(tf.stack([i, tf.constant(7, tf.int64)]), 48, 64,
                                  constrained, saliency)["box"]
  ds = tf.data.Dataset.range(4).map(params)
  for i, box in enumerate(ds.as_numpy_iterator()):
    eager = aug.sample_view_params(_seed(i), 48, 64, constrained, saliency)
    np.testing.assert_array_equal(box, eager["box"])
    assert bool(eager["crop_fallback"]) or _coverage(_blob(), box) >= 0.2 - 1e-6


def test_input_pipeline_constrains_crops_and_counts_them(tmp_path):
  """Records with a small salient box: every constrained view sees some of it, and the
  iterator counts the constrained crops and their fallbacks."""
  from data_pipelines import build
  from data_pipelines import input as input_lib
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(8):
    image = rng.integers(0, 255, (48, 64, 3), np.uint8)
    y, x = rng.integers(0, 40), rng.integers(0, 56)
    saliency = np.zeros((48, 64), np.float32)
    saliency[y:y + 8, x:x + 8] = 1.0
    examples.append(dict(image=image, masks={"grid": np.zeros((48, 64), np.int32)},
                         saliency=saliency))
  build.write_records(str(tmp_path), {"train": examples})
  views = [V.ViewSpec(f"view{i}", 16, (0.1, 0.3), "moco_v2", (V.SALIENCY,),
                      min_salient_cover=0.3) for i in (1, 2)]
  it = input_lib.train_iterator(str(tmp_path), batch_size=8, views=views, host_index=0,
                                host_count=1)
  for _ in range(2):
    b = next(it)
    for v in ("view1", "view2"):
      assert np.all(b[f"{v}/saliency"].max(axis=(1, 2)) > 0.5), v
  assert it.stats["constrained_crops"] == 2 * 8 * 2
  assert 0 <= it.stats["crop_fallbacks"] <= it.stats["constrained_crops"]
