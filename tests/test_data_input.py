"""Input pipeline: N views, masks follow crops/flips, id sampling, determinism, hosts, corrupt records."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from data_pipelines import batch, build, demo, records
from data_pipelines import views as V
from data_pipelines import input as input_lib

S = 48


@pytest.fixture
def tiny(tiny_demo):
  return tiny_demo[0]


# Multi-crop: two global views at 32 px and four small crops at 16 px, all with masks.
MULTI = V.two_views(32) + tuple(
    V.ViewSpec(f"small{i}", 16, (0.05, 0.3), "byol1", (V.MASKS,), small=True)
    for i in range(1, 5))


def _train(path, **kw):
  kw = dict(dict(batch_size=4, views=V.two_views(32), host_index=0, host_count=1), **kw)
  return input_lib.train_iterator(path, **kw)


def test_mask_follows_coloured_region_through_augmentation(tmp_path):
  """A white box on black with mask 1 on the box: after crops, flips and colour ops the
  mask still marks exactly the brighter pixels, in the global views and in the small
  crops (SimCLR tables: no solarize)."""
  rng = np.random.default_rng(0)
  exs = []
  for _ in range(8):
    img, m = np.zeros((S, 64, 3), np.uint8), np.zeros((S, 64), np.int32)
    y, x = rng.integers(0, 20), rng.integers(0, 30)
    img[y:y + 24, x:x + 20], m[y:y + 24, x:x + 20] = 255, 1
    exs.append(dict(image=img, masks={"box": m}))
  build.write_records(str(tmp_path), {"train": exs})
  small = tuple(V.ViewSpec(f"small{i}", 16, (0.05, 0.3), "simclr1", (V.MASKS,), small=True)
                for i in (1, 2))
  specs = V.two_views(32, augment="simclr") + small
  it = _train(str(tmp_path), batch_size=8, views=specs, mask_source="box")
  checked = {s.name: 0 for s in specs}
  for _ in range(3):
    b = next(it)
    for s in specs:
      for img, m in zip(b[s.name].mean(-1), b[batch.key(s.name, V.MASKS)]):
        if m.min() == m.max():
          continue
        inside, outside = img[m == 1].mean(), img[m == 0].mean()
        assert inside > outside
        agree = (img > (inside + outside) / 2) == (m == 1)
        # Away from the box edge (resampling and blur soften it) every pixel agrees.
        r = 7 if s.size == 32 else 5
        interior = ndimage.minimum_filter(m, r) == ndimage.maximum_filter(m, r)
        assert agree[interior].all() and agree.mean() > 0.9, s.name
        checked[s.name] += 1
  assert min(checked.values()) >= 5, checked


def test_batch_contract_and_sampled_ids(tiny):
  b = next(_train(tiny, mask_source="fh"))
  shapes = batch.train_batch_shapes(4, 32)
  assert set(b) == set(shapes)
  for k, (shape, dtype) in shapes.items():
    assert b[k].shape == shape and b[k].dtype == dtype, k
  for i in range(4):
    u1, u2 = set(np.unique(b[batch.MASKS1][i])), set(np.unique(b[batch.MASKS2][i]))
    assert set(b[batch.MASK_IDS1][i]) <= u1 and set(b[batch.MASK_IDS2][i]) <= u2
    if u1 & u2:      # positives exist: one draw among shared ids, used by both views
      np.testing.assert_array_equal(b[batch.MASK_IDS1][i], b[batch.MASK_IDS2][i])
      assert set(b[batch.MASK_IDS1][i]) <= u1 & u2


def test_multi_crop_keys_shapes_and_ids(tiny):
  b = next(_train(tiny, views=MULTI, mask_source="fh"))
  shapes = batch.train_batch_shapes(4, num_masks=16, specs=MULTI)
  assert list(b) == list(shapes)                 # view order, then label and index
  for k, (shape, dtype) in shapes.items():
    assert b[k].shape == shape and b[k].dtype == dtype, k
  assert b["small3"].shape == (4, 16, 16, 3) and b["small3/masks"].shape == (4, 16, 16)
  for s in MULTI[2:]:                            # small crops reuse view1's draw
    np.testing.assert_array_equal(b[batch.key(s.name, "mask_ids")], b[batch.MASK_IDS1])
  # The global pair is built exactly as without small crops (own per-view keys).
  pair = next(_train(tiny, mask_source="fh"))
  for k in pair:
    np.testing.assert_array_equal(b[k], pair[k], err_msg=k)


def test_one_masked_view_draws_its_own_ids(tiny):
  specs = (V.ViewSpec("view1", 32, augment="byol1", fields=(V.MASKS,)),
           V.ViewSpec("view2", 32, augment="byol2"))
  b = next(_train(tiny, views=specs, mask_source="grid"))
  assert set(b) == {"view1", "view1/masks", "view1/mask_ids", "view2", "label", "index"}
  for m, ids in zip(b[batch.MASKS1], b[batch.MASK_IDS1]):
    assert set(ids) <= set(np.unique(m))


@pytest.mark.parametrize("specs", [V.two_views(32), MULTI], ids=["pair", "multi_crop"])
def test_deterministic_and_resumes_exactly(tiny, specs):
  it = _train(tiny, seed=3, views=specs)
  run = [next(it) for _ in range(6)]          # 3 steps per epoch: crosses two epochs
  resumed = _train(tiny, seed=3, views=specs, start_step=4)       # epoch 1, one step in
  for s in (4, 5):
    got = next(resumed)
    assert list(got) == list(run[s])
    for k in run[s]:
      np.testing.assert_array_equal(got[k], run[s][k], err_msg=f"step {s} {k}")
  epoch0 = np.concatenate([r["index"] for r in run[:3]])
  epoch1 = np.concatenate([r["index"] for r in run[3:]])
  assert sorted(epoch0) == sorted(epoch1) == list(range(12))
  other = next(_train(tiny, seed=4, views=specs))
  for s in specs:
    assert not np.array_equal(other[s.name], run[0][s.name])
  for a, b in zip(specs, specs[1:]):          # every view has its own draws
    assert a.size != b.size or not np.array_equal(run[0][a.name], run[0][b.name])


def test_bad_view_lists_are_errors(tiny):
  with pytest.raises(ValueError, match="Unknown augmentation table 'nope'"):
    _train(tiny, views=(V.ViewSpec("view1", 32, augment="nope"),))
  for bad in ((), V.two_views(32)[:1] * 2, (V.ViewSpec("label", 32),),
              (V.ViewSpec("a/b", 32),)):
    with pytest.raises(ValueError, match="unique names"):
      _train(tiny, views=bad)


def test_host_shards_disjoint_and_covering(tiny):
  seen = [next(_train(tiny, host_index=h, host_count=3))["index"] for h in range(3)]
  flat = np.concatenate(seen)
  assert sorted(flat) == list(range(12)) and len(set(flat)) == 12
  with pytest.raises(ValueError, match="shard_size"):
    _train(tiny, host_index=0, host_count=4)


def test_missing_mask_source_names_what_exists(tiny):
  with pytest.raises(ValueError, match=r"config\.data\.mask_source.*") as e:
    _train(tiny, mask_source="mcg")
  assert "fh_s60" in str(e.value) and "grid_4" in str(e.value)
  assert input_lib.resolve_mask_names(records.read_manifest(tiny), "fh_s120") == ["fh_s120"]
  assert input_lib.resolve_mask_names(records.read_manifest(tiny), "fh") == [
      "fh_s120", "fh_s170", "fh_s60"]


def test_eval_iterator_known_answer(tiny):
  it = input_lib.eval_iterator(tiny, "test", batch_size=3, image_size=S, mask_sources=("grid",))
  bs = list(it)
  assert [len(b["label"]) for b in bs] == [3, 1] and it.stats["corrupt_skipped"] == 0
  b = bs[0]
  assert set(b) == {"image", "label", "index", "semantic", "instances", "mask/grid_4"}
  for i, idx in enumerate(b["index"]):
    ref = demo.example("test", int(idx), size=S)
    np.testing.assert_array_equal(b["instances"][i], ref["instances"])
    np.testing.assert_array_equal(b["semantic"][i],
                                  np.concatenate([[0], ref["classes"] + 1])[ref["instances"]])
    np.testing.assert_allclose(b["image"][i], ref["image"] / 255.0, atol=2e-3)
    assert b["label"][i] == ref["label"]


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(1)
  exs = [dict(image=rng.integers(0, 256, (S, S, 3), dtype=np.uint8),
              masks={"grid_2": np.zeros((S, S), np.int32)}, label=i) for i in range(6)]
  m = build.write_records(str(tmp_path), {"train": exs}, shard_size=3)
  good = records.example_bytes(image=b"not a png", fmt="png", height=S, width=S, index=6,
                               example_id="bad", masks={"grid_2": b"nor this"})
  with tf.io.TFRecordWriter(str(tmp_path / "train-extra.tfrecord")) as w:
    w.write(good)                       # parses, fails to decode
    w.write(b"\x00garbage that is not a tf.train.Example")
  m["splits"]["train"]["shards"].append(dict(file="train-extra.tfrecord", count=2))
  m["splits"]["train"]["count"] += 2
  records.write_manifest(str(tmp_path), m)
  ev = input_lib.eval_iterator(str(tmp_path), "train", batch_size=4, image_size=32)
  assert sum(len(b["label"]) for b in ev) == 6 and ev.stats["corrupt_skipped"] == 2
  it = _train(str(tmp_path), batch_size=3, mask_source="grid")
  idx = np.concatenate([next(it)["index"] for _ in range(3)])
  assert set(idx[:6]) == set(range(6)) and it.stats["corrupt_skipped"] >= 2


def test_without_masks_gives_the_same_views(tiny):
  a = next(_train(tiny, seed=1, views=MULTI))
  plain = tuple(V.ViewSpec(s.name, s.size, s.crop_area, s.augment, small=s.small) for s in MULTI)
  b = next(_train(tiny, seed=1, views=plain, mask_source="no such source: never read"))
  assert set(b) == set(V.names(MULTI)) | {"label", "index"}
  for k in b:
    np.testing.assert_array_equal(a[k], b[k])


# make_views' inputs covered: masks + a constrained small crop; MaskCo's box pair.
EAGER_VIEWS = {
    "masks_constrained": V.two_views(32) + (V.ViewSpec(
        "small1", 16, (0.05, 0.14), "byol1", (V.MASKS,), small=True,
        constraint=V.Constraint("view2", min_overlap=0.5, tries=2)),),
    "boxes": (V.ViewSpec("query", 32, boxes=V.BoxSpec("query")),
              V.ViewSpec("key", 32, boxes=V.BoxSpec("key"))),
}


@pytest.mark.parametrize("name", sorted(EAGER_VIEWS))
def test_make_views_eagerly_equals_the_pipeline(tiny, name):
  """input.make_views run eagerly (no tf.data) on each record of the first batch, then
  colour_batch on those examples stacked (the batched ops see the same batch), gives
  exactly the tf.data batch; the examples' fallback flags add up to the host counter."""
  views = EAGER_VIEWS[name]
  it = _train(tiny, views=views, seed=5)
  b = next(it)
  manifest = records.read_manifest(tiny)
  recipe = input_lib.train_recipe(tiny, manifest, views=views, seed=5)
  by_index = {}
  for r in tf.data.TFRecordDataset(records.shard_paths(tiny, manifest, "train")):
    by_index[int(tf.io.parse_single_example(r, recipe.feature_spec)[records.INDEX])] = r
  examples = [input_lib.make_views(by_index[int(i)], tf.constant(0, tf.int64), recipe)
              for i in b[batch.INDEX]]
  fallbacks = sum(int(ex.pop(input_lib._FALLBACKS, 0)) for ex in examples)
  eager = input_lib.colour_batch({k: tf.stack([ex[k] for ex in examples])
                                  for k in examples[0]}, recipe)
  assert list(eager) == list(b)
  for k in b:
    np.testing.assert_array_equal(eager[k], b[k], err_msg=k)
  assert it.stats.get("crop_fallbacks", 0) == fallbacks
  assert fallbacks > 0 or name == "boxes"     # seed 5: one small crop falls back (2 tries)
  assert it.stats.get("constrained_crops", 0) == 4 * sum(s.constrained_crop for s in views)


def test_constrained_a_plus_views_in_the_pipeline(tiny):
  """Constrained small crops are counted with their fallbacks on the host (Batches.stats,
  no batch array), A+ views come out in [0, 1], and an anchor after its small crop is
  refused."""
  anchor = V.ViewSpec("view2", 32, (0.2, 1.0), "moco_v2")
  small = V.ViewSpec("small1", 16, (0.05, 0.14), "moco_v2_aplus", small=True,
                     constraint=V.Constraint("view2", tries=1))
  views = (V.ViewSpec("view1", 32, (0.2, 1.0), "moco_v2_aplus"), anchor, small)
  it = _train(tiny, views=views)
  b = next(it)
  assert list(b) == list(batch.train_batch_shapes(4, specs=views))
  assert not any("fallback" in k for k in b)
  assert it.stats["constrained_crops"] == 4 and 0 <= it.stats["crop_fallbacks"] <= 4
  assert all(0 <= b[v].min() and b[v].max() <= 1 for v in ("view1", "view2", "small1"))
  with pytest.raises(ValueError, match="must come before"):
    _train(tiny, views=(views[0], small, anchor))
