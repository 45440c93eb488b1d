"""LARS, learning-rate schedules and the EMA decay schedule.

LARS is built from optax pieces in the order of the BYOL/DetCon reference:
weight decay -> trust ratio -> momentum -> learning rate. optax.lars scales by
the learning rate *before* the momentum trace, so there the momentum buffer
holds lr-scaled updates and a schedule change (warmup, a piecewise drop) leaks
into the next steps through the buffer; here the buffer holds unscaled updates
and the current learning rate multiplies it.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]

# COCO pretraining (DetCon A.3): constant, then x0.1 at 96% and again at 98%.
PIECEWISE_DROPS = ((0.96, 0.1), (0.98, 0.1))


def scaled_lr(base_lr: float, batch_size: int) -> float:
  """Linear scaling rule: base_lr is the learning rate for a batch of 256."""
  return base_lr * batch_size / 256


def _warmup_cosine(peak: float, warmup_steps: int, steps: int) -> Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=steps, end_value=0.0)


def _warmup_piecewise(peak: float, warmup_steps: int, steps: int) -> Schedule:
  # join_schedules hands the second schedule (step - warmup_steps).
  boundaries = {int(frac * steps) - warmup_steps: scale for frac, scale in PIECEWISE_DROPS}
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup_steps),
       optax.piecewise_constant_schedule(peak, boundaries)],
      [warmup_steps])


LR_SCHEDULES = {"cosine": _warmup_cosine, "piecewise": _warmup_piecewise}


def learning_rate_schedule(opt_config, batch_size: int, steps: int) -> Schedule:
  """config.optimizer -> step -> learning rate (peak = base_lr * batch/256)."""
  make = LR_SCHEDULES[opt_config.schedule]
  return make(scaled_lr(opt_config.base_lr, batch_size), opt_config.warmup_steps, steps)


def ema_decay(step, tau0: float, steps: int):
  """BYOL target decay: tau0 at step 0, annealed to 1 at `steps` by a cosine.

  The update itself is objectives.registry.update_target (it knows the layout).
  """
  cos = jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / steps)
  return 1.0 - (1.0 - tau0) * (cos + 1.0) / 2.0


def exclude_1d(params):
  """Mask: True for leaves that get weight decay and the trust ratio.

  Biases and batch-norm scales/offsets (every leaf with ndim <= 1) are excluded,
  as in SimCLR/BYOL.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def lars(learning_rate: Schedule | float, weight_decay: float, momentum: float = 0.9,
         eta: float = 1e-3) -> optax.GradientTransformation:
  """LARS with momentum applied before the learning-rate scale (see module doc)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=exclude_1d),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta), exclude_1d),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def make_optimizer(config) -> tuple[optax.GradientTransformation, Schedule]:
  """config -> (LARS transformation, learning-rate schedule) for logging."""
  schedule = learning_rate_schedule(config.optimizer, config.batch_size, config.steps)
  opt = lars(schedule, config.optimizer.weight_decay, config.optimizer.momentum,
             config.optimizer.eta)
  return opt, schedule


def momentum_buffer(opt_state):
  """The trace (momentum) buffer inside a `lars` state, for tests and debugging."""
  return opt_state[2].trace


__all__ = ["lars", "make_optimizer", "learning_rate_schedule", "ema_decay",
           "exclude_1d", "scaled_lr", "LR_SCHEDULES", "PIECEWISE_DROPS", "momentum_buffer"]
