"""The saliency record field: round trip, following crops/flips in tf.data, old records, rebuild."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import batch, build, records
from data_pipelines import input as input_lib
from data_pipelines import views as V
from data_pipelines.masks import mcg

S = 48
SAL_VIEWS = (V.ViewSpec("view1", 32, augment="simclr1", fields=(V.MASKS, V.SALIENCY)),
             V.ViewSpec("view2", 32, augment="simclr2", fields=(V.MASKS, V.FOREGROUND)))


def _box_examples(n=8, seed=0):
  """White box on black; mask id 1 and saliency 1 on the box (saliency 0.2 elsewhere)."""
  rng = np.random.default_rng(seed)
  exs = []
  for _ in range(n):
    img, m = np.zeros((S, 64, 3), np.uint8), np.zeros((S, 64), np.int32)
    y, x = rng.integers(0, 20), rng.integers(0, 30)
    img[y:y + 24, x:x + 20], m[y:y + 24, x:x + 20] = 255, 1
    exs.append(dict(image=img, masks={"box": m}, saliency=np.where(m == 1, 1.0, 0.2)))
  return exs


def test_encode_decode_round_trip():
  sal = np.random.default_rng(0).random((7, 9)).astype(np.float32)
  back = records.decode_saliency(records.encode_saliency(sal))
  np.testing.assert_array_equal(back, np.round(sal * 255) / np.float32(255))
  u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
  np.testing.assert_array_equal(records.decode_saliency(records.encode_saliency(u8)) * 255, u8)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    records.encode_saliency(np.full((2, 2), 1.5))


def test_saliency_follows_crops_and_flips_in_tf_data(tmp_path):
  """The view's saliency is the stored map moved with the image: above 0.6 exactly where
  the view's mask id is 1 (nearest-neighbour) and where the pixels are bright, away from
  the box edge; foreground is it thresholded. Over several batches some views flip."""
  build.write_records(str(tmp_path), {"train": _box_examples()})
  it = input_lib.train_iterator(str(tmp_path), batch_size=8, views=SAL_VIEWS, mask_source="box",
                                host_index=0, host_count=1, foreground_threshold=0.6)
  checked = 0
  for _ in range(3):
    b = next(it)
    shapes = batch.train_batch_shapes(8, specs=SAL_VIEWS)
    assert set(b) == set(shapes)
    for k, (shape, dtype) in shapes.items():
      assert b[k].shape == shape and b[k].dtype == dtype, k
    sal1 = b[batch.key("view1", V.SALIENCY)]
    assert sal1.min() >= 0.2 - 1e-3 and sal1.max() <= 1.0
    assert len(np.unique(sal1)) > 2                          # bilinear: values in between
    fg2 = b[batch.key("view2", V.FOREGROUND)]
    assert set(np.unique(fg2)) <= {0.0, 1.0}
    for view, fg in (("view1", sal1 > 0.6), ("view2", fg2 == 1)):
      for img, m, f in zip(b[view].mean(-1), b[batch.key(view, V.MASKS)], fg):
        if m.min() == m.max():
          continue
        interior = ndimage.minimum_filter(m, 5) == ndimage.maximum_filter(m, 5)
        np.testing.assert_array_equal(f[interior], (m == 1)[interior])
        bright = img > (img[m == 1].mean() + img[m == 0].mean()) / 2
        assert (bright == f)[interior].mean() > 0.95
        checked += 1
  assert checked >= 20


def test_views_without_saliency_are_unchanged_and_old_records_still_read(tmp_path):
  exs = _box_examples(4)
  with_sal, without = str(tmp_path / "with"), str(tmp_path / "without")
  build.write_records(with_sal, {"train": exs})
  build.write_records(without, {"train": [dict(e, saliency=None) for e in exs]})
  # An old (version-1) manifest without the saliency entry still reads.
  path = os.path.join(without, records.MANIFEST)
  m = json.load(open(path))
  m["schema_version"] = 1
  m.pop("saliency")
  json.dump(m, open(path, "w"))
  plain = V.two_views(32, augment="simclr")
  kw = dict(batch_size=4, mask_source="box", host_index=0, host_count=1)
  a = next(input_lib.train_iterator(without, views=plain, **kw))
  # The same pixels and masks whether or not the records or the views carry saliency.
  c = next(input_lib.train_iterator(with_sal, views=SAL_VIEWS, **kw))
  for k in ("view1", "view2", batch.MASKS1, batch.MASKS2, batch.MASK_IDS1):
    np.testing.assert_array_equal(a[k], c[k])
  with pytest.raises(records.MissingFieldError,
                     match=rf"python -m data_pipelines.build --source=arrays --out={without} "
                           r"--masks=box --saliency=mbd"):
    input_lib.train_iterator(without, views=SAL_VIEWS, **kw)
  with pytest.raises(records.MissingFieldError, match="saliency"):
    records.require_field(without, "saliency")
  assert records.require_field(with_sal, "saliency")["saliency"]["detector"] == "given"


def test_eval_iterator_reads_saliency(tmp_path):
  exs = [dict(e, saliency=np.full((S, 64), 0.4)) for e in _box_examples(3)]
  build.write_records(str(tmp_path), {"test": exs})
  b = next(input_lib.eval_iterator(str(tmp_path), "test", batch_size=3, image_size=32,
                                   saliency=True))
  assert b[batch.SALIENCY].shape == (3, 32, 32) and b[batch.SALIENCY].dtype == np.float32
  np.testing.assert_allclose(b[batch.SALIENCY], round(0.4 * 255) / 255, atol=1e-6)


def test_bad_threshold_and_mixed_examples_are_errors(tmp_path):
  exs = _box_examples(2)
  with pytest.raises(ValueError, match="every example or on none"):
    build.write_records(str(tmp_path / "a"), {"train": [exs[0], dict(exs[1], saliency=None)]})
  build.write_records(str(tmp_path / "b"), {"train": exs})
  with pytest.raises(ValueError, match="foreground_threshold"):
    input_lib.train_iterator(str(tmp_path / "b"), batch_size=2, views=SAL_VIEWS,
                             mask_source="box", host_index=0, host_count=1,
                             foreground_threshold=1.5)


def test_demo_records_gain_saliency_when_a_run_needs_it(tmp_path):
  opts = dict(num_train=4, num_test=2, image_size=S, shard_size=4, workers=1, progress=False)
  out = str(tmp_path)
  m = build.build("demo", out, masks="fh,grid,gt", **opts)
  assert not records.has_field(m, "saliency")
  assert build.ensure_demo_records(out, **opts) == m            # not needed: kept as is
  m2 = build.ensure_demo_records(out, saliency=True, **opts)
  assert m2["saliency"]["detector"] == "mbd" and set(m2["masks"]) == set(m["masks"])
  assert build.ensure_demo_records(out, masks=("fh", "grid"), saliency=True, **opts) == m2
  # A mask kind a run asks for is added; one stored with other settings is rebuilt.
  m3 = build.ensure_demo_records(out, masks=("mcg",), **opts)
  assert set(m3["masks"]) == set(m["masks"]) | {"mcg_16", "mcg_8", "mcg_4"}
  m3["masks"]["mcg_8"]["superpixels"] = 37
  records.write_manifest(out, m3)
  assert build.ensure_demo_records(out, masks=("mcg",), **opts)["masks"]["mcg_8"][
      "superpixels"] == mcg.SUPERPIXELS
  b = next(input_lib.eval_iterator(out, "train", batch_size=4, image_size=S, saliency=True))
  fg = b[batch.INSTANCES] > 0
  sal = b[batch.SALIENCY]
  assert all(s[f].mean() > s[~f].mean() for s, f in zip(sal, fg))   # objects are salient
