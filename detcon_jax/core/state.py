"""The train state and the jit-able train step (method-agnostic).

The train state is one plain pytree {'step', 'params', 'state', 'opt_state'}:
what checkpoints hold and what the step maps to its successor. The step is
loss -> grads -> optimiser -> the objective's after_update (EMA targets,
momentum encoders, queues, prototypes) -> metrics; nothing in it knows a
method.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from detcon_jax.core import optimizer as opt_lib


def make_optimizer(objective, config):
  """(transformation, schedule) with the objective's parameter labels."""
  return opt_lib.make_optimizer(config, lambda params: objective.param_labels(params, config))


def init_train_state(objective, tx, config, rng, batch) -> dict:
  """The whole train state as one plain pytree (what checkpoints hold)."""
  params, state = objective.init(rng, config, batch)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "state": state,
          "opt_state": tx.init(params)}


def make_train_step(objective, tx, schedule, config, train_rng):
  """(train state, global batch) -> (train state, metrics); the rng is fold_in(train_rng, step)."""
  def train_step(ts, batch):
    step = ts["step"]
    rng = jax.random.fold_in(train_rng, step)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, (metrics, state)), grads = grad_fn(ts["params"], ts["state"], batch, rng, step,
                                              config)
    updates, opt_state = tx.update(grads, ts["opt_state"], ts["params"])
    params = optax.apply_updates(ts["params"], updates)
    params, state = objective.after_update(params, state, step, config)
    metrics = dict(metrics, loss=loss, lr=schedule(step))
    return {"step": step + 1, "params": params, "state": state, "opt_state": opt_state}, metrics
  return train_step
