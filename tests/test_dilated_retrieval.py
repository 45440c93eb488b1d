"""Retrieval at paper resolution: the dilated last stage is the a-trous form of the same
network (same variables; its map at even positions is the plain map), RN50 keeps output
stride 16, and evaluation takes spatial maps from it while pooled features stay plain."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import batch as B
from detcon_jax.evaluate import features as F
from detcon_jax.evaluate import run
from detcon_jax.models.resnet import ResNet


def _perturbed(model, x):
  v = model.init(jax.random.key(1), x, train=False)     # batch-norm statistics made non-trivial
  return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), v)


def test_rn50_dilated_keeps_output_stride_16():
  model = ResNet(depth=50, dilate_last=True)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: ResNet(depth=50).init(jax.random.key(0), x, train=False),
                             x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  assert out["stage4"].shape == (1, 14, 14, 2048)                 # 224 / 16, same variables


@pytest.mark.parametrize("depth,stem_pool", [
    (18, False), pytest.param(50, True, marks=pytest.mark.slow)])
def test_dilated_last_stage_is_the_a_trous_network(depth, stem_pool):
  model = ResNet(depth=depth, width=0.0625, stem_pool=stem_pool)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = _perturbed(model, x)
  plain = model.apply(variables, x, train=False)["stage4"]
  dilated = model.clone(dilate_last=True).apply(variables, x, train=False)["stage4"]
  stride = 32 if stem_pool else 16
  assert plain.shape[1:3] == (64 // stride,) * 2
  assert dilated.shape[1:3] == (128 // stride,) * 2              # RN50: output stride 16
  scale = float(jnp.abs(plain).max())
  np.testing.assert_allclose(dilated[:, ::2, ::2], plain, atol=1e-5 * scale)


def test_retrieval_is_dilated_by_default():
  """The default evaluation (and so the demo's, and tests/test_eval_run.py) runs dilated."""
  assert run.Settings().retrieval_dilated
  assert "dilated" in run.EVALUATIONS["retrieval"].describe(run.Settings(retrieval_resolution=8))


@pytest.mark.slow        # ~30 s under load; test_eval_run.py runs this path in the default suite
def test_evaluation_takes_spatial_maps_from_the_dilated_network():
  """Pooled features from the plain network, spatial maps from the dilated one: by the
  a-trous identity, the dilated map at even positions averages to the pooled feature."""
  model = ResNet(depth=18, width=0.0625, stem_pool=False)
  images = np.random.default_rng(0).random((3, 32, 32, 3), np.float32)
  variables = F.random_init_variables(model, 32)
  batches = [{B.IMAGE: images, B.LABEL: np.zeros(3, np.int32)}]
  dense, _ = F.extract_features(model, {"m": variables}, batches,
                                dense_model=model.clone(dilate_last=True))
  spatial, pooled = dense["m"][F.SPATIAL], dense["m"][F.POOLED]
  assert spatial.shape == (3, 4, 4, 32) and pooled.shape == (3, 32)     # plain map: 2 x 2
  np.testing.assert_allclose(spatial[:, ::2, ::2].mean(axis=(1, 2)), pooled, rtol=1e-4,
                             atol=1e-5)
