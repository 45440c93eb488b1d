"""Optimisers (LARS, SGD with momentum, AdamW), learning-rate schedules, the EMA decay schedule.

Each optimiser is a chain of optax pieces, registered in OPTIMIZERS by
config.optimizer.name; objectives label their parameters (LABELS) to exclude
them from weight decay, freeze them, or hold them still for a number of steps.

LARS is built from optax pieces in the order of the BYOL/DetCon reference:
weight decay -> trust ratio -> momentum -> learning rate. optax.lars scales by
the learning rate *before* the momentum trace, so there the momentum buffer
holds lr-scaled updates and a schedule change (warmup, a piecewise drop) leaks
into the next steps through the buffer; here the buffer holds unscaled updates
and the current learning rate multiplies it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

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


def warmup_steps(opt_config, steps: int) -> int:
  """config.optimizer.warmup_steps when set, else warmup_fraction of the run's steps
  (presets use the fraction, so that overriding config.steps alone keeps a valid run)."""
  if opt_config.get("warmup_steps") is not None:
    return int(opt_config.warmup_steps)
  return int(opt_config.get("warmup_fraction", 0.0) * steps + 1e-9)


def learning_rate_schedule(opt_config, batch_size: int, steps: int) -> Schedule:
  """config.optimizer -> step -> learning rate (peak = base_lr * batch/256)."""
  make = LR_SCHEDULES[opt_config.schedule]
  return make(scaled_lr(opt_config.base_lr, batch_size), warmup_steps(opt_config, steps), steps)


def exclude_1d(params):
  """Mask: True for leaves that get weight decay and the trust ratio.

  Biases and batch-norm scales/offsets (every leaf with ndim <= 1) are excluded,
  as in SimCLR/BYOL.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _everything(params):
  return jax.tree.map(lambda _: True, params)


def _nothing(params):
  return jax.tree.map(lambda _: False, params)


class _CountState(NamedTuple):
  count: jnp.ndarray


def _counting(fn) -> optax.GradientTransformation:
  """A stateless transform fn(updates, params, count) that also sees the step count."""
  def init(params):
    del params
    return _CountState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    return fn(updates, params, state.count), _CountState(state.count + 1)
  return optax.GradientTransformation(init, update)


def _zero_before(start: int) -> optax.GradientTransformation:
  """Gradients zeroed for the first `start` steps (SwAV's frozen prototypes)."""
  return _counting(lambda u, p, c: jax.tree.map(lambda g: g * (c >= start), u))


def _decayed_weights(weight_decay: float, start: int = 0) -> optax.GradientTransformation:
  """update + weight_decay * param, from step `start` on (before it: nothing moves)."""
  return _counting(lambda u, p, c: jax.tree.map(
      lambda g, w: g + jnp.where(c >= start, weight_decay, 0.0) * w, u, p))


def lars(learning_rate: Schedule | float, weight_decay: float, momentum: float = 0.9,
         eta: float = 1e-3, mask=exclude_1d, start: int = 0) -> optax.GradientTransformation:
  """LARS with momentum applied before the learning-rate scale (see module doc).

  mask: leaves that get weight decay and the trust ratio; start: steps during
  which the leaves are held still (zero gradient, no decay).
  """
  return optax.chain(
      _zero_before(start),
      optax.masked(_decayed_weights(weight_decay, start), mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta), mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate),
  )


def sgd(learning_rate: Schedule | float, weight_decay: float, momentum: float = 0.9,
        nesterov: bool = False, mask=_everything, start: int = 0) -> optax.GradientTransformation:
  """PyTorch's SGD (MoCo's): d = g + wd * p; buf = momentum * buf + d; p -= lr * buf."""
  return optax.chain(
      _zero_before(start),
      optax.masked(_decayed_weights(weight_decay, start), mask),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate),
  )


def adamw(learning_rate: Schedule | float, weight_decay: float, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, mask=_everything,
          start: int = 0) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, scaled by the learning rate as optax.adamw)."""
  return optax.chain(
      _zero_before(start),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.masked(_decayed_weights(weight_decay, start), mask),
      optax.scale_by_learning_rate(learning_rate),
  )


# config.optimizer.name -> (schedule, config.optimizer, decay mask, hold steps) -> transform
OPTIMIZERS = {
    "lars": lambda lr, oc, mask, start: lars(lr, oc.weight_decay, oc.momentum, oc.eta, mask,
                                             start),
    "sgd": lambda lr, oc, mask, start: sgd(lr, oc.weight_decay, oc.momentum,
                                           bool(oc.get("nesterov", False)), mask, start),
    "adamw": lambda lr, oc, mask, start: adamw(lr, oc.weight_decay, oc.get("b1", 0.9),
                                               oc.get("b2", 0.999), oc.get("eps", 1e-8), mask,
                                               start),
}
# Parameter labels an objective may give (objective.param_labels):
#   'default'  the optimiser's rules (decay and trust ratio on ndim > 1 leaves when
#              config.optimizer.exclude_1d, on every leaf otherwise)
#   'no_decay' no weight decay, no trust ratio
#   'frozen'   never updated
#   'hold:N'   'default', but held still (no gradient, no decay) for the first N steps
LABELS = ("default", "no_decay", "frozen", "hold:N")


def _transform_for(label: str, schedule, oc) -> optax.GradientTransformation:
  make = OPTIMIZERS[oc.name]
  default_mask = exclude_1d if oc.get("exclude_1d", True) else _everything
  if label == "default":
    return make(schedule, oc, default_mask, 0)
  if label == "no_decay":
    return make(schedule, oc, _nothing, 0)
  if label == "frozen":
    return optax.set_to_zero()
  if label.startswith("hold:") and label[5:].isdigit():
    return make(schedule, oc, default_mask, int(label[5:]))
  raise ValueError(f"Unknown optimiser label {label!r}; known: {LABELS}.")


def by_label(make_for_label, param_labels) -> optax.GradientTransformation:
  """optax.multi_transform whose label set is read from param_labels(tree) itself.

  The labels are a pure function of the tree's structure, so init and update
  build the same transforms.
  """
  def build(tree):
    labels = param_labels(tree)
    names = sorted(set(jax.tree.leaves(labels)))
    return optax.multi_transform({n: make_for_label(n) for n in names}, labels)

  def init(params):
    return build(params).init(params)

  def update(updates, state, params=None):
    return build(updates).update(updates, state, params)
  return optax.GradientTransformation(init, update)


def make_optimizer(config, param_labels=None) -> tuple[optax.GradientTransformation, Schedule]:
  """config -> (transformation, learning-rate schedule for logging).

  config.optimizer.name picks LARS (default), SGD or AdamW; param_labels(params)
  (an objective's labels, bound to its config) gives each leaf's label.
  """
  oc = config.optimizer
  name = oc.get("name", "lars")
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r} (config.optimizer.name); choose one of "
                     f"{sorted(OPTIMIZERS)}.")
  schedule = learning_rate_schedule(oc, config.batch_size, config.steps)
  labels = param_labels or (lambda p: jax.tree.map(lambda _: "default", p))
  oc = dict(oc.to_dict() if hasattr(oc, "to_dict") else oc, name=name)
  oc = _Options(oc)
  return by_label(lambda label: _transform_for(label, schedule, oc), labels), schedule


class _Options(dict):
  """config.optimizer as a plain mapping with attribute access (no ConfigDict in closures)."""
  __getattr__ = dict.__getitem__


def momentum_buffer(opt_state, label: str = "default"):
  """The momentum trace of one label's leaves inside a make_optimizer/lars state (tests)."""
  if isinstance(opt_state, optax.MultiTransformState):
    opt_state = opt_state.inner_states[label].inner_state
  traces = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
            if isinstance(s, optax.TraceState)]
  return traces[0].trace


__all__ = ["lars", "sgd", "adamw", "OPTIMIZERS", "LABELS", "make_optimizer",
           "learning_rate_schedule", "exclude_1d", "scaled_lr", "LR_SCHEDULES",
           "PIECEWISE_DROPS", "momentum_buffer", "by_label"]
