"""Trainer mechanics on the tiny objective: exact resume, SIGTERM, NaN, EMA."""

import jax
import numpy as np
import pytest

from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from detcon_jax.core import state as state_lib
from harness import TinyObjective, sigterm_at, run, synthetic_batches, tiny_config


def test_preempted_and_resumed_run_matches_uninterrupted(tmp_path):
  """With an EMA target, so the whole state (params, stats, target, momentum) must resume."""
  config, ema = tiny_config(steps=8), True
  full = run(config, tmp_path / "full", ema=ema)
  # SIGTERM arrives while the input produces batch 6 (it runs up to 4 batches ahead).
  first = run(config, tmp_path / "cut", ema=ema, on_step=sigterm_at(6))
  assert first["status"] == "preempted" and 0 < first["step"] < 8
  resumed = run(config, tmp_path / "cut", ema=ema)
  assert resumed["start_step"] == first["step"] and resumed["step"] == 8
  for s, loss in {**first["losses"], **resumed["losses"]}.items():
    assert loss == full["losses"][s], (s, loss, full["losses"][s])
  assert sorted({**first["losses"], **resumed["losses"]}) == list(range(8))
  # Rerunning a finished workdir does nothing.
  again = run(config, tmp_path / "cut", ema=ema)
  assert again["start_step"] == 8 and again["losses"] == {}


def test_nan_loss_stops_without_a_nan_checkpoint(tmp_path):
  config = tiny_config(steps=8)   # checkpoints every 2 steps
  with pytest.raises(loop.NonFiniteLossError, match="step 3"):
    run(config, tmp_path, nan_at=3)
  manager = checkpointing.make_manager(str(tmp_path), keep=10)
  assert manager.all_steps() == [2]
  restored = manager.restore(2)
  assert checkpointing.all_finite(restored["params"])


def test_ema_target_follows_the_tau_schedule(tmp_path):
  """After one step: target = tau0 * init + (1 - tau0) * new params."""
  config = tiny_config(steps=10)
  config.ema.tau0 = 0.9
  objective = TinyObjective(ema=True)
  batch = next(synthetic_batches()(config, 0, 0, 1))
  tx, schedule = state_lib.make_optimizer(objective, config)
  ts0 = loop.init_train_state(objective, tx, config, jax.random.PRNGKey(0), batch)
  step = jax.jit(loop.make_train_step(objective, tx, schedule, config, jax.random.PRNGKey(1)))
  ts1, metrics = step(ts0, batch)
  np.testing.assert_allclose(metrics["tau"], 0.9, rtol=1e-6)
  want = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, ts0["state"]["target"], ts1["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               ts1["state"]["target"], want)
  assert int(ts1["step"]) == 1


def test_config_is_stored_and_reloaded(tmp_path):
  config = tiny_config()
  checkpointing.save_config(str(tmp_path), config)
  back = checkpointing.load_config(str(tmp_path))
  assert back.optimizer.base_lr == config.optimizer.base_lr and back.method == "tiny"
  with pytest.raises(FileNotFoundError, match="training workdir"):
    checkpointing.load_config(str(tmp_path / "nope"))


def test_resuming_with_a_different_model_fails_clearly(tmp_path):
  config = tiny_config()
  checkpointing.save_config(str(tmp_path), config)
  stored = checkpointing.load_config(str(tmp_path))
  loop.check_resumable(config, stored, str(tmp_path))          # same shapes: fine
  config.steps = 100                                           # longer: fine
  loop.check_resumable(config, stored, str(tmp_path))
  config.model.width = 0.5
  with pytest.raises(loop.ConfigError, match="config.model.*new --workdir"):
    loop.check_resumable(config, stored, str(tmp_path))
