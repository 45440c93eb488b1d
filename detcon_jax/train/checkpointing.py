"""Orbax checkpoints in WORKDIR/checkpoints, the run's config as JSON, and
loading a trained encoder back for evaluation and export.

The train state is a plain dict {'step', 'params', 'state', 'opt_state'}
(see detcon_jax.train.loop.init_train_state) saved whole, so a resumed run
continues bit for bit. A SIGTERM (TPU preemption) only sets a flag; the loop
saves at the next step boundary and exits.
"""
from __future__ import annotations

import json
import os
import signal
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def resolve_workdir(workdir: str) -> str:
  """Local paths made absolute; URLs (gs://... on TPU pods) kept as they are."""
  return workdir if "://" in workdir else os.path.abspath(workdir)


def make_manager(workdir: str, keep: int | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints; saves are asynchronous (device->host
  copies happen before save() returns, so donated buffers are safe)."""
  if read_only:
    # Not orbax's read_only=True, which logs two warnings on every open (they
    # landed above the quality table): no save interval, no creation, no
    # max_to_keep (so nothing is ever deleted), and callers only restore.
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(epath.Path(resolve_workdir(workdir)) / CHECKPOINT_DIR,
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, train_state) -> None:
  manager.save(step, args=ocp.args.StandardSave(train_state), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restore `step` (default: latest) into the shapes/shardings of abstract_state.

  Returns (train_state, step), or (None, 0) when there is no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None, 0
  state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
  return state, int(step)


def abstract_with_sharding(tree, sharding):
  """eval_shape output -> ShapeDtypeStructs placed with `sharding` (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# --- Config next to the checkpoints ----------------------------------------

def save_config(workdir: str, config) -> str:
  """WORKDIR/config.json (local or gs://), so evaluation/export can rebuild the run."""
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  # Atomic (temp + rename): on a resumed multi-host run the other hosts read this
  # file (check_resumable) while the first host rewrites it; a plain write let
  # them read it empty. (GCS object writes are atomic already.)
  tmp = path.parent / (CONFIG_FILE + f".tmp{os.getpid()}")
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)
  return str(path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"No {CONFIG_FILE} in {workdir!r}: is this a training workdir "
                            "(python -m detcon_jax.train --workdir=...)?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


# --- A trained encoder, for evaluation and export ---------------------------

def load_encoder(workdir: str, step: int | None = None):
  """-> (config, model, variables): the run's backbone and its trained variables.

  The config is rebuilt from WORKDIR/config.json, the objective from
  config.method, and the checkpoint (default: latest) is restored onto this
  host's first device. `model.apply(variables, images, train=False)` runs it.
  """
  from data_pipelines import batch as B
  from detcon_jax.models.resnet import encoder_from_config
  from detcon_jax.objectives import registry
  from detcon_jax.train import loop, optimizer

  config = load_config(workdir)
  objective = registry.get_objective(config.method)
  tx, _ = optimizer.make_optimizer(config)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in
           B.train_batch_shapes(config.batch_size, config.image_size,
                                config.loss.num_masks).items()}
  abstract = jax.eval_shape(lambda r, b: loop.init_train_state(objective, tx, config, r, b),
                            jax.random.PRNGKey(0), batch)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  manager = make_manager(workdir, read_only=True)
  try:
    state, step = restore(manager, abstract_with_sharding(abstract, device), step)
  finally:
    manager.close()
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}; "
                            "train first (python -m detcon_jax.train --workdir=...).")
  variables = registry.encoder_variables(state["params"], state["state"])
  return config, encoder_from_config(config), variables


# --- Preemption --------------------------------------------------------------

class PreemptionFlag:
  """SIGTERM -> flag; the loop saves and exits at the next step boundary.

  Installed only for single-process runs: with jax.distributed, JAX's own
  preemption notifier handles SIGTERM and the hosts agree on a sync step
  through CheckpointManager.reached_preemption (see loop.should_stop).
  """

  def __init__(self, install: bool = True):
    self._event = threading.Event()
    self._previous = None
    self._install = install

  def __enter__(self):
    if self._install and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def to_host(tree):
  """Replicated (possibly multi-host) arrays -> numpy, read from this host's copy."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def all_finite(tree) -> bool:
  """True if every float leaf is finite (checked before any checkpoint is written)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return bool(to_host(_all_finite_jit(leaves)))


@jax.jit
def _all_finite_jit(leaves):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))
