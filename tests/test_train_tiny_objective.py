"""A tiny objective and synthetic data for fast trainer tests (test-only code).

The model is small but has what matters to the trainer: conv kernels (trust
ratio, weight decay), 1-D params (excluded), batch norm with running stats in
`state`, negatives over the global batch (so sharding is exercised), and an
optional EMA target. Also imported by the other tests/test_train_*.py files
and by the 8-device subprocess.
"""
from __future__ import annotations

import flax.linen as nn
import ml_collections
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from data_pipelines import batch as B
from data_pipelines import views as views_lib
from detcon_jax.objectives import common as objectives_common
from detcon_jax.train import loop


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(4)(x)


def _nt_xent(z1, z2, temperature=0.5):
  z = jnp.concatenate([z1, z2]) / jnp.linalg.norm(jnp.concatenate([z1, z2]), axis=1,
                                                  keepdims=True)
  n = z1.shape[0]
  logits = z @ z.T / temperature - 1e9 * jnp.eye(2 * n)
  labels = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


class TinyObjective:
  """NT-Xent between the two views; `ema=True` adds an EMA target, laid out as
  objectives/registry.py says (state['target'] mirrors params)."""

  def __init__(self, ema: bool = False):
    self.net = _Net()
    self.ema = ema

  def init(self, rng, config, batch):
    variables = self.net.init(rng, batch[B.VIEW1], train=False)
    state = {"batch_stats": variables["batch_stats"]}
    if self.ema:
      state["target"] = jax.tree.map(jnp.copy, variables["params"])
    return variables["params"], state

  def loss(self, params, state, batch, rng, step, config):
    views = jnp.concatenate([batch[B.VIEW1], batch[B.VIEW2]])
    noise = 0.01 * jax.random.normal(rng, views.shape)   # uses the per-step rng
    z, updates = self.net.apply({"params": params, "batch_stats": state["batch_stats"]},
                                views + noise, train=True, mutable=["batch_stats"])
    z1, z2 = jnp.split(z, 2)
    loss = _nt_xent(z1, z2)
    new_state = dict(state, batch_stats=updates["batch_stats"])
    metrics = {"z_norm": jnp.linalg.norm(z, axis=1).mean()}
    if self.ema:
      metrics["tau"] = objectives_common.ema_decay(step, config.ema.tau0, config.steps)
    return loss, (metrics, new_state)

  def after_update(self, params, state, step, config):
    """The EMA target update of the bootstrap framework (objectives/byol.py)."""
    if not self.ema:
      return params, state
    tau = objectives_common.ema_decay(step, config.ema.tau0, config.steps)
    return params, dict(state, target=objectives_common.ema(state["target"], params, tau))

  def param_labels(self, params, config):
    return objectives_common.default_labels(params, config)

  def views(self, config):
    return views_lib.standard_views(config, masks=True)

  def default_config(self):
    return {}

  def validate(self, config):
    del config


def tiny_config(**overrides):
  c = common.demo_config("tiny", "simclr")
  c.ema = ml_collections.ConfigDict(dict(tau0=0.99))   # TinyObjective(ema=True)'s decay
  c.update(steps=6, batch_size=8, image_size=32, log_every_steps=2)
  c.optimizer.update(warmup_steps=1, base_lr=1.0)
  c.checkpoint.update(every_steps=2, keep=10)
  c.eval.at_end = False
  c.data.build_demo = False
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def synthetic_batches(nan_at=None, on_step=None):
  """BatchSource: a synthetic batch per step, deterministic in (seed, step)."""
  def source(config, start_step, host_index, host_count):
    step = start_step
    while True:
      if on_step is not None:
        on_step(step)
      b = B.synthetic_train_batch(config.batch_size, num_masks=config.loss.num_masks,
                                  seed=config.seed * 100_003 + step,
                                  specs=views_lib.standard_views(config, masks=True))
      per_host = config.batch_size // host_count
      b = {k: v[host_index * per_host:(host_index + 1) * per_host] for k, v in b.items()}
      if step == nan_at:
        b[B.VIEW1] = np.full_like(b[B.VIEW1], np.nan)
      yield b
      step += 1
  return source


def run(config, workdir, ema=False, **kw):
  return loop.train(config, str(workdir), objective=TinyObjective(ema), batches=synthetic_batches(**kw))


def test_tiny_run_trains_and_writes_outputs(tmp_path):
  summary = run(tiny_config(steps=8), tmp_path)
  assert summary["status"] == "done" and summary["step"] == 8
  assert sorted(summary["losses"]) == list(range(8))
  assert all(np.isfinite(v) for v in summary["losses"].values())
  assert (tmp_path / "config.json").exists()
  assert list((tmp_path / "tb").iterdir())
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4, 6, 8]
