"""config.method -> Objective. The trainer's only entry point into the methods.

An Objective (common.Objective) has:
  init(rng, config, batch) -> (params, state)
  loss(params, state, batch, rng, step, config) -> (loss, (metrics, new_state))
`batch` uses the names of data_pipelines/batch.py (a global batch under jit);
`metrics` is a dict of scalars including 'loss'; `new_state` carries updated
batch statistics and must replace `state` after the step.

Layout, the same for every method:
  params = {'encoder': ..., 'projector': ...[, 'predictor': ...]}   (trainable)
  state  = {'batch_stats': {same keys as params}[, 'target': {'encoder', 'projector'}]}
state['target'] exists for bootstrap methods (byol, detcon_b) only: the EMA
copy of params['encoder'] and params['projector'], with the same tree
structure as those entries of params. After each optimizer step the trainer
calls `update_target(params, state, decay)` (a no-op without a target).

Config keys read: method, model.{depth, width, dtype, zero_init_residual},
head.{hidden_dim, output_dim}, loss.{temperature, local_negatives,
num_masks, num_shards (optional; default jax.device_count())}.
"""
from __future__ import annotations

import jax

from detcon_jax.objectives import byol, common, detcon, simclr

OBJECTIVES = {
    "simclr": simclr.OBJECTIVE,
    "byol": byol.OBJECTIVE,
    "detcon_s": detcon.DETCON_S,
    "detcon_b": detcon.DETCON_B,
}


def get_objective(name: str) -> common.Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown method {name!r} (config.method); known methods: "
                     f"{', '.join(sorted(OBJECTIVES))}.")
  return OBJECTIVES[name]


def encoder_variables(params, state) -> dict:
  """The backbone alone, {'params', 'batch_stats'}, for ResNet.apply (evaluation, export).

  Build the module with detcon_jax.models.resnet.encoder_from_config(config).
  """
  return {"params": params[common.ENCODER],
          "batch_stats": state[common.BATCH_STATS][common.ENCODER]}


def update_target(params, state, decay):
  """EMA of the target: target <- decay * target + (1 - decay) * online (BYOL's xi update)."""
  if common.TARGET not in state:
    return state
  target = state[common.TARGET]
  online = {k: params[k] for k in target}
  new = jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)
  return dict(state, **{common.TARGET: new})
