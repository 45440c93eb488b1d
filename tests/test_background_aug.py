"""Background augmentations: tiled backgrounds, the field in tf.data, BG RM / Random / Swaps."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from configs import moco_v2 as moco_config
from configs.common import ConfigError
from data_pipelines import background_augment as bg
from data_pipelines import batch as B
from data_pipelines import build
from data_pipelines import input as input_lib
from data_pipelines import views as V
from data_pipelines.masks import tiled_background as tiles
from detcon_jax.core import validation
from detcon_jax.objectives import registry
from harness import box_examples

S = 48
VIEWS = (V.ViewSpec("view1", 32, augment="simclr1", fields=(V.MASKS,)),
         V.ViewSpec("view2", 32, augment="simclr2", fields=(V.MASKS,)))



def test_tiled_background_fills_the_hole_from_the_background():
  """A flat background with a box on it: the fill is the flat colour everywhere (within
  4/255: Telea's per-pixel weighted averages round to uint8 as the front advances)."""
  img = np.full((40, 40, 3), (30, 120, 200), np.uint8)
  sal = np.zeros((40, 40), np.float32)
  img[10:25, 12:30], sal[10:25, 12:30] = 250, 1.0
  out = tiles.tiled(img, sal)
  assert np.abs(out.astype(int) - (30, 120, 200)).max() <= 4
  np.testing.assert_array_equal(tiles.tiled(img, np.zeros_like(sal)), img)  # no foreground
  np.testing.assert_array_equal(tiles.tiled(img, np.ones_like(sal)),         # no background
                                np.broadcast_to(img.reshape(-1, 3).mean(0).round(), img.shape))


def test_background_follows_crops_and_flips(tmp_path):
  """Masks, saliency, foreground and the tiled background stay aligned in every view:
  away from edges, mask id 1 <=> foreground, and the background's white/black split
  sits where the box's centre column went (flips mirror it with the rest)."""
  build.write_records(str(tmp_path), {"train": box_examples()})
  fields = (V.MASKS, V.SALIENCY, V.FOREGROUND, V.BACKGROUND)
  views = tuple(V.ViewSpec(n, 32, augment="simclr1", fields=fields) for n in ("view1", "view2"))
  b = next(input_lib.train_iterator(str(tmp_path), batch_size=8, views=views, mask_source="box",
                                    host_index=0, host_count=1))
  assert b[B.key("view1", V.BACKGROUND)].shape == (8, 32, 32, 3)
  checked = flipped = 0
  for v in ("view1", "view2"):
    for m, fg, back in zip(b[B.key(v, V.MASKS)], b[B.key(v, V.FOREGROUND)],
                           b[B.key(v, V.BACKGROUND)].mean(-1)):
      interior = ndimage.minimum_filter(m, 5) == ndimage.maximum_filter(m, 5)
      np.testing.assert_array_equal(fg[interior], (m == 1)[interior])
      cols = np.flatnonzero((m == 1).any(0))
      if len(cols) < 6 or cols[0] == 0 or cols[-1] == 31:
        continue
      white = (back > 0.5)[:, cols[0]:cols[-1] + 1].mean(0) > 0.5   # per column of the box
      assert np.all(np.diff(white.astype(int)) <= 0) or np.all(np.diff(white.astype(int)) >= 0)
      assert abs(white.mean() - 0.5) < 0.15      # the split at the box's centre column
      flipped += white[-1]
      checked += 1
  assert checked >= 4 and 0 < flipped < checked


def _tf_batch(n=4, size=8, seed=0):
  rng = np.random.default_rng(seed)
  fg = np.zeros((n, size, size), np.float32)
  fg[:, 2:6, 2:6] = 1.0
  out = {}
  for v in ("view1", "view2"):
    out[v] = rng.random((n, size, size, 3), dtype=np.float32)
    out[B.key(v, V.FOREGROUND)] = fg
    out[B.key(v, V.BACKGROUND)] = np.broadcast_to(
        (np.arange(n, dtype=np.float32) / 10)[:, None, None, None], (n, size, size, 3)).copy()
  return out


def _apply(mode, p_pos, p_neg=0.0, u=None, seed=0):
  batch = _tf_batch(seed=seed)
  u = np.random.default_rng(1).random((4, 2 * bg.DRAWS + 2)).astype(np.float32) if u is None else u
  s = bg.Settings(mode, p_pos, p_neg, negative=mode == "swaps")
  out = bg.apply({k: tf.constant(x) for k, x in batch.items()}, ["view1", "view2"],
                 tf.constant(u), s)
  return batch, {k: np.asarray(x) for k, x in out.items()}, u


def test_bg_rm_background_is_constant_and_foreground_untouched():
  before, after, u = _apply("rm", 1.0)
  for j, v in enumerate(("view1", "view2")):
    fg = before[B.key(v, V.FOREGROUND)] == 1
    np.testing.assert_array_equal(after[v][fg], before[v][fg])
    for i in range(4):
      np.testing.assert_array_equal(after[v][i][~fg[i]], u[i, bg.DRAWS * j + 1])


def test_bg_random_and_swaps_take_other_images_backgrounds():
  for mode in ("random", "swaps"):
    before, after, _ = _apply(mode, 1.0)
    sources = []
    for v in ("view1", "view2"):
      fg = before[B.key(v, V.FOREGROUND)] == 1
      np.testing.assert_array_equal(after[v][fg], before[v][fg])
      src = np.array([np.unique(a[~f]) for a, f in zip(after[v], fg)])[:, 0] * 10
      src = np.round(src).astype(int)
      assert np.all(src != np.arange(4))          # another image's background
      sources.append(src)
    if mode == "swaps":                           # query and positive: distinct backgrounds
      assert np.all(sources[0] != sources[1])


def test_swaps_negative_has_query_background_and_another_images_foreground():
  before, after, u = _apply("swaps", 1.0, p_neg=1.0)
  fg = before[B.key("view1", V.FOREGROUND)] == 1
  neg, q, keys = after[bg.NEGATIVE], after["view1"], before["view2"]
  assert neg.shape == q.shape
  for i in range(4):
    np.testing.assert_array_equal(neg[i][~fg[i]], q[i][~fg[i]])      # the query's background
    hits = [j for j in range(4) if j != i and np.array_equal(neg[i][fg[i]], keys[j][fg[i]])]
    assert len(hits) == 1                                            # another image's pixels
  _, off, _ = _apply("swaps", 1.0, p_neg=0.0)                        # else a random image
  assert all(any(np.array_equal(off[bg.NEGATIVE][i], off["view2"][j]) for j in range(4) if j != i)
             for i in range(4))


def test_p_zero_is_the_plain_batch(tmp_path):
  """p_pos = 0: the views are the plain pipeline's bit for bit, and the batch has exactly
  the plain keys (BG RM and BG Random); so the loss of any method is the plain one."""
  build.write_records(str(tmp_path), {"train": box_examples()})
  kw = dict(batch_size=8, views=VIEWS, mask_source="box", host_index=0, host_count=1)
  plain = next(input_lib.train_iterator(str(tmp_path), **kw))
  for mode in ("rm", "random"):
    got = next(input_lib.train_iterator(str(tmp_path), background=bg.Settings(mode, 0.0), **kw))
    assert set(got) == set(plain)
    for k in plain:
      np.testing.assert_array_equal(got[k], plain[k], err_msg=f"{mode} {k}")
  swaps = next(input_lib.train_iterator(str(tmp_path), background=bg.Settings(
      "swaps", 0.0, 0.0, negative=True), **kw))       # views unchanged, one negative added
  assert set(swaps) == set(plain) | {bg.NEGATIVE}
  for k in plain:
    np.testing.assert_array_equal(swaps[k], plain[k], err_msg=f"swaps {k}")
  on = next(input_lib.train_iterator(str(tmp_path), background=bg.Settings("rm", 1.0), **kw))
  assert not np.array_equal(on["view1"], plain["view1"])


def test_swaps_adds_one_negative_per_query_in_moco():
  """info_nce with `extra`: the negative is one more column of the logits (numpy)."""
  from detcon_jax.objectives.contrastive import info_nce
  rng = np.random.default_rng(0)
  q, k, e = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3))
  queue = rng.normal(size=(6, 8)).astype(np.float32)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = np.concatenate([np.sum(unit(q) * unit(k), -1)[:, None],
                           np.sum(unit(q) * unit(e), -1)[:, None], unit(q) @ unit(queue).T], 1) / 0.2
  want = np.mean(np.log(np.exp(logits).sum(-1)) - logits[:, 0])
  got, _ = info_nce(q, k, queue, temperature=0.2, extra=e)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _config(method, mode, **kw):
  return ml_collections.ConfigDict(dict(
      method=method, batch_size=kw.get("batch_size", 8), moco=dict(symmetric=False),
      background=dict(mode=mode, p_pos=kw.get("p_pos", 0.2), p_neg=0.2)))


def _check(cfg):
  bg.validate(cfg)
  validation.check_background(cfg, registry.get_objective(cfg.method))


def test_validate_refuses_nonsense():
  for method, mode in (("moco_v2", "swaps"), ("byol", "rm"), ("simclr", "swaps"),
                       ("detcon_s", "swaps"), ("detcon_b", "random"), ("swav", "rm")):
    _check(_config(method, mode))
  for cfg, match in ((_config("byol", "swaps"), "explicit negatives.*works with detcon_s, "
                      "moco_v2, simclr"),
                     (_config("cast", "rm"), "does not compose"),
                     (_config("moco_v2", "blur"), "choose one of"),
                     (_config("moco_v2", "rm", p_pos=1.5), "p_pos"),
                     (_config("moco_v2", "swaps", batch_size=2), ">= 3")):
    with pytest.raises(ConfigError, match=match):
      _check(cfg)


def test_swaps_with_symmetric_moco_is_refused_by_moco():
  c = moco_config.get_config("demo")
  c.background.mode = "swaps"
  validation.validate(c)
  c.moco.symmetric = True
  with pytest.raises(ConfigError, match="moco.symmetric=False"):
    validation.validate(c)


def test_multi_crop_only_global_views_are_augmented():
  specs = VIEWS + (V.ViewSpec("small1", 16, fields=(V.MASKS,), small=True),)
  out = bg.with_fields(specs, bg.Settings("random", 0.2))
  assert [s.fields for s in out] == [(V.MASKS, V.FOREGROUND, V.BACKGROUND)] * 2 + [(V.MASKS,)]
  assert bg.with_fields(specs, None) == specs


def test_moco_swaps_negative_goes_through_the_key_network_and_is_never_enqueued():
  """The loss with batch[NEGATIVE] is info_nce with the key network's embedding of the
  negative as one extra column (computed here by hand); the enqueued rows are the keys."""
  import jax
  from harness import tiny_method_config
  from detcon_jax.objectives import common, moco
  from detcon_jax.objectives.contrastive import info_nce
  config = tiny_method_config("moco_v2")
  config.moco.queue_size = 16
  config.background.mode = "swaps"
  batch = B.synthetic_train_batch(4, specs=V.standard_views(config))
  batch[bg.NEGATIVE] = np.random.default_rng(3).random(batch["view1"].shape, dtype=np.float32)
  params, state = moco.init(jax.random.PRNGKey(0), config, batch)
  value, _, new_state, query = moco.contrast(params, state, batch, config)
  nets = common.build_networks(config, False)
  specs = [V.ViewSpec("view2", 32), V.ViewSpec(bg.NEGATIVE, 32)]
  keys = common.forward(nets, state[common.TARGET], state[common.BATCH_STATS], batch, specs).z
  want, _ = info_nce(query.z["view1"], keys["view2"], state[moco.QUEUE]["keys"],
                     temperature=float(config.loss.temperature), extra=keys[bg.NEGATIVE])
  np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
  np.testing.assert_allclose(new_state[moco.INCOMING], keys["view2"], rtol=1e-5, atol=1e-6)


def test_build_stores_tiled_backgrounds_and_names_the_rebuild(tmp_path):
  """--masks=grid,background stores saliency and each image's tiled background (the
  detector's map -> masks/background.tiled, bytes exact); records without it name the
  command that adds it."""
  from data_pipelines import demo, records
  from data_pipelines.masks import saliency
  out = str(tmp_path / "bg")
  m = build.build("demo", out, masks="grid,background", workers=1, num_train=3, num_test=1,
                  image_size=32, progress=False)
  assert m["background"]["method"] == tiles.DEFAULT and m["saliency"]["detector"] == "mbd"
  raw = next(iter(tf.data.TFRecordDataset(records.shard_paths(out, m, "train"))))
  ex = tf.train.Example.FromString(raw.numpy()).features.feature
  image = demo.example("train", int(ex[records.INDEX].int64_list.value[0]), size=32)["image"]
  got = tf.io.decode_png(ex[records.BACKGROUND].bytes_list.value[0]).numpy()
  np.testing.assert_array_equal(got, tiles.tiled(image, saliency.compute(image)))
  plain = str(tmp_path / "plain")
  build.build("demo", plain, masks="grid", workers=1, num_train=3, num_test=1, image_size=32,
              progress=False)
  with pytest.raises(records.MissingFieldError, match="--masks=background,grid"):
    records.require_field(plain, "background")


def test_simclr_swaps_negative_is_one_more_negative_of_view1_anchors():
  """nt_xent with `extra` (numpy): view-1 anchors get one more logit; view-2 anchors none;
  local negatives split it with the rows."""
  from detcon_jax.objectives.contrastive import nt_xent
  rng = np.random.default_rng(0)
  o1, o2, e = (rng.normal(size=(6, 8)) for _ in range(3))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  u1, u2, ue = unit(o1), unit(o2), unit(e)

  def direction(q, other, same, extra=None):
    logits = np.concatenate([q @ other.T, np.where(np.eye(6, dtype=bool), -np.inf, q @ same.T)]
                            + ([np.sum(q * extra, -1)[:, None]] if extra is not None else []),
                            1) / 0.2
    return np.mean(np.log(np.exp(logits).sum(-1)) - np.diag(q @ other.T) / 0.2)

  want = direction(u1, u2, u1, ue) + direction(u2, u1, u2)
  f = lambda *a, **k: float(nt_xent(*(x.astype(np.float32) for x in a), temperature=0.2, **k))
  np.testing.assert_allclose(f(o1, o2, extra=e.astype(np.float32)), want, rtol=1e-5)
  halves = [f(o1[s], o2[s], extra=e[s].astype(np.float32)) for s in (slice(0, 3), slice(3, 6))]
  np.testing.assert_allclose(f(o1, o2, extra=e.astype(np.float32), num_shards=2),
                             np.mean(halves), rtol=1e-5)
