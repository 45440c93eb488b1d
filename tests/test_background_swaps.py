"""BG Swaps on DetCon-S and the FGmin crop constraint (Ryali et al. 2021, sec. 2.2, A.1, C.6).

DetCon-S's background-matched negative is mask-pooled under the query's own masks and
is one more negative of each view-1 mask anchor (data_pipelines/background_augment.py,
contrastive.detcon_nce); BG Swaps' global crops hold >= FGmin of the foreground
(augment.salient_crop_box, rule 'fg_min').
"""
import jax
import numpy as np
import pytest
import tensorflow as tf

from configs.common import ConfigError
from data_pipelines import augment as aug
from data_pipelines import background_augment as bg
from data_pipelines import batch as B
from data_pipelines import build
from data_pipelines import input as input_lib
from data_pipelines import views as V
from detcon_jax.objectives import common, registry
from detcon_numpy import jax_loss, random_case, reference_loss
from harness import box_examples, tiny_preset_config


# --- The loss: one more negative per view-1 mask anchor -----------------------------

@pytest.mark.parametrize("kw", [{}, dict(num_shards=2), dict(same_image_negatives=False)])
def test_detcon_nce_extra_is_one_more_negative_of_each_view1_row(kw):
  """Against the float64 reference loop (tests/test_detcon_reference.py) with the extra
  logit appended to each view-1 row's softmax (never a positive, no view-2 row)."""
  case = random_case(3, bootstrap=False)
  extra = np.random.default_rng(9).normal(size=case[0].shape).astype(np.float32)
  want = reference_loss(*case, extra=extra, **kw)
  np.testing.assert_allclose(jax_loss(*case, extra=extra, **kw), want, rtol=1e-5)
  assert abs(want - reference_loss(*case, **kw)) > 1e-3           # the extra column counts


def test_negative_is_pooled_under_the_query_masks():
  batch = B.synthetic_train_batch(4, 32, num_masks=4, seed=1)
  batch[bg.NEGATIVE] = np.zeros_like(batch[B.VIEW1])
  out, spec = bg.negative_view(batch, V.ViewSpec(B.VIEW1, 32, fields=(V.MASKS,)))
  assert spec == V.ViewSpec(bg.NEGATIVE, 32, fields=(V.MASKS,)) and bg.NEGATIVE + "/masks" not in batch
  assert out[B.key(bg.NEGATIVE, "masks")] is batch[B.MASKS1]
  assert out[B.key(bg.NEGATIVE, "mask_ids")] is batch[B.MASK_IDS1]
  assert bg.negative_view(batch, V.ViewSpec(B.VIEW1, 32))[1].fields == ()    # SimCLR


def _value_and_grad(method, config, grad=True):
  objective = registry.get_objective(method)
  fn = lambda p, s, b: objective.loss(p, s, b, None, 0, config)
  return jax.jit(jax.value_and_grad(fn, has_aux=True) if grad else fn)


GRAD = [False, pytest.param(True, marks=pytest.mark.slow)]   # gradients: a slower compile


@pytest.fixture(scope="module")
def tiny_params():
  """(params, state) of a tiny ResNet-18 at 32 px for SimCLR and DetCon-S (same layout),
  drawn in numpy on init's shapes (He-normal kernels, unit scales and variances): the
  tests compare two computations on the same values, and compiling init costs ~30 s."""
  batch = B.synthetic_train_batch(4, 32, num_masks=4, seed=0)
  shapes = jax.eval_shape(lambda k: registry.get_objective("simclr").init(
      k, tiny_preset_config("simclr"), batch), jax.random.key(0))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    if len(leaf.shape) < 2:
      return np.zeros(leaf.shape, leaf.dtype)
    fan_in = np.prod(leaf.shape[:-1])
    return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("grad", GRAD)
def test_detcon_s_with_one_global_mask_and_the_negative_equals_simclr(grad, tiny_params):
  """One global mask (dedup form): DetCon-S + BG Swaps' negative is SimCLR + it: loss,
  batch norm statistics (the negative pooled under view 1's global mask in the same
  network call) and, slow-marked, gradients."""
  batch = B.synthetic_train_batch(4, 32, num_masks=4, seed=0)
  batch[bg.NEGATIVE] = np.random.default_rng(5).random(batch[B.VIEW1].shape, dtype=np.float32)
  whole = dict(batch)
  for key in (B.MASKS1, B.MASKS2, B.MASK_IDS1, B.MASK_IDS2):
    whole[key] = np.full_like(batch[key], 7)
  params, state = tiny_params
  got = {}
  for method, b in (("simclr", batch), ("detcon_s", whole)):
    config = tiny_preset_config(method)
    config.loss.detcon_form = "dedup"
    out = _value_and_grad(method, config, grad)(params, state, b)
    (value, (_, new_state)), grads = out if grad else (out, {})
    got[method] = (value, new_state[common.BATCH_STATS], grads)
  for a, b in zip(jax.tree.leaves(got["simclr"]), jax.tree.leaves(got["detcon_s"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()))


# --- The pipeline: DetCon-S + swaps ---------------------------------------------------

def _detcon_s_swaps(**background):
  config = tiny_preset_config("detcon_s")
  config.background.update(mode="swaps", **background)
  bg.validate(config)
  return config


def _iterator(path, config, settings, extra_fields=()):
  views = tuple(V.ViewSpec(s.name, s.size, s.crop_area, s.augment, s.fields + extra_fields)
                for s in registry.get_objective(config.method).views(config))
  return input_lib.train_iterator(path, batch_size=config.batch_size, views=views,
                                  mask_source="box", num_masks=int(config.loss.num_masks),
                                  host_index=0, host_count=1, background=settings)


@pytest.mark.parametrize("grad", GRAD)
def test_p_zero_detcon_s_swaps_is_plain_detcon_s(tmp_path, grad, tiny_params):
  """p_pos = p_neg = fg_min = 0: the same batch bit for bit (no negative), so the same
  loss (and, slow-marked, gradient)."""
  build.write_records(str(tmp_path), {"train": box_examples()})
  config = _detcon_s_swaps(p_pos=0.0, p_neg=0.0, fg_min=0.0)
  settings = bg.settings(config)
  assert settings.mode == "swaps" and not settings.negative and settings.fg_min == 0
  plain = next(_iterator(str(tmp_path), config, None))
  swaps = next(_iterator(str(tmp_path), config, settings))
  assert set(swaps) == set(plain)
  for k in plain:
    np.testing.assert_array_equal(swaps[k], plain[k], err_msg=k)
  fn = _value_and_grad("detcon_s", config, grad)
  out0, out1 = fn(*tiny_params, plain), fn(*tiny_params, swaps)
  assert np.isfinite(float(jax.tree.leaves(out0)[0]))
  for a, b in zip(jax.tree.leaves(out0), jax.tree.leaves(out1)):
    np.testing.assert_array_equal(a, b)


def test_detcon_s_swaps_negative_and_fg_min_crops_in_the_pipeline(tmp_path):
  """With DetCon-S's masked views: batch[NEGATIVE] has the query's background pixels and
  another image's foreground (p_neg = 1); the default fg_min = 0.1 constrains both global
  crops, and every crop and fallback is counted."""
  build.write_records(str(tmp_path), {"train": box_examples()})
  config = _detcon_s_swaps(p_pos=1.0, p_neg=1.0)
  settings = bg.settings(config)
  assert settings.negative and settings.fg_min == 0.1                 # the paper's FGmin
  it = _iterator(str(tmp_path), config, settings, extra_fields=(V.FOREGROUND,))
  b = next(it)
  q, fg, neg, keys = b[B.VIEW1], b[B.key(B.VIEW1, V.FOREGROUND)] == 1, b[bg.NEGATIVE], b[B.VIEW2]
  assert neg.shape == q.shape and b[B.MASKS1].shape == q.shape[:3]
  for i in range(len(q)):
    np.testing.assert_array_equal(neg[i][~fg[i]], q[i][~fg[i]])
    if fg[i].any():
      assert [j for j in range(len(q)) if j != i and np.array_equal(neg[i][fg[i]], keys[j][fg[i]])]
  assert it.stats["constrained_crops"] == 2 * config.batch_size
  assert 0 <= it.stats["crop_fallbacks"] <= it.stats["constrained_crops"]


# --- FGmin: the paper's rule on salient_crop_box -------------------------------------

def _seed(i):
  return tf.constant([i, 11], tf.int64)


def _coverage(fg, box):
  y, x, h, w = (int(v) for v in box)
  return fg[y:y + h, x:x + w].sum() / fg.sum()


def test_fg_min_crops_hold_a_tenth_of_the_foreground_else_a_counted_centre_crop():
  sal = np.zeros((48, 64), np.float32)
  sal[36:46, 50:62] = 0.9                                  # 4% of the image, in a corner
  sample = tf.function(lambda seed: aug.salient_crop_box(seed, tf.constant(sal), (0.08, 0.3),
                                                         phi=0.1, rule="fg_min"))
  centre = aug.centre_crop_box(48, 64).numpy()
  np.testing.assert_array_equal(centre, [3, 11, 42, 42])   # 224/256 of the shorter side
  accepted = fallbacks = 0
  for i in range(80):
    box, fell_back = sample(_seed(i))
    if bool(fell_back):
      np.testing.assert_array_equal(box, centre)
      fallbacks += 1
    else:
      assert _coverage(sal > aug.SALIENT, box) >= 0.1
      accepted += 1
  assert accepted > 40 and fallbacks > 0                   # both paths taken (fixed seeds)


def test_fg_min_never_lowers_the_fraction_as_cast_does():
  """Foreground = the whole image, crops of 8%: CAST lowers phi to 0.08 and accepts the
  first draw; the paper's FGmin = 0.1 cannot be met and falls back to the CenterCrop."""
  sal = tf.ones((32, 32))
  box, fell_back = aug.salient_crop_box(_seed(0), sal, (0.08, 0.08), phi=0.1)
  assert not bool(fell_back) and _coverage(np.ones((32, 32)), box) < 0.1
  box, fell_back = aug.salient_crop_box(_seed(0), sal, (0.08, 0.08), phi=0.1, rule="fg_min")
  assert bool(fell_back)
  np.testing.assert_array_equal(box, [2, 2, 28, 28])
  with pytest.raises(ValueError, match="rule"):
    aug.salient_crop_box(_seed(0), sal, rule="paper")


def test_fg_min_config_and_view_specs():
  specs = (V.ViewSpec("view1", 32), V.ViewSpec("view2", 32),
           V.ViewSpec("small1", 16, small=True))
  out = bg.with_fields(specs, bg.Settings("swaps", 0.2, 0.2, True, fg_min=0.1))
  assert [(s.min_salient_cover, s.salient_rule) for s in out] == [
      (0.1, "fg_min"), (0.1, "fg_min"), (0.0, "adaptive")]
  assert bg.with_fields(specs, bg.Settings("rm", 0.2))[0].min_salient_cover == 0.0
  defaults = {m: bg.settings(_detcon_s_swaps() if m == "swaps" else _rm()).fg_min
              for m in ("swaps", "rm")}
  assert defaults == {"swaps": 0.1, "rm": 0.0}
  assert bg.settings(_detcon_s_swaps(fg_min=0.05)).fg_min == 0.05
  with pytest.raises(ConfigError, match="fg_min"):
    _detcon_s_swaps(fg_min=1.0)
  config = tiny_preset_config("detcon_s")
  config.background.mode = "swaps"
  config.views.min_salient_cover = 0.2
  with pytest.raises(ConfigError, match="set one of them to 0"):
    bg.validate(config)
  config.background.fg_min = 0.0
  bg.validate(config)
  with pytest.raises(ValueError, match="salient_rule"):
    V.ViewSpec("view1", 32, salient_rule="paper")


def _rm():
  config = tiny_preset_config("detcon_s")
  config.background.mode = "rm"
  return config


# --- Tiled backgrounds: the largest-rectangle tiling compared in the benchmark ------------

def test_largest_rectangle_against_brute_force_and_tile_fill():
  from data_pipelines.masks import tiled_background as tiles
  rng = np.random.default_rng(0)
  for _ in range(30):
    free = rng.random((6, 7)) > 0.3
    best = max((y1 - y0) * (x1 - x0) for y0 in range(6) for y1 in range(y0 + 1, 7)
               for x0 in range(7) for x1 in range(x0 + 1, 8) if free[y0:y1, x0:x1].all())
    y, x, h, w = tiles.largest_rectangle(free)
    assert h * w == best and free[y:y + h, x:x + w].all()
  image = np.zeros((8, 8, 3), np.uint8)
  image[..., 0] = np.arange(8)[None, :] % 2 * 200            # columns alternate 0 / 200
  sal = np.zeros((8, 8), np.float32)
  sal[3:8, 2:6] = 1.0                                        # row 0 stays free after dilation
  out = tiles.tiled(image, sal, "tile")
  np.testing.assert_array_equal(out, image)                   # the stripes continue in the hole
  assert tiles.largest_rectangle(np.zeros((3, 3), bool)) == (0, 0, 0, 0)


@pytest.mark.slow
def test_benchmark_writes_the_picture(tmp_path, monkeypatch):
  import glob
  import sys
  from benchmarks import masks_background
  monkeypatch.setattr(sys, "argv", ["x", "--n=3", "--show=2", f"--tb_dir={tmp_path}"])
  masks_background.main()
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(glob.glob(f"{tmp_path}/events*")[0])
          for v in e.summary.value}
  assert any(t.startswith("tiled backgrounds") for t in tags) and "ms_per_image/tile" in tags


def test_a_foreground_threshold_below_the_hole_threshold_is_named(caplog):
  """The build's hole (saliency > 0.2, dilated) holds the train-time foreground for any
  data.foreground_threshold >= 0.2; below it, the run says so."""
  manifest = {"background": {"method": "telea", "threshold": 0.2}}
  assert bg.check_hole(manifest, 0.5) and bg.check_hole({"background": {"method": "given"}}, 0.0)
  assert not bg.check_hole(manifest, 0.1) and "hole threshold 0.2" in caplog.text
