"""8 fake CPU devices vs 1 device: same loss and same update for one global batch.

jax fixes its device count at import, so the 8-device side runs in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8; this process keeps
its default single CPU device.
"""

import numpy as np

from data_pipelines import batch as B
from detcon_jax.core import sharding
from harness import TinyObjective, assert_same_update, run_on_devices, one_step, tiny_config


def tiny_one_step(out_path):
  config = tiny_config(batch_size=16)
  config.optimizer.warmup_steps = 0   # a non-zero learning rate at step 0
  one_step(TinyObjective(ema=True), config, out_path)


def test_tiny_objective_8_devices_equal_1_device(tmp_path):
  out1, out8 = str(tmp_path / "one.npz"), str(tmp_path / "eight.npz")
  tiny_one_step(out1)
  eight = run_on_devices(f"import test_train_sharding as t; t.tiny_one_step({out8!r})", out8)
  assert_same_update(dict(np.load(out1)), eight, rtol=1e-5, atol=1e-7)


def test_multi_host_environment_detection():
  assert not sharding.is_multi_host_environment({})
  assert not sharding.is_multi_host_environment({"TPU_WORKER_HOSTNAMES": "localhost"})
  assert sharding.is_multi_host_environment({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
  assert sharding.is_multi_host_environment({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
  assert sharding.is_multi_host_environment({"SLURM_NTASKS": "4"})
  assert not sharding.is_multi_host_environment({"SLURM_NTASKS": "1"})


def test_host_batch_becomes_global_sharded_array():
  mesh = sharding.make_mesh()
  host = B.synthetic_train_batch(4, 32, 4)
  out = sharding.host_batch_to_global(host, mesh)
  assert out[B.VIEW1].shape == (4, 32, 32, 3)
  assert out[B.VIEW1].sharding.spec == sharding.batch_sharded(mesh).spec
  np.testing.assert_array_equal(np.asarray(out[B.MASKS1]), host[B.MASKS1])
