"""ResNet layout and heads: shapes, parameter counts, naming, mask pooling known answers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon_jax.models import heads
from detcon_jax.models.resnet import STRIDE, ResNet, normalize_images, num_features, output_stride


def abstract_variables(model, size=64):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                           train=False))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth,expected", [(18, 11_176_512), (50, 23_508_032)])
def test_param_counts_equal_torchvision_without_fc(depth, expected):
  # torchvision resnet18/50: 11,689,512 / 25,557,032 params including fc (513,000 / 2,049,000).
  assert count(abstract_variables(ResNet(depth=depth))["params"]) == expected


@pytest.mark.parametrize("depth,channels", [(18, (64, 64, 128, 256, 512)),
                                            (50, (64, 256, 512, 1024, 2048))])
def test_feature_shapes_at_64px(depth, channels):
  model = ResNet(depth=depth)
  v = abstract_variables(model)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 64, 64, 3)), train=False), v)
  names = ["stem", "stage1", "stage2", "stage3", "stage4"]
  sizes = [32, 16, 8, 4, 2]                                   # strides 2, 4, 8, 16, 32
  assert {k: out[k].shape for k in names} == {
      k: (2, s, s, c) for k, s, c in zip(names, sizes, channels)}
  assert num_features(depth) == channels[-1]


def test_without_stem_pool_stride_is_16_and_params_unchanged():
  model = ResNet(depth=18, stem_pool=False)
  v = abstract_variables(model, size=48)                      # 48 = 3 x 16: fine at stride 16
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 48, 48, 3)), train=False), v)
  assert [out[k].shape[1] for k in ("stem", "stage1", "stage2", "stage3", "stage4")] == \
      [24, 24, 12, 6, 3]
  assert output_stride(False) == 16 and output_stride(True) == STRIDE == 32
  assert count(v["params"]) == count(abstract_variables(ResNet(depth=18))["params"])
  with pytest.raises(ValueError, match="multiples of 16"):
    model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)), train=False)


def test_resnet200_blocks_and_width_multiplier():
  v = abstract_variables(ResNet(depth=200, width=0.25), size=32)["params"]
  blocks = [sum(k.startswith(f"layer{s}_") for k in v) for s in range(1, 5)]
  assert blocks == [3, 24, 36, 3]
  assert v["conv1"]["kernel"].shape == (7, 7, 3, 16)
  assert v["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 128, 512)
  assert num_features(200, 0.25) == 512


def test_torchvision_naming_and_v15_stride():
  p = abstract_variables(ResNet(depth=50))["params"]
  assert set(p["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                "downsample_conv", "downsample_bn"}
  assert "downsample_conv" not in p["layer1_1"]
  assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)   # the strided conv
  assert set(p["bn1"]) == {"scale", "bias"} and "bias" not in p["conv1"]
  p18 = abstract_variables(ResNet(depth=18))["params"]
  assert set(p18["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert set(p18["layer2_0"]) >= {"downsample_conv", "downsample_bn"}


def test_forward_runs_bfloat16_compute_float32_params_and_zero_init():
  model = ResNet(depth=18, width=0.125, dtype=jnp.bfloat16, zero_init_residual=True)
  x = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
  v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(v))
  assert not v["params"]["layer1_0"]["bn2"]["scale"].any()
  assert v["params"]["layer1_0"]["bn1"]["scale"].all()
  out, _ = jax.jit(lambda v, x: model.apply(v, normalize_images(x), train=True,
                                            mutable=["batch_stats"]))(v, x)
  assert out["stage4"].dtype == jnp.bfloat16 and out["stage4"].shape == (2, 1, 1, 64)
  assert bool(jnp.isfinite(out["stage4"].astype(jnp.float32)).all())
  assert not ResNet(depth=18).zero_init_residual                 # torchvision default: off


def test_clear_errors():
  x = jnp.zeros((1, 48, 48, 3))
  with pytest.raises(ValueError, match="multiples of 32"):
    ResNet(depth=18).init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="Unsupported ResNet depth 42"):
    ResNet(depth=42).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def test_normalize_images():
  x = jnp.broadcast_to(jnp.asarray([0.485, 0.456, 0.406]), (1, 2, 2, 3))
  np.testing.assert_allclose(normalize_images(x), 0.0, atol=1e-7)
  np.testing.assert_allclose(normalize_images(jnp.ones((3,))),
                             (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225],
                             rtol=1e-6)


def test_mlp_batch_norm_spans_all_leading_dims():
  mlp = heads.MLP(hidden_dim=8, output_dim=3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 4)), jnp.float32)
  v = mlp.init(jax.random.key(0), x[0], train=False)
  y, _ = mlp.apply(v, x, train=True, mutable=["batch_stats"])
  y_flat, _ = mlp.apply(v, x.reshape(10, 4), train=True, mutable=["batch_stats"])
  assert y.shape == (2, 5, 3)
  np.testing.assert_allclose(y.reshape(10, 3), y_flat, atol=1e-6)


def test_mask_pool_known_answers():
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)    # 2x2 grid, 8x8 px
  ids = np.zeros((2, 8, 8), np.int32)
  ids[:, :4, 4:] = 5                          # image 0 and 1: id 5 fills grid cell (0, 1)
  ids[1, 6:, :4] = 7                          # image 1: id 7 covers half of cell (1, 0)
  mask_ids = jnp.asarray([[5, 9, 0], [7, 5, 0]], jnp.int32)           # 9: absent
  pooled, area = heads.mask_pool(feats, jnp.asarray(ids), mask_ids)
  np.testing.assert_allclose(pooled[0, 0], feats[0, 0, 1], atol=1e-6)
  np.testing.assert_allclose(pooled[1, 0], feats[1, 1, 0], atol=1e-6)   # only one cell
  np.testing.assert_allclose(pooled[1, 1], feats[1, 0, 1], atol=1e-6)
  np.testing.assert_allclose(pooled[0, 1], 0.0)
  np.testing.assert_allclose(area, [[0.25, 0.0, 0.75], [0.125, 0.25, 0.625]])
  # Id 0 in image 1: cells (0,0) and (1,1) full, (1,0) half -> weights 1, 1, 0.5.
  expect = (feats[1, 0, 0] + feats[1, 1, 1] + 0.5 * feats[1, 1, 0]) / 2.5
  np.testing.assert_allclose(pooled[1, 2], expect, atol=1e-6)
  # Whole-image id = global mean pool; absent ids give zero gradient, not NaN.
  full = heads.mask_pool(feats, jnp.zeros((2, 8, 8), jnp.int32), jnp.zeros((2, 1), jnp.int32))[0]
  np.testing.assert_allclose(full[:, 0], heads.global_pool(feats), atol=1e-6)
  grad = jax.grad(lambda f: heads.mask_pool(f, jnp.asarray(ids), mask_ids)[0][0, 1].sum())(feats)
  assert bool(jnp.isfinite(grad).all()) and not grad.any()


def test_mask_pool_rejects_grid_mismatch():
  with pytest.raises(ValueError, match="multiple of the feature grid"):
    heads.mask_pool(jnp.zeros((1, 3, 3, 2)), jnp.zeros((1, 8, 8), jnp.int32),
                    jnp.zeros((1, 1), jnp.int32))
