"""Build: demo/folder/tfds sources, manifest, resumability, bad inputs, determinism."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import views
from data_pipelines import build, demo, records
from data_pipelines.masks import fh
from harness import TINY_DEMO

TINY = TINY_DEMO


@pytest.fixture
def tiny(tiny_demo):
  return tiny_demo


def _read(path):
  return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]


def test_demo_manifest_and_records_match_the_generator(tiny):
  out, m = tiny
  assert m["splits"]["train"]["count"] == 12 and m["splits"]["test"]["count"] == 4
  assert len(m["splits"]["train"]["shards"]) == 3
  assert m["num_classes"] == demo.NUM_CLASSES >= 10 and m["has_gt"]
  assert list(m["masks"]) == [f"fh_s{s}" for s in fh.scales_for(48)] + ["grid_4", "gt"]
  assert records.read_manifest(out) == m
  ex = _read(os.path.join(out, m["splits"]["test"]["shards"][0]["file"]))[1]
  f = ex.features.feature
  ref = demo.example("test", 1, size=48)
  img = tf.io.decode_png(f[records.IMAGE].bytes_list.value[0]).numpy()
  np.testing.assert_array_equal(img, ref["image"])                     # lossless PNG
  inst = records.decode_ids(f[records.GT_INSTANCES].bytes_list.value[0])
  np.testing.assert_array_equal(inst, ref["instances"])
  assert list(f[records.GT_CLASSES].int64_list.value) == list(ref["classes"])
  assert f[records.LABEL].int64_list.value[0] == ref["label"]
  gt_map = records.decode_ids(f[records.MASK_PREFIX + "gt"].bytes_list.value[0])
  np.testing.assert_array_equal(gt_map, ref["instances"])


def test_demo_label_is_class_of_largest_object():
  ex = demo.example("train", 5, size=64)
  areas = np.bincount(ex["instances"].ravel())[1:]
  assert ex["label"] == ex["classes"][np.argmax(areas)]
  assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8


def test_background_correlation_option():
  photos = [n for n, _ in demo.photos()]
  hits = [demo.example("train", i, size=32, bg_correlation=1.0) for i in range(20)]
  assert all(h["background"] == photos[h["label"] % len(photos)] for h in hits)
  test = [demo.example("test", i, size=32, bg_correlation=1.0) for i in range(20)]
  assert any(h["background"] != photos[h["label"] % len(photos)] for h in test)


def test_rerun_skips_complete_shards_and_redoes_missing(tiny):
  out, m = tiny
  files = [os.path.join(out, s["file"]) for s in m["splits"]["train"]["shards"]]
  mtimes = [os.path.getmtime(f) for f in files]
  os.remove(files[1] + ".json")                 # as if interrupted while writing shard 1
  m2 = build.build("demo", out, masks="fh,grid,gt", workers=1, **TINY)
  new = [os.path.getmtime(f) for f in files]
  assert new[0] == mtimes[0] and new[2] == mtimes[2] and new[1] != mtimes[1]
  assert m2["splits"] == m["splits"]


def test_parallel_build_equals_serial(tmp_path):
  opts = dict(TINY, num_train=8, num_test=0)
  a = build.build("demo", str(tmp_path / "a"), masks="fh,grid", workers=1, **opts)
  b = build.build("demo", str(tmp_path / "b"), masks="fh,grid", workers=2, **opts)
  for s in a["splits"]["train"]["shards"]:
    assert (open(tmp_path / "a" / s["file"], "rb").read()
            == open(tmp_path / "b" / s["file"], "rb").read())
  assert b["splits"]["train"]["count"] == 8


def _photo_folder(root):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  os.makedirs(root / "cats"), os.makedirs(root / "dogs")
  Image.fromarray(rgb).save(root / "cats" / "rgb.jpg")
  Image.fromarray(rgb[..., 0]).save(root / "cats" / "gray.png")
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "cats" / "rgba.png")
  Image.fromarray(rgb).convert("P").save(root / "dogs" / "palette.png")
  Image.fromarray(rgb).convert("CMYK").save(root / "dogs" / "cmyk.jpg")
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "dogs" / "deep16.png")
  Image.fromarray(rgb[:8, :8]).save(root / "dogs" / "tiny.png")
  data = open(root / "cats" / "rgb.jpg", "rb").read()
  open(root / "dogs" / "truncated.jpg", "wb").write(data[:len(data) // 2])
  open(root / "dogs" / "notanimage.jpg", "wb").write(b"this is not a jpeg")


def test_folder_converts_modes_and_skips_bad_inputs(tmp_path):
  _photo_folder(tmp_path / "photos")
  m = build.build(f"folder:{tmp_path / 'photos'}", str(tmp_path / "rec"), masks="fh,grid",
                  workers=1, image_size=48, progress=False)
  assert m["splits"]["train"]["count"] == 6 and m["num_skipped"] == 3
  assert m["class_names"] == ["cats", "dogs"] and not m["has_gt"]
  reasons = {os.path.basename(s["input"]): s["reason"] for s in m["skipped"]}
  assert set(reasons) == {"tiny.png", "truncated.jpg", "notanimage.jpg"}
  assert "too small" in reasons["tiny.png"]
  exs = _read(str(tmp_path / "rec" / m["splits"]["train"]["shards"][0]["file"]))
  labels = {ex.features.feature[records.ID].bytes_list.value[0].decode().split("/")[-1]:
            ex.features.feature[records.LABEL].int64_list.value[0] for ex in exs}
  assert labels["rgb.jpg"] == 0 and labels["cmyk.jpg"] == 1
  for ex in exs:
    img = tf.io.decode_image(ex.features.feature[records.IMAGE].bytes_list.value[0]).numpy()
    assert img.shape == (48, 64, 3)                  # shorter side 48, aspect kept
  Image.fromarray(img).save(tmp_path / "photos" / "cats" / "new.png")   # inputs changed:
  m2 = build.build(f"folder:{tmp_path / 'photos'}", str(tmp_path / "rec"), masks="fh,grid",
                   workers=1, image_size=48, progress=False)           # shard is rebuilt
  assert m2["splits"]["train"]["count"] == 7
  with pytest.raises(ValueError, match="gt"):
    build.build(f"folder:{tmp_path / 'photos'}", str(tmp_path / "rec2"), masks="fh,gt")


def test_16bit_and_rgba_conversion():
  deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  assert build.to_rgb_uint8(deep).max() == 255
  clear = Image.fromarray(np.zeros((2, 2, 4), np.uint8))     # fully transparent -> white
  assert (build.to_rgb_uint8(clear) == 255).all()


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    m = build.build("tfds:mnist", str(tmp_path), masks="grid", workers=1, min_side=16,
                    image_size=32, shard_size=100, progress=False)
  assert m["splits"]["train"]["count"] == 6 and m["num_classes"] == 10


def test_cli_runs_the_build(tmp_path, capsys):
  build.main(["--source=demo", f"--out={tmp_path}", "--masks=grid", "--workers=1",
              "--num_train=4", "--num_test=2", "--image_size=32"])
  assert "train: 4, test: 2" in capsys.readouterr().out
  assert json.load(open(tmp_path / "manifest.json"))["masks"] == {"grid_4": {"kind": "grid", "n": 4}}
  assert build.ensure_demo_records(str(tmp_path))["splits"]["train"]["count"] == 4


def test_manifest_records_size_and_sha256_of_every_shard(tiny):
  out, m = tiny
  for split in ("train", "test"):
    for s in m["splits"][split]["shards"]:
      assert s["bytes"] == os.path.getsize(os.path.join(out, s["file"]))
      assert s["sha256"] == records.file_digest(os.path.join(out, s["file"]))["sha256"]
  assert records.verify(out) == []


def test_verify_names_a_changed_shard_and_reads_old_manifests(tmp_path):
  m = build.build("demo", str(tmp_path), masks="grid", workers=1, **dict(TINY, num_test=0))
  first = m["splits"]["train"]["shards"][0]["file"]
  intact = (tmp_path / first).read_bytes()
  with open(tmp_path / first, "ab") as f:
    f.write(b"x")
  assert [b.split(":")[0] for b in records.verify(str(tmp_path))] == [first]
  for s in m["splits"]["train"]["shards"]:      # a manifest from before the checksums:
    del s["bytes"], s["sha256"]                 # the record framing is what is checked
  records.write_manifest(str(tmp_path), m)
  assert records.verify(str(tmp_path)) == [f"{first}: ends inside a record (truncated or corrupt)"]
  (tmp_path / first).write_bytes(intact)
  assert records.verify(str(tmp_path)) == []
  assert records.read_manifest(str(tmp_path))["splits"]["train"]["count"] == 12


def test_two_clean_builds_write_identical_bytes(tmp_path):
  """Deterministic serialization: same inputs, same shard bytes and checksums."""
  opts = dict(TINY, num_train=4, num_test=0)
  a = build.build("demo", str(tmp_path / "a"), masks="fh,gt", workers=1, **opts)
  b = build.build("demo", str(tmp_path / "b"), masks="fh,gt", workers=1, **opts)
  assert a["splits"] == b["splits"]


def test_build_and_read_through_a_filesystem_url():
  """gs:// paths go through tf.io.gfile; TensorFlow's in-memory ram:// exercises that code."""
  from data_pipelines import input as data_input
  out = "ram://detcon_build_test/records"
  m = build.build("demo", out, masks="grid,gt", workers=1,
                  **dict(TINY, num_train=6, num_test=0, shard_size=3))
  assert records.read_manifest(out) == m and records.verify(out) == []
  paths = records.shard_paths(out, m, "train")
  assert paths[0] == out + "/train-00000-of-00002.tfrecord"
  assert sum(1 for _ in tf.data.TFRecordDataset(paths)) == 6
  again = build.build("demo", out, masks="grid,gt", workers=1,     # resumes: nothing to redo
                      **dict(TINY, num_train=6, num_test=0, shard_size=3))
  assert again["splits"] == m["splits"]
  it = data_input.train_iterator(out, batch_size=2, views=views.two_views(32),
                                 mask_source="grid", host_index=1, host_count=2)
  assert all(v.shape[0] == 2 for v in next(it).values())
