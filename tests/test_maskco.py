"""MaskCo: RoI align = torchvision, boxes and the masked box, region InfoNCE, MPH, configs,
TensorBoard pictures, 1 vs 8 devices."""
import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from detcon_jax.core import validation
from configs.common import ConfigError
from data_pipelines import augment as aug
from data_pipelines import batch as B
from data_pipelines import boxes as boxes_lib
from data_pipelines import build
from data_pipelines import input as input_lib
from detcon_jax.evaluate import visualize
from detcon_jax.models import heads
from detcon_jax.models.roi_align import roi_align
from detcon_jax.objectives import maskco, registry
from detcon_jax.objectives.contrastive import region_nce
from harness import assert_same_update, run_on_devices, one_step, small_config

# --- RoI align against torchvision ------------------------------------------------

# Run in a fresh interpreter: importing torchvision (triton) in a process that has
# loaded TensorFlow segfaults (see tests/test_export.py).
TORCH_SIDE = """
import sys
import numpy as np
import torch
import torchvision

a = np.load(sys.argv[1])
x = torch.from_numpy(a["features"].transpose(0, 3, 1, 2).copy())
b = a["boxes"]                                               # [B, K, 4] (y0, x0, y1, x1)
rois = np.concatenate([np.repeat(np.arange(b.shape[0]), b.shape[1])[:, None],
                       b.reshape(-1, 4)[:, [1, 0, 3, 2]]], 1).astype(np.float32)
for name in a.files:
  if not name.startswith("want/"):
    continue
  _, size, ratio, aligned = name.split("/")
  size = tuple(int(s) for s in size.split("x"))
  got = torchvision.ops.roi_align(x, torch.from_numpy(rois), size, spatial_scale=0.25,
                                  sampling_ratio=int(ratio), aligned=aligned == "True")
  got = got.numpy().transpose(0, 2, 3, 1).reshape(a[name].shape)
  np.testing.assert_allclose(a[name], got, rtol=1e-5, atol=1e-5, err_msg=name)
print("compared", sum(n.startswith("want/") for n in a.files))
"""


def test_roi_align_equals_torchvision(tmp_path):
  pytest.importorskip("torch")
  if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed (pip install -e '.[export]')")
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
  # Boxes in image pixels (stride 4: a 24 x 28 image), some partly or wholly outside.
  start = rng.uniform(-8, 24, (2, 5, 2))
  boxes = np.concatenate([start, start + rng.uniform(0.5, 16, (2, 5, 2))], -1).astype(np.float32)
  boxes[0, 0] = [-10, -10, -6, -5]     # wholly outside: zeros
  boxes[1, 0] = [22, 26, 30, 40]       # across the far border
  arrays = {"features": features, "boxes": boxes}
  fn = jax.jit(roi_align, static_argnums=(2, 4, 5), static_argnames=("spatial_scale",))
  settings = [(size, ratio, aligned) for size in ((2, 2), (3, 2)) for ratio in (1, 3)
              for aligned in (True, False)] + [((7, 7), 2, True)]
  for size, ratio, aligned in settings:
    out = fn(jnp.asarray(features), jnp.asarray(boxes), size, 0.25, ratio, aligned)
    assert out.shape == (2, 5) + size + (3,)
    arrays[f"want/{size[0]}x{size[1]}/{ratio}/{aligned}"] = np.asarray(out)
  assert np.all(arrays["want/7x7/2/True"][0, 0] == 0)
  path = tmp_path / "roi.npz"
  np.savez(path, **arrays)
  child = subprocess.run([sys.executable, "-c", TORCH_SIDE, str(path)], capture_output=True,
                         text=True, timeout=300)
  assert child.returncode == 0, child.stderr[-3000:]
  assert "compared 9" in child.stdout


# --- Boxes and the masked box -----------------------------------------------------

SIZE, H, W = 64, 80, 120


def _box_pair(seed, flips):
  """Both views' params and boxes as input.py makes them; flips forced to `flips`."""
  specs = maskco.views(_demo())
  keys = tf.random.experimental.stateless_split(tf.constant([seed, 5], tf.int64), 3)
  params = {s.name: dict(aug.sample_view_params(k, H, W, s), flip=tf.constant(f))
            for s, k, f in zip(specs, keys, flips)}
  moved, src = boxes_lib.sample(keys[2], H, W, {n: p["box"] for n, p in params.items()},
                               specs)
  params[specs[1].name] = dict(params[specs[1].name], box=moved)   # the key view's crop
  out = {}
  for s in specs:
    data = aug.geometric({aug.IMAGE: tf.zeros([H, W, 3])} | src[s.name], params[s.name], s.size)
    out[s.name] = (data[aug.BOXES].numpy(), data[aug.BOXES_VALID].numpy())
  return specs, params, out


def _view_to_src(b, p, size):
  y, x, h, w = (float(v) for v in p["box"].numpy())
  b = b.copy()
  if bool(p["flip"].numpy()):
    b[..., [1, 3]] = size - b[..., [3, 1]]
  return b * ([h / size, w / size] * 2) + [y, x, y, x]


def _src_to_view(b, p, size):
  y, x, h, w = (float(v) for v in p["box"].numpy())
  b = (b - [y, x, y, x]) * ([size / h, size / w] * 2)
  if bool(p["flip"].numpy()):
    b[..., [1, 3]] = size - b[..., [3, 1]]
  return b


def _iou(a, b):
  ih = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  iw = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return ih * iw / (area(a) + area(b) - ih * iw)


@pytest.mark.parametrize("flips", [(False, False), (True, False), (False, True), (True, True)])
def test_key_boxes_and_their_projection_into_the_query_view(flips):
  lo, hi = 32 * SIZE / 224, 128 * SIZE / 224
  for seed in range(6):
    (q, k), params, out = _box_pair(seed, flips)
    kb, kv = out[k.name]
    qb, qv = out[q.name]
    assert kb.shape == (17, 4) and qb.shape == (1, 4) and kv.all() and qv.all()
    sides = kb[:, 2:] - kb[:, :2]
    assert np.all(sides >= lo - 1e-3) and np.all(sides <= hi + 1e-3), sides
    assert np.all(kb >= -1e-4) and np.all(kb <= SIZE + 1e-4)
    assert np.all(_iou(kb[1:], kb[:1]) < 0.2)                 # negatives vs the positive
    # The query's box is the key's positive, taken back to the image and into the query.
    want = _src_to_view(_view_to_src(kb[0], params[k.name], SIZE), params[q.name], SIZE)
    np.testing.assert_allclose(qb[0], want, atol=2e-3)
    assert np.all(qb >= -1e-4) and np.all(qb <= SIZE + 1e-4)   # lies in the query view


def test_too_few_negatives_are_flagged_not_kept():
  """Negative boxes that cannot keep IoU < max_iou are flagged invalid, never kept."""
  from data_pipelines import views as V
  import dataclasses
  specs = [dataclasses.replace(s, boxes=V.BoxSpec(s.boxes.role, 17, (200.0, 224.0), 0.01))
           for s in maskco.views(_demo())]
  keys = tf.random.experimental.stateless_split(tf.constant([3, 5], tf.int64), 3)
  params = {s.name: aug.sample_view_params(kk, H, W, s) for s, kk in zip(specs, keys)}
  src = boxes_lib.sample(keys[2], H, W, {n: p["box"] for n, p in params.items()},
                         specs)[1][specs[1].name]
  valid = src[aug.BOXES_VALID].numpy()
  assert valid[0] and not valid[1:].all()
  b = src[aug.BOXES].numpy()
  assert np.all(_iou(b[1:][valid[1:]], b[:1]) < 0.01)


def test_box_views_need_one_key_and_one_query():
  import dataclasses
  q, k = maskco.views(_demo())
  with pytest.raises(ValueError, match="one 'key' and one 'query'"):
    boxes_lib.pair([dataclasses.replace(q, boxes=k.boxes), k])
  assert boxes_lib.pair([k, q]) == (q, k) and boxes_lib.pair([]) is None


def test_erase_zeroes_exactly_the_pixels_whose_centres_lie_in_the_box():
  images = np.random.default_rng(0).uniform(0.1, 1, (3, 16, 16, 3)).astype(np.float32)
  boxes = np.array([[2.4, 3.5, 9.6, 7.5], [0, 0, 16, 16], [5, 5, 5.4, 12]], np.float32)
  got = boxes_lib.erase(tf.constant(images), tf.constant(boxes)).numpy()
  c = np.arange(16) + 0.5
  for img, out, (y0, x0, y1, x1) in zip(images, got, boxes):
    inside = ((c >= y0) & (c < y1))[:, None] & ((c >= x0) & (c < x1))[None, :]
    assert np.all(out[inside] == 0) and np.all(out[~inside] == img[~inside])
  assert (got[0] == 0).all(-1).sum() == 8 * 4 and (got[1] == 0).all() and (got[2] != 0).all()


def test_pipeline_masks_the_query_box_after_colour_and_keeps_boxes_valid(tmp_path):
  build.build("demo", str(tmp_path), masks="grid", workers=1, num_train=8, num_test=2,
              shard_size=8, image_size=48, progress=False)
  specs = maskco.views(_demo(image_size=32))
  it = input_lib.train_iterator(str(tmp_path), batch_size=8, views=specs, host_index=0,
                                host_count=1, seed=1)
  b = next(it)
  q, k = (s.name for s in specs)
  assert b[B.key(q, "boxes")].shape == (8, 1, 4) and b[B.key(k, "boxes")].shape == (8, 17, 4)
  assert b[B.key(q, "boxes_valid")].all() and b[B.key(k, "boxes_valid")].all()
  inside = boxes_lib.box_mask(b[B.key(q, "boxes")][:, 0], 32).numpy()
  assert inside.sum() > 0 and np.all(b[q][inside] == 0)       # zeroed after colour ops
  assert (b[q][~inside] == 0).all(-1).mean() < 0.05            # and nothing else
  assert np.all(_iou(b[B.key(k, "boxes")][:, 1:], b[B.key(k, "boxes")][:, :1]) < 0.2)
  pictures = visualize.view_box_images(b)
  assert pictures.dtype == np.uint8 and pictures.shape == (4, 32, 2 * 32 + visualize.SEPARATOR, 3)
  first = np.asarray(b[B.key(q, "boxes")][0, 0])
  y0, x0 = int(np.floor(first[0])), int(np.floor(first[1]))
  assert tuple(pictures[0, y0, x0]) == visualize.POSITIVE      # masked box outlined


# --- Loss -------------------------------------------------------------------------

T = 0.2
E0, E1 = [1.0, 0.0], [0.0, 1.0]


def test_region_nce_hand_made():
  """Two images, 3 boxes each (0 the positive); unit vectors so every logit is 0 or 1 / T."""
  q = jnp.array([E0, E1])
  k = jnp.array([[E0, E1, [-1.0, 0.0]], [E1, E0, E1]])
  ones = jnp.ones((2, 3), bool)
  qv = jnp.ones((2,), bool)
  e = np.exp(1 / T)
  # Inter: row 0 sees image 1's negatives (e0, e1): logits (5 | 5, 0); row 1 the same.
  loss, acc, rows = region_nce(q, k, qv, ones, temperature=T)
  np.testing.assert_allclose(loss, np.log(2 * e + 1) - 1 / T, rtol=1e-6)
  assert rows == 2 and acc == 1      # a tie with a negative counts as a hit (index 0 first)
  # +in: row 0 adds its own (e1, -e0) -> 0, -5 (logits 5 | 5, 0, 0, -5); row 1 its own
  # (e0, e1) -> 0, 5 (logits 5 | 5, 0, 0, 5).
  loss, _, _ = region_nce(q, k, qv, ones, temperature=T, intra=True)
  want = ((np.log(2 * e + 2 + 1 / e) - 1 / T) + (np.log(3 * e + 2) - 1 / T)) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  # An invalid negative box is no negative; an invalid positive drops its row.
  # Image 0: positive invalid (row 0 dropped) and its e1 negative invalid, so row 1 sees
  # only -e0: logits (5 | 0).
  valid = ones.at[0, 0].set(False).at[0, 1].set(False)
  loss, _, rows = region_nce(q, k, qv, valid, temperature=T)
  np.testing.assert_allclose(loss, np.log(e + 1) - 1 / T, atol=1e-6)   # row 1 only
  assert rows == 1


def _numpy_region_nce(q, k, qv, kv, shards, intra):
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  n = len(q) // shards
  losses = []
  for b in range(len(q)):
    if not (qv[b] and kv[b, 0]):
      continue
    logits = [q[b] @ k[b, 0] / T]
    for o in range(len(q)):
      if o // n == b // n and (o != b or intra):
        logits += [q[b] @ k[o, j] / T for j in range(1, k.shape[1]) if kv[o, j]]
    logits = np.array(logits)
    losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0])
  return np.mean(losses)


@pytest.mark.parametrize("shards,intra", [(1, False), (2, False), (2, True), (4, True)])
def test_region_nce_equals_a_loop(shards, intra):
  rng = np.random.default_rng(shards)
  q, k = rng.normal(size=(8, 5)), rng.normal(size=(8, 4, 5))
  qv, kv = rng.random(8) > 0.2, rng.random((8, 4)) > 0.2
  got, _, _ = region_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(qv), jnp.asarray(kv),
                         temperature=T, num_shards=shards, intra=intra)
  np.testing.assert_allclose(got, _numpy_region_nce(q, k, qv, kv, shards, intra), rtol=1e-5)


# --- Networks, configs ------------------------------------------------------------

def _demo(**kw):
  c = importlib.import_module("configs.maskco").get_config("demo")
  c.update(kw)
  return c


def test_mask_prediction_head_blocks_and_identity():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 32))
  none = heads.MaskPredictionHead(0)
  v = none.init(jax.random.PRNGKey(1), x, train=False)
  assert not jax.tree.leaves(v) and np.array_equal(none.apply(v, x, train=False), x)
  three = heads.MaskPredictionHead(3)
  v = jax.eval_shape(lambda: three.init(jax.random.PRNGKey(1), x, train=False))
  assert sorted(v["params"]) == ["block0", "block1", "block2"]
  kernels = [v["params"]["block0"][f"conv{i}"]["kernel"].shape for i in (1, 2, 3)]
  assert kernels == [(1, 1, 32, 8), (3, 3, 8, 8), (1, 1, 8, 32)]        # 1x1-3x3-1x1, C / 4
  assert jax.eval_shape(lambda v: three.apply(v, x, train=False), v).shape == x.shape


def test_mph_is_in_both_encoders_and_not_in_the_exported_backbone():
  config = small_config("maskco")
  batch = B.synthetic_train_batch(8, specs=maskco.views(config))
  init = lambda c: jax.eval_shape(lambda: maskco.init(jax.random.PRNGKey(0), c, batch))
  params, state = init(config)                                  # shapes only
  assert "mph" in params and "mph" in state["target"] and len(params["mph"]) == 3
  assert "mph" not in registry.encoder_variables(params, state)["params"]
  config.maskco.mph_blocks = 0
  params, state = init(config)
  assert not jax.tree.leaves(params["mph"])


@pytest.mark.parametrize("preset", ["demo", "imagenet", "coco", "coco-200"])
def test_presets_validate_with_the_paper_numbers(preset):
  c = importlib.import_module("configs.maskco").get_config(preset)
  validation.validate(c)
  m = c.maskco
  assert (m.num_boxes, tuple(m.box_size), m.max_iou, m.mph_blocks, m.momentum) == (
      17, (32.0, 128.0), 0.2, 3, 0.999)
  assert c.loss.temperature == 0.2 and c.loss.local_negatives and not c.loss.intra_negatives
  assert c.batch_size // c.loss.num_shards == 32        # 16 x 31 negatives per query
  assert c.views.global_area == (0.2, 1.0) and c.data.augment == "moco_v2"
  if preset != "demo":
    validation.validate(c, device_count=8, process_count=1)
    assert (c.optimizer.name, c.optimizer.base_lr, c.optimizer.weight_decay) == ("sgd", 0.03, 1e-3)
    assert (c.batch_size, c.image_size, c.model.depth) == (256, 224, 50)
    assert c.steps == (500_455 if preset in ("imagenet", "coco") else 200 * 118_287 // 256)


@pytest.mark.parametrize("key,value,words", [
    ("maskco.mph_blocks", -1, "0: no head"), ("maskco.num_boxes", 1, "paper: 17"),
    ("maskco.sampling_ratio", 0, "not jit-able"), ("maskco.box_size", (64.0, 32.0), "low <= high"),
    ("views.small_crops", 2, "no multi-crop")])
def test_bad_settings_name_the_key(key, value, words):
  c = _demo()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ConfigError, match=words):
    validation.validate(c)


def test_method_override_onto_another_config_is_one_clear_error():
  c = importlib.import_module("configs.moco_v2").get_config("demo")
  c.method = "maskco"
  with pytest.raises(ConfigError, match="configs/maskco.py"):
    validation.validate(c)


# --- Training -----------------------------------------------------------------------

def maskco_one_step(out_path):
  config = small_config("maskco")
  config.optimizer.warmup_steps = 0
  config.loss.update(num_shards=2, intra_negatives=True)    # groups of 4 images
  one_step(maskco.OBJECTIVE, config, out_path)


@pytest.mark.slow
def test_maskco_local_intra_negatives_8_devices_equal_1_device(tmp_path):
  """Negatives in groups of 4 images, +in, over 8 devices: nothing changes (the default
  suite runs the demo's single group in test_train_methods)."""
  one, eight = str(tmp_path / "one.npz"), str(tmp_path / "eight.npz")
  maskco_one_step(one)
  run_on_devices(f"import test_maskco as m; m.maskco_one_step({eight!r})", eight)
  assert_same_update(dict(np.load(one)), dict(np.load(eight)), rtol=2e-4, atol=1e-6)
