"""config.method -> Objective. The trainer's only entry point into the methods.

An Objective (common.Objective) is one record:
  init(rng, config, batch) -> (params, state)
  loss(params, state, batch, rng, step, config) -> (loss, (metrics, new_state))
  after_update(params, state, step, config) -> (params, state)
      after the optimiser step: EMA targets, momentum encoders, queues,
      prototype renormalisation
  param_labels(params, config) -> labels for the optimiser (core/optimizer.py:
      'default', 'no_decay', 'frozen', 'hold:N')
  views(config) -> tuple of data_pipelines.views.ViewSpec the input must produce
  default_config() -> {section: {key: value}}: the config sections the method adds
  validate(config) -> None, raising detcon_jax.errors.ConfigError
`batch` uses the names of data_pipelines/batch.py (a global batch under jit);
`metrics` is a dict of scalars including 'loss'; `new_state` replaces `state`
before after_update. params = {'encoder', 'projector', ...}; state =
{'batch_stats', ...} (see common.py for the layout).
"""
from __future__ import annotations

from detcon_jax.errors import ConfigError
from detcon_jax.objectives import (byol, cast, common, detcon, maskco, moco, simclr, supervised,
                                   swav)

OBJECTIVES = {
    "simclr": simclr.OBJECTIVE,
    "byol": byol.OBJECTIVE,
    "detcon_s": detcon.DETCON_S,
    "detcon_b": detcon.DETCON_B,
    "moco_v2": moco.OBJECTIVE,
    "swav": swav.OBJECTIVE,
    "cast": cast.OBJECTIVE,
    "maskco": maskco.OBJECTIVE,
    "supervised": supervised.OBJECTIVE,
}


def get_objective(name: str) -> common.Objective:
  if name not in OBJECTIVES:   # a user's --config.method (or a run's config.json)
    raise ConfigError(f"config.method={name!r}: unknown method; choose one of "
                      f"{sorted(OBJECTIVES)} (--config=configs/<method>.py:<preset>).")
  return OBJECTIVES[name]


def encoder_variables(params, state) -> dict:
  """The backbone alone, {'params', 'batch_stats'}, for ResNet.apply (evaluation, export).

  Build the module with detcon_jax.models.resnet.encoder_from_config(config).
  """
  return {"params": params[common.ENCODER],
          "batch_stats": state[common.BATCH_STATS][common.ENCODER]}
