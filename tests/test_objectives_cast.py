"""CAST: known answers of Grad-CAM and the attention loss, the second-order gradient against
finite differences, the objective on MoCo v2 (masked keys never enqueued), 1 vs 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon_jax.core.validation import validate
from detcon_jax.errors import ConfigError
from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.models import gradcam
from detcon_jax.objectives import cast, moco, registry
from detcon_jax.objectives.contrastive import l2_normalize
from harness import assert_same_update, one_step, run_on_devices, tiny_method_config


# --- Pure math -----------------------------------------------------------------------

def test_align_corners_resize_is_exact_on_linear_ramps():
  i, j = np.meshgrid(np.arange(3.0), np.arange(4.0), indexing="ij")
  out = gradcam.resize_align_corners(jnp.asarray((i + 2 * j)[None]), 5, 7)[0]
  p, q = np.meshgrid(np.arange(5) * 2 / 4, np.arange(7) * 3 / 6, indexing="ij")
  np.testing.assert_allclose(out, p + 2 * q, atol=1e-6)         # bilinear keeps ramps exact
  corners = gradcam.resize_align_corners(jnp.arange(16.0).reshape(1, 4, 4), 2, 2)[0]
  np.testing.assert_array_equal(corners, [[0, 3], [12, 15]])    # align_corners: the corners


def test_grad_cam_of_a_linear_encoder_in_closed_form():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5, 2))                    # images [B, h, w, 2]
  enc, w = rng.normal(size=(2, 6)), rng.normal(size=(6, 3))
  keys = rng.normal(size=(3, 3))
  maps = jnp.asarray(x @ enc)                          # a linear (1x1 conv) encoder: A = x E
  head = lambda a: jnp.mean(a, axis=(1, 2)) @ w        # q = mean_hw(A) W
  tau = 0.2
  # d(q.k / tau)/dA = W k / (h w tau) at every position, so alpha = W k / (h w tau) and
  # Grad-CAM = ReLU(A W k) / (h w tau).
  want = np.maximum(np.einsum("bhwc,bc->bhw", x @ enc, keys @ w.T), 0) / (20 * tau)
  np.testing.assert_allclose(gradcam.grad_cam(head, maps, keys, temperature=tau, norm="none"),
                             want, rtol=1e-5, atol=1e-6)
  shifted = want - want.min(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(gradcam.grad_cam(head, maps, keys, temperature=tau),
                             shifted / (shifted.max(axis=(1, 2), keepdims=True) + 1e-7),
                             rtol=1e-5, atol=1e-6)


def test_attention_loss_is_zero_when_grad_cam_is_proportional_to_saliency():
  rng = np.random.default_rng(1)
  saliency = (rng.random((4, 5, 5)) > 0.5).astype(np.float32)
  cam = saliency * np.asarray([0.5, 2.0, 7.0, 1.0])[:, None, None]
  for form in cast.COSINES[:1]:
    value, count = cast.attention_loss(jnp.asarray(cam), jnp.asarray(saliency), form)
    assert abs(float(value)) < 1e-6 and int(count) == 4
  same_scale, _ = cast.attention_loss(jnp.asarray(3 * saliency), jnp.asarray(saliency), "batch")
  assert abs(float(same_scale)) < 1e-6
  # Orthogonal maps cost 1; an image with no salient pixel is left out of the mean.
  cam2 = np.stack([1 - saliency[0], saliency[1], saliency[2]])
  sal2 = np.stack([saliency[0], saliency[1], np.zeros_like(saliency[2])])
  value, count = cast.attention_loss(jnp.asarray(cam2), jnp.asarray(sal2), "image")
  np.testing.assert_allclose(float(value), 0.5, atol=1e-6)
  assert int(count) == 2


def test_batch_cosine_is_one_cosine_over_the_flattened_batch():
  rng = np.random.default_rng(2)
  cam, sal = rng.random((3, 4, 4)), rng.random((3, 4, 4))
  want = 1 - cam.ravel() @ sal.ravel() / (np.linalg.norm(cam) * np.linalg.norm(sal))
  value, _ = cast.attention_loss(jnp.asarray(cam), jnp.asarray(sal), "batch")
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  per_image = np.mean([1 - c.ravel() @ s.ravel() / (np.linalg.norm(c) * np.linalg.norm(s))
                       for c, s in zip(cam, sal)])
  value, _ = cast.attention_loss(jnp.asarray(cam), jnp.asarray(sal), "image")
  np.testing.assert_allclose(float(value), per_image, rtol=1e-5)


def test_second_order_gradient_matches_finite_differences():
  """d L_att / d(encoder, head) goes through G = dq/dA: check it in float64 along random
  directions with central differences."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)))
    keys = l2_normalize(jnp.asarray(rng.normal(size=(2, 5))))
    saliency = jnp.asarray((rng.random((2, 4, 4)) > 0.4).astype(np.float64))
    theta = {"enc": rng.normal(size=(3, 6)), "w1": rng.normal(size=(6, 8)),
             "w2": rng.normal(size=(8, 5))}
    theta = jax.tree.map(jnp.asarray, theta)

    def l_att(t):
      maps = jnp.tanh(x @ t["enc"])
      head = lambda a: l2_normalize(jnp.tanh(jnp.mean(a, axis=(1, 2)) @ t["w1"]) @ t["w2"])
      cam = gradcam.grad_cam(head, maps, keys, temperature=0.2)
      return cast.attention_loss(cam, saliency, "image")[0]

    l_att = jax.jit(l_att)
    grads = jax.jit(jax.grad(l_att))(theta)
    assert all(float(jnp.abs(g).max()) > 1e-6 for g in jax.tree.leaves(grads))
    eps = 1e-6
    for i in range(3):
      v = jax.tree.map(lambda a, k=i: jnp.asarray(np.random.default_rng(10 + k).normal(
          size=a.shape)), theta)
      plus = l_att(jax.tree.map(lambda a, d: a + eps * d, theta, v))
      minus = l_att(jax.tree.map(lambda a, d: a - eps * d, theta, v))
      numeric = (plus - minus) / (2 * eps)
      analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-5, atol=1e-8)


def test_masked_key_is_the_mean_colour_outside_the_saliency():
  images = jnp.full((1, 2, 2, 3), 0.9)
  mask = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
  out = cast.mask_images(images, mask)
  np.testing.assert_allclose(out[0, 0, 0], 0.9)
  np.testing.assert_allclose(out[0, 0, 1], [0.485, 0.456, 0.406])   # zero once normalised
  np.testing.assert_array_equal(cast.binarise(jnp.asarray([0.2, 0.5, 0.51]), 0.5), [0, 0, 1])


# --- The objective -------------------------------------------------------------------

def cast_config(**cast_kw):
  c = tiny_method_config("cast")
  c.moco.update(queue_size=12, momentum=0.9)
  c.cast.update(cast_kw)
  return c


def cast_batch(config, seed=3):
  """A synthetic batch of the CAST views with a salient block per image (on the 2x2 grid
  of a 32 px view the align-corners resize samples the corner pixels)."""
  specs = [V.ViewSpec(s.name, s.size, s.crop_area, s.augment) for s in cast.views(config)]
  batch = B.synthetic_train_batch(config.batch_size, specs=specs, seed=seed)
  rng = np.random.default_rng(seed)
  for s in specs:
    sal = np.zeros((config.batch_size, s.size, s.size), np.float32)
    for b in range(config.batch_size):
      y, x = rng.integers(0, s.size // 2, 2)
      sal[b, y:, x:] = rng.uniform(0.6, 1.0)
    batch[B.key(s.name, V.SALIENCY)] = sal
  return batch


@pytest.fixture(scope="module")
def cast_setup():
  config = cast_config()
  objective = registry.get_objective("cast")
  batch = cast_batch(config)
  params, state = jax.jit(lambda r, b: objective.init(r, config, b))(jax.random.key(0), batch)
  return config, objective, batch, params, state


def test_loss_is_moco_plus_weighted_attention_and_masked_keys_are_not_enqueued(cast_setup):
  config, objective, batch, params, state = cast_setup
  run = lambda loss_fn: jax.jit(lambda p, s, b: loss_fn(p, s, b, None, 0, config))(
      params, state, batch)
  value, (metrics, new_state) = run(objective.loss)
  moco_value, (_, moco_state) = run(moco.loss)
  np.testing.assert_allclose(metrics["loss_moco"], moco_value, rtol=1e-5)
  np.testing.assert_allclose(value, metrics["loss_moco"] + 3 * metrics["loss_att"], rtol=1e-5)
  assert 0 < float(metrics["loss_att"]) < 1 and float(metrics["att_images"]) == 1.0
  # The queue receives exactly MoCo's keys of view2, not the masked keys.
  np.testing.assert_allclose(new_state[moco.INCOMING], moco_state[moco.INCOMING], atol=1e-6)
  # The released code's normalised total, from the same parts.
  np.testing.assert_allclose(cast.total_loss(metrics["loss_moco"], metrics["loss_att"], 3.0,
                                             "normalized"), value / 4, rtol=1e-6)


def test_attention_gradient_reaches_encoder_and_head(cast_setup):
  config, objective, batch, params, state = cast_setup
  config.cast.attention_weight = 1.0

  def l_att(p):
    return objective.loss(p, state, batch, None, 0, config)[1][0]["loss_att"]
  grads = jax.jit(jax.grad(l_att))(params)
  config.cast.attention_weight = 3.0
  for part in ("encoder", "projector"):
    norm = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads[part]))
    assert np.isfinite(norm) and norm > 0, part


def test_grounding_evaluation_on_the_tiny_state(cast_setup):
  from detcon_jax.evaluate import gradcam
  config, _, _, params, state = cast_setup
  rng = np.random.default_rng(0)
  sem = np.zeros((4, 32, 32), np.int32)
  sem[:, 8:24, 8:24] = 1
  batches = [{B.IMAGE: rng.random((4, 32, 32, 3), np.float32), B.SEMANTIC: sem}
             for _ in range(2)]
  out = gradcam.evaluate(config, {"params": params, "state": state}, batches)
  assert out["num_images"] == 8 and 0.0 <= out["miou"] <= 1.0
  assert len(out["ious"]) == 8 and np.all(np.isfinite(out["ious"]))
  assert out["overlays"].shape == (4, 32, 3 * 32 + 2 * 2, 3)


@pytest.mark.parametrize("preset", ["demo", "imagenet", "coco-100"])
def test_presets_are_moco_v2_plus_cast(preset):
  import importlib
  config = importlib.import_module("configs.cast").get_config(preset)
  base = importlib.import_module("configs.moco_v2").get_config(preset)
  validate(config)
  assert config.method == "cast" and config.views.min_salient_cover == 0.2
  assert config.cast.attention_weight == 3.0 and config.cast.cosine == "image"
  assert (config.steps, config.optimizer.base_lr, config.loss.temperature) == (
      base.steps, base.optimizer.base_lr, base.loss.temperature)
  config.steps = 3                      # --config.steps alone keeps it valid
  validate(config)


def test_config_errors_name_the_key():
  config = cast_config()
  for key, value, match in (("cast.cosine", "pixel", "cast.cosine"),
                            ("cast.total", "mean", "cast.total"),
                            ("head.batch_norm", True, "batch_norm"),
                            ("moco.symmetric", True, "symmetric"),
                            ("views.min_salient_cover", 1.0, "min_salient_cover")):
    bad = cast_config()
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(ConfigError, match=match):
      validate(bad)
  validate(config)
  no_saliency = {k: v for k, v in cast_batch(config).items() if "saliency" not in k}
  with pytest.raises(ValueError, match="saliency"):
    registry.get_objective("cast").init(jax.random.key(0), config, no_saliency)


def cast_one_step(out_path):
  """Init and one sharded train step on the devices of this process; save loss and update."""
  config = cast_config()
  config.batch_size = 8
  one_step(registry.get_objective("cast"), config, out_path, host=cast_batch(config),
           metrics_saved=("loss", "loss_att"))


@pytest.mark.slow
def test_8_devices_equal_1_device(tmp_path):
  """The second-order step jits and shards: 8 devices give the 1-device loss and update."""
  cast_one_step(str(tmp_path / "one.npz"))
  one = dict(np.load(tmp_path / "one.npz"))
  eight = run_on_devices(f"import test_objectives_cast as m; "
                             f"m.cast_one_step({str(tmp_path / 'eight.npz')!r})",
                             str(tmp_path / "eight.npz"))
  assert float(one["loss_att"]) > 0
  np.testing.assert_allclose(eight["loss_att"], one["loss_att"], rtol=2e-4)
  assert_same_update(one, eight, rtol=2e-4, atol=1e-6)
