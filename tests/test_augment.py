"""Keyed augmentation ops, each eagerly and inside a tf.data map: known answers on a
labelled checkerboard, ids that never mix, boxes that follow the pixels they cover."""

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import augment
from data_pipelines import views as V

CELL, CELLS = 4, 8                   # 8 x 8 cells of 4 px: a 32 x 32 labelled checkerboard
S = CELL * CELLS


def checkerboard():
  """Cell (r, c) has id r * CELLS + c + 1000 (past uint8) and image value id / 2000 in channel 0."""
  cell = np.arange(S) // CELL
  ids = (cell[:, None] * CELLS + cell[None, :] + 1000).astype(np.int32)
  image = np.stack([ids / 2000, np.zeros_like(ids), ((cell[:, None] + cell) % 2)], -1)
  return {"image": tf.constant(image, tf.float32), "masks": tf.constant(ids)}


def cell_box(r, c):
  return [CELL * r, CELL * c, CELL * (r + 1), CELL * (c + 1)]


@pytest.fixture(params=["eager", "tf.data"])
def mode(request):
  return request.param


def run_many(mode, fn, inputs):
  """fn over the elements of inputs (a dict of stacked tensors): eagerly one by one, or in
  one Dataset.map; a list of numpy dicts either way."""
  ds = tf.data.Dataset.from_tensor_slices(inputs)
  outs = [fn(x) for x in ds] if mode == "eager" else list(ds.map(fn))
  return [{k: np.asarray(v) for k, v in o.items()} for o in outs]


@pytest.fixture
def run(mode):
  """Apply fn(data) eagerly, or inside Dataset.map; numpy results either way."""
  return lambda fn, data: run_many(mode, fn, {k: tf.convert_to_tensor(v)[None]
                                              for k, v in data.items()})[0]


def test_crop_then_resize_one_to_one_is_a_pixel_copy(run):
  d = checkerboard()
  ids = d["masks"].numpy()
  out = run(lambda x: augment.resized_crop(x, tf.constant([3, 5, 16, 16]), 16), d)
  np.testing.assert_array_equal(out["masks"], ids[3:19, 5:21])
  np.testing.assert_allclose(out["image"], d["image"].numpy()[3:19, 5:21], atol=1e-6)


def test_nearest_resize_known_answer_and_image_stays_aligned(run):
  d = checkerboard()
  ids = d["masks"].numpy()
  box = tf.constant([8, 4, 16, 16])                      # cell-aligned: cells (2..5, 1..4)
  up = run(lambda x: augment.resized_crop(x, box, 32), d)     # 2x: every pixel twice
  np.testing.assert_array_equal(up["masks"],
                                np.repeat(np.repeat(ids[8:24, 4:20], 2, 0), 2, 1))
  down = run(lambda x: augment.resized_crop(x, box, 8), d)    # 1/2: half-pixel centres 2j+1
  np.testing.assert_array_equal(down["masks"], ids[8:24, 4:20][1::2, 1::2])
  # Upsampled 2x, the two centre pixels (per axis) of each 8 px output cell only see
  # their own cell through the bicubic kernel: there the image shows the cell's id.
  centre = np.isin(np.arange(32) % 8, (3, 4))
  centre = centre[:, None] & centre[None, :]
  np.testing.assert_allclose(up["image"][..., 0][centre], up["masks"][centre] / 2000, atol=1e-5)
  assert up["image"].min() >= 0 and up["image"].max() <= 1     # bicubic clipped to [0, 1]


def test_resize_never_mixes_ids_and_keeps_large_ids_exact(run):
  rng = np.random.default_rng(0)
  ids = rng.integers(2**24 - 50, 2**24, (40, 40)).astype(np.int32)   # float32 exact up to 2^24
  d = {"image": tf.zeros([40, 40, 3]), "masks": tf.constant(ids)}
  for size in (7, 13, 29, 57):
    out = run(lambda x, size=size: augment.resized_crop(x, tf.constant([2, 3, 31, 23]), size), d)
    assert out["masks"].shape == (size, size) and out["masks"].dtype == np.int32
    assert set(np.unique(out["masks"])) <= set(np.unique(ids[2:33, 3:26]))


def test_flip_mirrors_fields_and_boxes(run):
  d = dict(checkerboard(), boxes=tf.constant([cell_box(1, 0), [0.5, 3.0, 7.0, 10.5]], tf.float32))
  out = run(lambda x: augment.flip(x, tf.constant(True)), d)
  np.testing.assert_array_equal(out["masks"], d["masks"].numpy()[:, ::-1])
  np.testing.assert_array_equal(out["image"], d["image"].numpy()[:, ::-1])
  np.testing.assert_allclose(out["boxes"], [[4, S - 4, 8, S], [0.5, S - 10.5, 7.0, S - 3.0]])
  assert out["boxes_valid"].all()
  same = run(lambda x: augment.flip(x, tf.constant(False)), d)
  np.testing.assert_array_equal(same["boxes"], d["boxes"].numpy())
  np.testing.assert_array_equal(same["masks"], d["masks"].numpy())


def test_boxes_map_to_the_pixels_they_covered(run):
  """Cell boxes through crop + 2x resize + flip cover exactly the pixels of their cell id."""
  d = checkerboard()
  ids = d["masks"].numpy()
  cells = [(2, 1), (3, 4), (5, 2), (0, 0), (7, 7), (2, 0)]
  d["boxes"] = tf.constant([cell_box(*c) for c in cells], tf.float32)
  p = {"box": tf.constant([8, 4, 16, 16]), "flip": tf.constant(True)}   # cells (2..5, 1..4)
  out = run(lambda x: augment.geometric(x, p, 32), d)
  np.testing.assert_array_equal(out["boxes_valid"], [True, True, True, False, False, False])
  for (r, c), b, ok in zip(cells, out["boxes"], out["boxes_valid"]):
    if ok:
      y0, x0, y1, x1 = b.astype(int)
      np.testing.assert_array_equal(b, [y0, x0, y1, x1])
      inside = np.zeros_like(out["masks"], bool)
      inside[y0:y1, x0:x1] = True
      np.testing.assert_array_equal(out["masks"] == ids[CELL * r, CELL * c], inside)
    else:
      assert (b[2] - b[0]) * (b[3] - b[1]) == 0      # clipped to nothing, flagged invalid


def test_crop_clips_boxes_partly_outside(run):
  d = dict(checkerboard(), boxes=tf.constant([[2.0, 2.0, 12.0, 12.0], [20.0, 0.0, 30.0, 4.0]]))
  out = run(lambda x: augment.crop(x, tf.constant([4, 6, 10, 10])), d)
  np.testing.assert_allclose(out["boxes"], [[0, 0, 8, 6], [10, 0, 10, 0]])
  np.testing.assert_array_equal(out["boxes_valid"], [True, False])
  again = run(lambda x: augment.resize(x, 20), out)   # validity survives later ops
  np.testing.assert_array_equal(again["boxes_valid"], [True, False])
  np.testing.assert_allclose(again["boxes"][0], [0, 0, 16, 12])


def test_smooth_fields_resample_bilinear(run):
  ramp = np.tile(np.arange(16, dtype=np.float32) / 15, (16, 1))
  d = {"image": tf.zeros([16, 16, 3]), "saliency": tf.constant(ramp),
       "background": tf.constant(np.stack([ramp] * 3, -1))}
  out = run(lambda x: augment.resize(x, 32), d)
  sal = out["saliency"]
  assert sal.shape == (32, 32) and out["background"].shape == (32, 32, 3)
  np.testing.assert_allclose(sal[:, 2:-2], np.tile(np.interp(
      (np.arange(32) + 0.5) / 2 - 0.5, np.arange(16), ramp[0]), (32, 1))[:, 2:-2], atol=1e-5)
  assert len(np.unique(sal[0])) > 16                          # interpolated, not repeated
  np.testing.assert_allclose(out["background"][..., 1], sal, atol=1e-6)


def test_unknown_field_and_size_mismatch_are_errors():
  with pytest.raises(ValueError, match="RESAMPLE"):
    augment.resize({"image": tf.zeros([4, 4, 3]), "depth": tf.zeros([4, 4])}, 8)
  with pytest.raises(tf.errors.InvalidArgumentError, match="masks"):
    augment.flip({"image": tf.zeros([4, 4, 3]), "masks": tf.zeros([4, 5], tf.int32)}, True)


def test_photometric_ops_known_answers(run):
  x = tf.constant(np.random.default_rng(1).random((2, 32, 32, 3)), tf.float32)
  off = tf.constant([False, False])
  p = dict(gray=tf.constant([True, False]), blur=off, sigma=tf.ones([2]), solarize=off)
  out = run(lambda d: {"y": augment.photometric(d["x"], p, 32)}, {"x": x})["y"]
  assert np.ptp(out[0], axis=-1).max() < 1e-6 and np.array_equal(out[1], x[1].numpy())
  p = dict(p, gray=off, solarize=tf.constant([True, True]))
  out = run(lambda d: {"y": augment.photometric(d["x"], p, 32)}, {"x": x})["y"]
  np.testing.assert_allclose(out, np.where(x < 0.5, x, 1 - x))
  jit = dict(jitter=tf.constant(False), order=tf.range(4), brightness=0.0, contrast=1.0,
             saturation=1.0, hue=0.0)
  out = run(lambda d: {"y": augment.color_jitter(d["x"][0], jit)}, {"x": x})["y"]
  np.testing.assert_array_equal(out, x[0].numpy())             # p(jitter) missed: untouched
  out = run(lambda d: {"y": augment.color_jitter(d["x"][0], dict(jit, jitter=tf.constant(True)))},
            {"x": x})["y"]
  np.testing.assert_array_equal(out, np.zeros_like(out))       # brightness x 0 runs


@pytest.mark.parametrize("size", [64, 33])
def test_photometric_is_bit_for_bit_the_whole_batch_select(mode, size):
  """photometric runs each op only when some image takes it and writes only those images;
  the numbers are those of the plain form tf.where(flag, op(batch), batch), whatever the
  flags (none, some, all), with dark pixels where blur sums tiny values."""
  rng = np.random.default_rng(size)
  x = rng.random((6, size, size, 3)).astype(np.float32) ** 8
  x[:, : size // 3] = 0.0
  b = lambda v: tf.reshape(v, [-1, 1, 1, 1])

  def plain(x, p):
    x = tf.where(b(p["gray"]), tf.broadcast_to(tf.image.rgb_to_grayscale(x), tf.shape(x)), x)
    x = tf.where(b(p["blur"]), augment.blur(x, p["sigma"], size), x)
    x = tf.where(b(p["solarize"]), tf.where(x < 0.5, x, 1.0 - x), x)
    return tf.clip_by_value(x, 0.0, 1.0)

  for prob in (0.0, 0.3, 1.0):
    flags = {k: tf.constant(rng.random(6) < prob) for k in ("gray", "blur", "solarize")}
    p = dict(flags, sigma=tf.constant(rng.uniform(0.1, 2.0, 6), tf.float32))
    out = run_many(mode, lambda d: {"y": augment.photometric(d["x"], p, size)},
                   {"x": tf.constant(x)[None]})[0]["y"]
    assert out.tobytes() == plain(tf.constant(x), p).numpy().tobytes(), prob


@pytest.mark.parametrize("size, half_width", [(224, 11), (64, 3), (16, 1)])
def test_blur_kernel_scales_with_the_view_size(size, half_width):
  x = np.zeros((1, size, size, 3), np.float32)
  x[0, size // 2, size // 2] = 1.0
  y = augment.blur(tf.constant(x), tf.constant([100.0]), size).numpy()[0, size // 2, :, 0]
  support = np.nonzero(y > 1e-7)[0]
  assert support.min() == size // 2 - half_width and support.max() == size // 2 + half_width
  np.testing.assert_allclose(augment.blur(tf.ones([1, size, size, 3]), tf.constant([1.0]), size),
                             1.0, atol=1e-5)


def test_tables_named_by_augment_pairs_and_paper_values():
  named = {t for pair in V.AUGMENT_PAIRS.values() for t in pair}
  assert named == set(augment.TABLES)
  for t in augment.TABLES.values():
    assert "crop_area" not in t                 # the view spec holds the crop area
  moco, swav = augment.table("moco_v2"), augment.table("swav")
  assert [moco[k] for k in ("brightness", "contrast", "saturation", "hue")] == [.4, .4, .4, .1]
  assert [swav[k] for k in ("brightness", "contrast", "saturation", "hue")] == [.8, .8, .8, .2]
  for t in (moco, swav):
    assert (t["jitter"], t["gray"], t["blur"], t["blur_sigma"], t["flip"], t["solarize"]) == (
        0.8, 0.2, 0.5, (0.1, 2.0), 0.5, 0.0)
  assert (augment.table("byol2")["solarize"], augment.table("simclr1")["blur"]) == (0.2, 1.0)
  with pytest.raises(ValueError, match="Unknown augmentation table 'mocov2'.*moco_v2"):
    augment.table("mocov2")


@pytest.mark.parametrize("name", sorted(augment.TABLES))
def test_every_table_samples_in_range(name, mode):
  t = augment.table(name)
  spec = V.ViewSpec("v", 64, crop_area=(0.2, 0.5), augment=name)
  seeds = {"seed": tf.stack([tf.range(100), tf.fill([100], 9)], 1)}
  draws = run_many(mode, lambda x: augment.sample_view_params(x["seed"], 60, 80, spec), seeds)
  for k, lo, hi in (("brightness", 1 - t["brightness"], 1 + t["brightness"]),
                    ("contrast", 1 - t["contrast"], 1 + t["contrast"]),
                    ("saturation", 1 - t["saturation"], 1 + t["saturation"]),
                    ("hue", -t["hue"], t["hue"]),
                    ("sigma", t["blur_sigma"][0] * 64 / 224, t["blur_sigma"][1] * 64 / 224)):
    v = np.array([d[k] for d in draws])
    assert (v >= lo - 1e-6).all() and (v <= hi + 1e-6).all(), k
  area = np.array([d["box"][2] * d["box"][3] / (60 * 80) for d in draws])
  assert area.min() > 0.2 - 0.03 and area.max() < 0.5 + 0.03            # rounding to pixels
  for k in ("solarize", "blur", "gray", "flip"):
    frac = np.mean([d[k] for d in draws])
    assert (frac == 0) == (t[k] == 0) and (frac == 1) == (t[k] == 1), k
  assert all(sorted(d["order"]) == [0, 1, 2, 3] for d in draws)


def test_crop_box_fits_and_covers_area_range():
  boxes = np.stack([augment.crop_box(tf.constant([i, 7]), 60, 90).numpy() for i in range(200)])
  y, x, h, w = boxes.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= 60).all() and (x + w <= 90).all()
  frac = h * w / (60 * 90)
  assert frac.min() < 0.2 and frac.max() > 0.8
