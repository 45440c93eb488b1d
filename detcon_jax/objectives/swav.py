"""SwAV (Caron et al. 2020): online clustering with swapped prediction.

Pure math first (sinkhorn, swapped_prediction), then the framework. One
network embeds every crop; projections are l2-normalised and scored against
prototypes (a linear layer without bias whose rows are renormalised to unit
length after every update, in after_update, and which stay frozen for the
first freeze_steps(config) steps, as the reference freezes them for the
first epoch). For each global crop, Sinkhorn-Knopp turns the
detached scores of the global batch (plus, optionally, a queue of earlier
embeddings scored by the current prototypes) into equipartitioned soft codes;
every other crop, small crops included, predicts those codes through a
softmax at temperature 0.1. Codes come from the global views only, as the
reference's crops_for_assign = [0, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from detcon_jax.errors import ConfigError
from data_pipelines import views as V
from detcon_jax.objectives import common
from detcon_jax.objectives import queue as queue_lib
from detcon_jax.objectives.contrastive import l2_normalize

PROTOTYPES, QUEUE, INCOMING = "prototypes", "queue", "incoming"


# --- Pure math -------------------------------------------------------------------

def sinkhorn(scores, *, epsilon: float, iterations: int, weights=None):
  """Soft codes [N, P] from scores [N, P] (SwAV's distributed_sinkhorn over a global batch).

  Q = exp(scores / epsilon), then alternately rows (prototypes) scaled to
  total mass 1/P and columns (samples) to 1/N, `iterations` times; each
  returned row (a sample's code) sums to 1. weights [N] in {0, 1} leave
  samples out (an unfilled queue): they get zero codes and N counts the rest.
  The global max is subtracted before exp (the normalisation cancels it).
  """
  scores = scores.astype(jnp.float32)
  w = jnp.ones(scores.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
  q = jnp.exp((scores - jnp.max(scores)) / epsilon).T * w[None, :]        # [P, N]
  q = q / jnp.sum(q)
  num_prototypes, num_samples = scores.shape[1], jnp.sum(w)
  tiny = jnp.finfo(jnp.float32).tiny
  for _ in range(iterations):
    q = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), tiny) / num_prototypes
    q = q / jnp.maximum(jnp.sum(q, axis=0, keepdims=True), tiny) / num_samples
  return (q * num_samples).T


def swapped_prediction(codes, scores, temperature: float):
  """Cross-entropy of a crop's softmax(scores / T) against another crop's codes, batch mean."""
  return -jnp.mean(jnp.sum(codes * jax.nn.log_softmax(scores / temperature, axis=-1), axis=-1))


def swav_loss(scores, num_assign: int, *, temperature: float, epsilon: float,
              iterations: int, queued=None, queue_weights=None):
  """SwAV's loss from per-crop scores (list of [N, P]; the first num_assign crops give codes).

  For each code crop i, Sinkhorn codes from its detached scores (after the
  queued scores queued[i] [Q, P], weighted by queue_weights [Q]); every other
  crop v predicts them: the sum over v != i of swapped_prediction, divided by
  (crops - 1); then the mean over code crops (main_swav.py's train()).
  Returns (loss, codes list).
  """
  value, all_codes = 0.0, []
  for i in range(num_assign):
    detached, weights = jax.lax.stop_gradient(scores[i]), None
    if queued is not None:
      detached = jnp.concatenate([jax.lax.stop_gradient(queued[i]), detached])
      weights = jnp.concatenate([queue_weights, jnp.ones(scores[i].shape[:1], jnp.float32)])
    codes = jax.lax.stop_gradient(sinkhorn(detached, epsilon=epsilon, iterations=iterations,
                                           weights=weights)[-scores[i].shape[0]:])
    all_codes.append(codes)
    value += sum(swapped_prediction(codes, scores[v], temperature)
                 for v in range(len(scores)) if v != i) / (len(scores) - 1)
  return value / num_assign, all_codes


def _normalized_entropy(probs):
  """Mean entropy of rows [N, P] over log P: 0 = one-hot, 1 = uniform."""
  ent = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-12)), axis=-1)
  return jnp.mean(ent) / jnp.log(probs.shape[-1])


def _mean_similarity(z):
  """Mean cosine between different rows of unit vectors z [N, D] (1 = one embedding for all)."""
  n = z.shape[0]
  return (jnp.sum(z @ z.T) - jnp.sum(z * z)) / (n * (n - 1))


def view_agreement(z1, z2):
  """How well one view's embedding picks out its own image's other view, 0.5 = not at all.

  z1, z2 [N, D]: the two global views of the same N images. Each is centred over the
  batch (a direction every embedding shares says nothing about which image is which),
  then for every pair of images i != j: does z1[i] sit closer (cosine) to z2[i] than to
  z2[j]? Returns the fraction of pairs where it does: 1 = every image recognised, 0.5 =
  the two views of an image are no more alike than two images, where no prediction of
  the other view's codes can beat log P (docs/results.md, SwAV).
  """
  a = l2_normalize(z1 - jnp.mean(z1, axis=0))
  b = l2_normalize(z2 - jnp.mean(z2, axis=0))
  sim = a @ b.T
  n = sim.shape[0]
  wins = (jnp.diag(sim)[:, None] > sim).astype(jnp.float32)     # the diagonal adds 0
  return jnp.sum(wins) / (n * (n - 1))


def _prototypes_used(scores):
  """Fraction of prototypes that are some sample's nearest."""
  nearest = jax.nn.one_hot(jnp.argmax(scores, axis=-1), scores.shape[-1])
  return jnp.mean(jnp.max(nearest, axis=0))


# --- Framework ----------------------------------------------------------------------

def _queue_size(config) -> int:
  return int(config.swav.queue_size)


def init(rng, config, batch):
  specs = V.standard_views(config)
  common.check_views(batch, specs, config)
  net_rng, proto_rng = jax.random.split(rng)
  params, batch_stats = common.init_networks(common.build_networks(config, False), net_rng,
                                             batch[specs[0].name])
  dim, num = int(config.head.output_dim), int(config.swav.num_prototypes)
  params[PROTOTYPES] = l2_normalize(jax.random.normal(proto_rng, (num, dim), jnp.float32))
  state = {common.BATCH_STATS: batch_stats}
  if _queue_size(config):
    n_assign = len(V.global_views(specs))
    state[QUEUE] = queue_lib.create(_queue_size(config), (n_assign, dim))
    state[INCOMING] = jnp.zeros((batch[specs[0].name].shape[0], n_assign, dim), jnp.float32)
  return params, state


def loss(params, state, batch, rng, step, config):
  del rng
  nets = common.build_networks(config, False)
  specs = V.standard_views(config)
  out = common.forward(nets, params, state[common.BATCH_STATS], batch, specs)
  z = {n: l2_normalize(v) for n, v in out.z.items()}
  prototypes = params[PROTOTYPES]
  scores = {n: v @ prototypes.T for n, v in z.items()}
  assign = [s.name for s in V.global_views(specs)]
  names = assign + [s.name for s in specs if s.name not in assign]
  s = config.swav
  queued = queue_weights = use_queue = None
  if QUEUE in state:
    q = state[QUEUE]
    use_queue = (step >= int(s.queue_start_step)) & queue_lib.is_full(q)
    queued = [q["keys"][:, i] @ prototypes.T for i in range(len(assign))]
    queue_weights = jnp.full(q["keys"].shape[:1], use_queue, jnp.float32)
  value, codes = swav_loss([scores[n] for n in names], len(assign),
                           temperature=float(config.loss.temperature), epsilon=float(s.epsilon),
                           iterations=int(s.sinkhorn_iterations), queued=queued,
                           queue_weights=queue_weights)
  code_entropy = sum(_normalized_entropy(c) for c in codes) / len(codes)
  new_state = dict(state, **{common.BATCH_STATS: out.batch_stats})
  # Collapse diagnostics: 1.0 = uniform (the trivial fixed point, loss = log P); the
  # codes turn uniform when the batch's embeddings do not differ (embedding_similarity 1).
  # chance: log P, the loss of a uniform prediction against any codes (each sums to 1).
  metrics = {"loss": value, "chance": jnp.log(float(prototypes.shape[0])),
             "codes_entropy": code_entropy,
             "prediction_entropy": _normalized_entropy(
                 jax.nn.softmax(scores[assign[0]] / float(config.loss.temperature))),
             "prototypes_used": _prototypes_used(scores[assign[0]]),
             "embedding_similarity": _mean_similarity(z[assign[0]]),
             "view_agreement": view_agreement(z[assign[0]], z[assign[1]])}
  if QUEUE in state:
    new_state[INCOMING] = jax.lax.stop_gradient(jnp.stack([z[a] for a in assign], axis=1))
    metrics["queue_in_use"] = use_queue.astype(jnp.float32)
  return value, (metrics, new_state)


def after_update(params, state, step, config):
  """Prototype rows back to unit length; this step's embeddings into the queue."""
  params = dict(params, **{PROTOTYPES: l2_normalize(params[PROTOTYPES])})
  if QUEUE in state:
    enabled = step >= int(config.swav.queue_start_step)
    state = dict(state, **{QUEUE: queue_lib.push(state[QUEUE], state[INCOMING], enabled)})
  return params, state


def freeze_steps(config) -> int:
  """Steps the prototypes are held still: swav.freeze_prototypes_steps when set, else
  round(swav.freeze_prototypes_fraction x config.steps), which follows --config.steps (as
  the warmup: the paper presets' fraction is one epoch, the demo's the whole run)."""
  steps = config.swav.get("freeze_prototypes_steps", None)
  if steps is not None:
    return int(steps)
  fraction = float(config.swav.get("freeze_prototypes_fraction", 0.0))
  return int(round(fraction * int(config.steps)))


def param_labels(params, config):
  """Prototypes held still for the first freeze_steps(config) steps."""
  labels = common.default_labels(params, config)
  hold = freeze_steps(config)
  labels[PROTOTYPES] = f"hold:{hold}" if hold else "default"
  return labels


def default_config():
  return {"swav": {"num_prototypes": 3000, "epsilon": 0.05, "sinkhorn_iterations": 3,
                   "freeze_prototypes_steps": None, "freeze_prototypes_fraction": 0.0,
                   "queue_size": 0, "queue_start_step": 0}}


def validate(config):
  keys = ("num_prototypes", "epsilon", "sinkhorn_iterations", "queue_size", "queue_start_step")
  common.require(config, "swav", keys, "swav")
  s = config.swav
  for key, low in (("num_prototypes", 1), ("sinkhorn_iterations", 1),
                   ("queue_size", 0), ("queue_start_step", 0)):
    if int(s[key]) < low:
      raise ConfigError(f"config.swav.{key}={s[key]!r}: must be >= {low}.")
  fraction, steps = s.get("freeze_prototypes_fraction", 0.0), s.get("freeze_prototypes_steps")
  if not 0.0 <= float(fraction) <= 1.0:
    raise ConfigError(f"config.swav.freeze_prototypes_fraction={fraction!r}: must be in [0, 1] "
                      "(a fraction of config.steps).")
  if steps is not None and int(steps) < 0:
    raise ConfigError(f"config.swav.freeze_prototypes_steps={steps!r}: must be >= 0 (or unset: "
                      "freeze_prototypes_fraction of the run).")
  if not s.epsilon > 0:
    raise ConfigError(f"config.swav.epsilon={s.epsilon!r}: must be > 0 (paper: 0.05).")
  if 0 < int(s.queue_size) < config.batch_size:
    raise ConfigError(f"config.swav.queue_size={s.queue_size}: must be 0 (no queue) or at "
                      f"least the global batch ({config.batch_size}); the paper uses 3840.")


OBJECTIVE = common.Objective("swav", init, loss, after_update=after_update,
                             param_labels=param_labels, views=V.standard_views,
                             default_config=default_config, validate=validate,
                             backgrounds=common.BACKGROUND_VIEW_MODES)
