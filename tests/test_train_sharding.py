"""8 fake CPU devices vs 1 device: same loss and same update for one global batch.

jax fixes its device count at import, so the 8-device side runs in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8; this process keeps
its default single CPU device.
"""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines import batch as B
from detcon_jax.core import checkpointing, sharding
from detcon_jax.train import loop
from detcon_jax.core import state as state_lib

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def one_step(objective, config, out_path: str) -> None:
  """Init, one sharded train step, then save loss + params (before and after)."""
  mesh = sharding.make_mesh()
  host = B.synthetic_train_batch(config.batch_size, num_masks=config.loss.num_masks, seed=7,
                                 specs=objective.views(config))
  batch = sharding.host_batch_to_global(host, mesh)
  tx, schedule = state_lib.make_optimizer(objective, config)
  rep = sharding.replicated(mesh)
  init = jax.jit(lambda r, b: loop.init_train_state(objective, tx, config, r, b),
                 out_shardings=rep)
  ts = init(jax.random.PRNGKey(0), batch)
  before = checkpointing.to_host(ts["params"])
  step = jax.jit(loop.make_train_step(objective, tx, schedule, config, jax.random.PRNGKey(1)),
                 in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=(rep, rep))
  ts, metrics = step(ts, batch)
  after = checkpointing.to_host(ts["params"])
  flat = {f"update/{jax.tree_util.keystr(k)}": a - b for (k, a), b in
          zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before))}
  np.savez(out_path, loss=np.asarray(checkpointing.to_host(metrics["loss"])),
           devices=jax.device_count(), **flat)


def _run_in_subprocess(snippet: str, out: str, devices: int = 8) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
  code = f"import test_train_sharding as t\n{snippet}\n"
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out))


def _compare(one: dict, eight: dict, rtol: float, atol: float) -> None:
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=rtol)
  keys = [k for k in one if k.startswith("update/")]
  assert keys and sorted(keys) == sorted(k for k in eight if k.startswith("update/"))
  for k in keys:
    scale = np.abs(one[k]).max()
    assert scale > 0, k   # the step moved every parameter
    # Reduction order differs across shards: compare relative to the leaf's update size.
    np.testing.assert_allclose(eight[k], one[k], rtol=rtol, atol=max(atol, rtol * scale),
                               err_msg=k)


def tiny_one_step(out_path):
  from test_train_tiny_objective import TinyObjective, tiny_config
  config = tiny_config(batch_size=16)
  config.optimizer.warmup_steps = 0   # a non-zero learning rate at step 0
  one_step(TinyObjective(ema=True), config, out_path)


def test_tiny_objective_8_devices_equal_1_device(tmp_path):
  out1, out8 = str(tmp_path / "one.npz"), str(tmp_path / "eight.npz")
  tiny_one_step(out1)
  eight = _run_in_subprocess(f"t.tiny_one_step({out8!r})", out8)
  _compare(dict(np.load(out1)), eight, rtol=1e-5, atol=1e-7)


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
