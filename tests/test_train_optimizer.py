"""Known answers for LARS, the learning-rate schedules and the EMA decay."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from detcon_jax.core import optimizer as opt_lib
from detcon_jax.objectives import common as objectives_common


def _opt_config(schedule="cosine", base_lr=0.3, warmup=10):
  return ml_collections.ConfigDict(dict(base_lr=base_lr, weight_decay=1e-6, momentum=0.9,
                                        eta=1e-3, warmup_steps=warmup, schedule=schedule))


def test_cosine_schedule_known_values():
  # peak = 0.3 * 512 / 256 = 0.6; warmup 10 of 110 steps, cosine over 100.
  f = opt_lib.learning_rate_schedule(_opt_config(), batch_size=512, steps=110)
  np.testing.assert_allclose(f(0), 0.0)
  np.testing.assert_allclose(f(5), 0.3, rtol=1e-6)
  np.testing.assert_allclose(f(10), 0.6, rtol=1e-6)
  np.testing.assert_allclose(f(60), 0.3, rtol=1e-5)                 # half way: cos = 0
  np.testing.assert_allclose(f(35), 0.6 * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-5)
  np.testing.assert_allclose(f(110), 0.0, atol=1e-7)


@pytest.mark.parametrize("schedule", ["cosine", "piecewise"])
def test_no_warmup_starts_at_peak(schedule):
  f = opt_lib.learning_rate_schedule(_opt_config(schedule, warmup=0), batch_size=256, steps=100)
  np.testing.assert_allclose(f(0), 0.3, rtol=1e-6)


def test_piecewise_schedule_drops_at_96_and_98_percent():
  f = opt_lib.learning_rate_schedule(_opt_config("piecewise", base_lr=0.256), batch_size=1000,
                                     steps=1000)
  peak = 0.256 * 1000 / 256   # = 1.0
  np.testing.assert_allclose(f(5), 0.5 * peak, rtol=1e-6)
  for step, want in [(10, peak), (500, peak), (959, peak), (960, 0.1 * peak),
                     (979, 0.1 * peak), (980, 0.01 * peak), (999, 0.01 * peak)]:
    np.testing.assert_allclose(f(step), want, rtol=1e-5, err_msg=f"step {step}")


def test_ema_decay_known_values():
  np.testing.assert_allclose(objectives_common.ema_decay(0, 0.99, 100), 0.99, rtol=1e-7)
  np.testing.assert_allclose(objectives_common.ema_decay(50, 0.99, 100), 0.995, rtol=1e-7)
  np.testing.assert_allclose(objectives_common.ema_decay(100, 0.996, 100), 1.0, rtol=1e-7)
  np.testing.assert_allclose(objectives_common.ema_decay(25, 0.9, 100),
                             1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2, rtol=1e-6)


def _params():
  return {"conv": {"kernel": jnp.full((3, 3, 2, 4), 0.5)},
          "bn": {"scale": jnp.full((4,), 2.0), "bias": jnp.full((4,), 1.0)},
          "dense": {"kernel": jnp.full((4, 2), -1.0), "bias": jnp.zeros((2,))}}


def test_masks_exclude_1d_params():
  mask = opt_lib.exclude_1d(_params())
  assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                  "dense": {"kernel": True, "bias": False}}


def test_lars_single_step_known_answer():
  """1-D leaves: plain SGD on the gradient; n-D: wd then trust ratio, then lr."""
  params, lr, wd, eta = _params(), 0.5, 0.1, 1e-3
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.2), params)
  tx = opt_lib.lars(lr, wd, momentum=0.9, eta=eta)
  updates, _ = tx.update(grads, tx.init(params), params)
  # 1-D: no weight decay, no trust ratio.
  np.testing.assert_allclose(updates["bn"]["scale"], -lr * 0.2, rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], -lr * 0.2, rtol=1e-6)
  # n-D: u = g + wd p; u *= eta |p| / |u|; update = -lr u.
  for path in [("conv", "kernel"), ("dense", "kernel")]:
    p, g = params[path[0]][path[1]], grads[path[0]][path[1]]
    u = g + wd * p
    u = u * eta * jnp.linalg.norm(p) / jnp.linalg.norm(u)
    np.testing.assert_allclose(updates[path[0]][path[1]], -lr * u, rtol=1e-5)


def test_momentum_is_applied_before_learning_rate():
  """With lr changing every step, the buffer is the momentum-sum of unscaled updates."""
  lrs = [0.1, 1.0, 0.01, 3.0]
  params = {"b": jnp.zeros((3,))}   # 1-D: the per-step update is the raw gradient
  grads = [{"b": jnp.full((3,), float(i + 1))} for i in range(len(lrs))]
  tx = opt_lib.lars(lambda count: jnp.asarray(lrs)[count], 0.0, momentum=0.9)
  state = tx.init(params)
  mu = np.zeros(3)
  for i, g in enumerate(grads):
    updates, state = tx.update(g, state, params)
    mu = 0.9 * mu + np.asarray(g["b"])
    np.testing.assert_allclose(opt_lib.momentum_buffer(state)["b"], mu, rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -lrs[i] * mu, rtol=1e-6)
  # optax.lars scales first, so its buffer would hold sum(0.9^k lr_k g_k) instead.
  ref = optax.lars(lambda count: jnp.asarray(lrs)[count], momentum=0.9)
  rstate = ref.init(params)
  for g in grads:
    _, rstate = ref.update(g, rstate, params)
  assert not np.allclose(rstate[-1].trace["b"], mu)


def test_unknown_schedule_is_a_key_error():
  with pytest.raises(KeyError):
    opt_lib.learning_rate_schedule(_opt_config("linear"), 256, 100)


# --- The optimiser registry and parameter labels -------------------------------------

def _run_config(name, **opt):
  c = ml_collections.ConfigDict(dict(batch_size=256, steps=100, optimizer=dict(
      _opt_config(warmup=0).to_dict(), name=name, exclude_1d=True, **opt)))
  return c


def test_sgd_is_pytorch_sgd():
  """d = g + wd p; buf = m buf + d; p -= lr buf, over three steps, every leaf decayed."""
  params, lr, wd = {"w": jnp.asarray([1.0, -2.0]), "k": jnp.ones((2, 2))}, 0.1, 0.01
  tx = opt_lib.sgd(lr, wd, momentum=0.9)
  state, buf = tx.init(params), None
  for i in range(3):
    g = jax.tree.map(lambda x: jnp.full_like(x, 0.5 * (i + 1)), params)
    updates, state = tx.update(g, state, params)
    d = jax.tree.map(lambda gi, pi: np.asarray(gi) + wd * np.asarray(pi), g, params)
    buf = d if buf is None else jax.tree.map(lambda b, di: 0.9 * b + di, buf, d)
    jax.tree.map(lambda u, b: np.testing.assert_allclose(u, -lr * b, rtol=1e-6), updates, buf)
    params = optax.apply_updates(params, updates)


def test_adamw_matches_optax():
  params = {"k": jnp.arange(6.0).reshape(2, 3)}
  grads = {"k": jnp.full((2, 3), 0.3)}
  mine, ref = opt_lib.adamw(1e-2, 0.05), optax.adamw(1e-2, weight_decay=0.05)
  u1, _ = mine.update(grads, mine.init(params), params)
  u2, _ = ref.update(grads, ref.init(params), params)
  np.testing.assert_allclose(u1["k"], u2["k"], rtol=1e-6)


def test_labels_frozen_no_decay_and_hold():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones((2, 2)),
            "d": jnp.ones((2, 2))}
  labels = {"a": "default", "b": "frozen", "c": "no_decay", "d": "hold:2"}
  config = _run_config("sgd", weight_decay=0.5)
  tx = opt_lib.make_optimizer(config, lambda p: labels)[0]
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)          # only weight decay moves anything
  moved = []
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    moved.append({k: bool(jnp.any(v != 0)) for k, v in updates.items()})
  assert [m["a"] for m in moved] == [True, True, True]
  assert [m["b"] for m in moved] == [False, False, False]
  assert [m["c"] for m in moved] == [False, False, False]
  assert [m["d"] for m in moved] == [False, False, True]      # held for 2 steps
  # After the hold: a fresh momentum buffer, and the schedule at the global step (2).
  schedule = opt_lib.make_optimizer(config, lambda p: labels)[1]
  np.testing.assert_allclose(updates["d"], -schedule(2) * 0.5 * params["d"], rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown optimiser label"):
    opt_lib.make_optimizer(config, lambda p: {k: "nope" for k in p})[0].init(params)
  with pytest.raises(ValueError, match="config.optimizer.name"):
    opt_lib.make_optimizer(_run_config("rmsprop"))
