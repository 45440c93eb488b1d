"""Mask sources and the lossless id codec, with known answers."""
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import demo, records
from data_pipelines import input as input_lib
from data_pipelines.masks import expand, fh, grid, gt, compute_all


def test_grid_known_answer():
  ids = grid.compute(np.zeros((4, 6, 3), np.uint8), n=2)
  np.testing.assert_array_equal(ids, [[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2)
  assert grid.compute(np.zeros((5, 5, 3), np.uint8), n=1).max() == 0   # SimCLR's global mask


def test_gt_is_the_instance_map_and_needs_one():
  inst = np.array([[0, 1], [2, 2]], np.uint16)
  np.testing.assert_array_equal(gt.compute(np.zeros((2, 2, 3), np.uint8), inst), inst)
  with pytest.raises(ValueError, match="--masks"):
    gt.compute(np.zeros((2, 2, 3), np.uint8))


def test_fh_two_colour_image_gives_exactly_its_regions():
  img = np.zeros((40, 40, 3), np.uint8)
  img[10:30, 5:25] = (255, 0, 0)
  ids = fh.compute(img, scale=100, min_size=20, sigma=0)   # sigma>0 blurs the edge into
  assert ids.max() == 1                                     # thin extra segments
  assert len(np.unique(ids[10:30, 5:25])) == 1 and ids[0, 0] != ids[15, 15]


def test_fh_demo_scales_restore_segment_counts():
  """Why the demo rescales FH: at 96 px the paper's scales give ~1-5 segments; the
  rescaled ones give about as many as the paper's scales on the same scenes at 224 px."""
  assert fh.scales_for(224) == fh.PAPER_SCALES

  def counts(size, scales):
    imgs = [demo.example("train", i, size=size)["image"] for i in range(4)]
    return np.array([np.mean([fh.compute(x, s).max() + 1 for x in imgs]) for s in scales])

  paper96, scaled96 = counts(96, fh.PAPER_SCALES), counts(96, fh.scales_for(96))
  paper224 = counts(224, fh.PAPER_SCALES)
  assert paper96[-1] < 3 and (paper96 < paper224 / 2).all()
  assert (abs(scaled96 / paper224 - 1) < 0.5).all(), (scaled96, paper224)


def test_expand_names_and_errors():
  specs = expand("fh,grid,gt", fh_scales=(90, 180), grid_sizes=(2, 4))
  assert list(specs) == ["fh_s90", "fh_s180", "grid_2", "grid_4", "gt"]
  assert specs["fh_s90"]["min_size"] == 90 and specs["fh_s90"]["sigma"] == 0.8
  with pytest.raises(ValueError, match="--masks"):
    expand("sam")
  maps = compute_all(np.zeros((8, 8, 3), np.uint8), expand("grid"))
  assert maps["grid_4"].max() == 15


def test_ids_above_255_survive_png_and_the_tf_reader():
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  ids = fh.compute(noise, scale=1, min_size=1)            # thousands of segments
  assert ids.max() > 255
  ids[0, 0] = 65535                                       # the top of the range too
  data = records.encode_ids(ids)
  np.testing.assert_array_equal(records.decode_ids(data), ids)
  np.testing.assert_array_equal(input_lib.decode_ids(tf.constant(data)).numpy(), ids)
  with pytest.raises(ValueError, match="65535"):
    records.encode_ids(np.array([[70000]]))


def test_opencv_backend_gives_a_valid_segmentation():
  img = demo.example("train", 1, size=96)["image"]
  ids = fh.compute(img, 180, backend="opencv")
  assert ids.shape == (96, 96) and ids.min() == 0
  np.testing.assert_array_equal(np.unique(ids), np.arange(ids.max() + 1))


def _fh_test_images():
  """Real photos, demo scenes, and flat/noisy synthetic images full of equal edge costs."""
  import skimage.data
  from data_pipelines import demo
  rng = np.random.default_rng(0)
  flat = np.zeros((64, 80, 3), np.uint8)
  flat[10:30, 10:40] = 200
  flat[40:60, 20:70] = (0, 100, 255)
  checker = (np.indices((48, 48)).sum(0) // 6 % 2 * 255).astype(np.uint8)
  return ([skimage.data.astronaut()[::2, ::2], skimage.data.coffee()[:224, :224]]
          + [demo.example("train", i, size=224)["image"] for i in range(6)]
          + [demo.example("test", i, size=96)["image"] for i in range(2)]
          + [flat, np.dstack([checker] * 3), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)])


def test_fh_kernel_maps_equal_scikit_image_exactly():
  """The compiled multi-scale kernel is scikit-image's felzenszwalb, map for map,
  through both of its edge orders (the radix order, and np.argsort's where the
  order of equal costs could matter)."""
  pytest.importorskip("numba")
  from skimage.segmentation import felzenszwalb
  from data_pipelines.masks import fh_kernel
  used_argsort = []
  for img in _fh_test_images():
    for scales in (fh.PAPER_SCALES, fh.scales_for(96), (3, 20)):
      graph = fh_kernel.EdgeGraph(img, fh.PAPER_SIGMA)
      for s in scales:
        ours = fh_kernel.segment(graph, s, s)
        np.testing.assert_array_equal(
            ours, felzenszwalb(img, scale=s, sigma=fh.PAPER_SIGMA, min_size=s),
            err_msg=f"image {img.shape}, scale {s}")
      used_argsort.append(graph._numpy is not None)
  assert any(used_argsort) and not all(used_argsort)      # both paths were exercised
  img = _fh_test_images()[2]                              # the public entry points agree
  maps = fh.compute_scales(img, fh.PAPER_SCALES)
  for s, m in zip(fh.PAPER_SCALES, maps):
    np.testing.assert_array_equal(m, fh.compute(img, s, _kernel_ok=False))
    assert m.dtype == np.int32
  specs = expand(["fh", "grid"], fh_scales=(150, 310))
  maps = compute_all(img, specs)
  assert list(maps) == ["fh_s150", "fh_s310", "grid_4"]
  np.testing.assert_array_equal(maps["fh_s310"], fh.compute(img, 310, _kernel_ok=False))
