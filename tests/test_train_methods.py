"""The trainer with the real objectives (tiny ResNet-18, 32 px, batch 8, synthetic data)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from data_pipelines import batch as B
from detcon_jax.train import checkpointing, loop
from test_train_sharding import _compare, _run_in_subprocess, one_step
from test_train_tiny_objective import synthetic_batches


def small_config(method, **kw):
  family = "byol" if method in ("byol", "detcon_b") else "simclr"
  c = common.demo_config(method, family)
  c.update(steps=3, batch_size=8, image_size=32, log_every_steps=1)
  c.model.width = 0.125
  c.head.update(hidden_dim=32, output_dim=16)
  c.loss.num_masks = 4
  c.optimizer.update(warmup_steps=1)
  c.checkpoint.every_steps = 0
  c.eval.at_end = False
  c.data.build_demo = False
  c.update(kw)
  return c


def test_detcon_b_trains_and_its_encoder_loads_back(tmp_path):
  config = small_config("detcon_b")
  summary = loop.train(config, str(tmp_path), batches=synthetic_batches())
  assert summary["status"] == "done" and len(summary["losses"]) == 3
  assert all(np.isfinite(v) for v in summary["losses"].values())
  loaded_config, model, variables = checkpointing.load_encoder(str(tmp_path))
  assert loaded_config.method == "detcon_b" and loaded_config.model.width == 0.125
  images = jnp.zeros((2, 32, 32, 3))
  out = model.apply(variables, images, train=False)
  assert not loaded_config.model.stem_pool and not model.stem_pool   # the demo's stride 16
  assert out["stage4"].shape[:3] == (2, 2, 2)


def real_one_step(method, out_path):
  config = small_config(method)
  config.optimizer.warmup_steps = 0
  from detcon_jax.objectives import registry
  one_step(registry.get_objective(method), config, out_path)


@pytest.mark.parametrize("method", ["detcon_b", pytest.param("detcon_s", marks=pytest.mark.slow)])
def test_real_objective_8_devices_equal_1_device(tmp_path, method):
  """Batch norm and negatives over the global batch: 8 shards must not change anything."""
  out1, out8 = str(tmp_path / "one.npz"), str(tmp_path / "eight.npz")
  real_one_step(method, out1)
  eight = _run_in_subprocess(
      f"import test_train_methods as m; m.real_one_step({method!r}, {out8!r})", out8)
  _compare(dict(np.load(out1)), eight, rtol=2e-4, atol=1e-6)
