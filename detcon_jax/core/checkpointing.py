"""Orbax checkpoints in WORKDIR/checkpoints, the run's config as JSON, the
workdir lock, and loading a trained encoder back for evaluation and export.

The train state is a plain dict {'step', 'params', 'state', 'opt_state'}
(see detcon_jax.core.state.init_train_state) saved whole, so a resumed run
continues bit for bit. A checkpoint that does not restore (truncated, files
missing) is skipped for the newest one that does, with a warning naming it.
What orbax, asyncio and TensorStore print when a save or restore fails (hundreds
of tracebacks from their threads) goes to WORKDIR/checkpoint_errors.log
(quiet_library_errors); the user gets one line (save_failed).
SIGTERM (TPU preemption) and SIGINT (Ctrl-C) only set a flag; the loop saves
at the next step boundary and exits.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from detcon_jax.errors import WorkdirError

CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "checkpoints_unrestorable"   # where train moves checkpoints that do not restore
CONFIG_FILE = "config.json"
LOCK_FILE = "lock"
ERROR_LOG = "checkpoint_errors.log"   # library tracebacks of failed saves and restores


def resolve_workdir(workdir: str) -> str:
  """Local paths made absolute; URLs (gs://... on TPU pods) kept as they are. An empty
  workdir is refused: it would be the current directory."""
  if not str(workdir or "").strip():
    raise WorkdirError("--workdir is empty; give the run its own directory, e.g. "
                       "--workdir=runs/demo.")
  return workdir if "://" in workdir else os.path.abspath(workdir)


# What train and evaluate write into a workdir (the lock, config.json and its temporary
# while it is replaced, checkpoints, TensorBoard runs, evaluation results, the library
# errors of failed saves and restores).
RUN_ENTRIES = (CONFIG_FILE, LOCK_FILE, CHECKPOINT_DIR, SET_ASIDE_DIR, "tb", "tb_random_init",
               "eval", ERROR_LOG)
# Keys every run's config.json has (configs/common.py base_config): how a run's config
# is told from someone else's config.json.
RUN_CONFIG_KEYS = ("method", "seed", "steps", "batch_size", "model", "optimizer", "data")


def is_run_config(text: str) -> bool:
  """True when text is a config.json that save_config wrote (a run's config)."""
  try:
    stored = json.loads(text)
  except ValueError:
    return False
  return isinstance(stored, dict) and all(k in stored for k in RUN_CONFIG_KEYS)


def _is_run_config_file(path) -> bool:
  try:
    return path.is_file() and is_run_config(path.read_text())
  except (OSError, UnicodeDecodeError):   # unreadable: not one this project can vouch for
    return False


def check_own_workdir(workdir: str) -> None:
  """Raise WorkdirError unless workdir is missing, empty or holds only what runs write
  (RUN_ENTRIES, with a config.json that is a run's), so that a run never writes over
  files it did not make (e.g. --workdir=. in a project folder)."""
  path = epath.Path(workdir)
  if not path.exists():
    return
  if not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; choose another "
                       "--workdir.")
  try:
    entries = sorted(path.iterdir(), key=lambda p: p.name)
  except OSError:   # unreadable: ensure_writable says what is wrong with it
    return
  for entry in entries:
    name = entry.name
    if name == CONFIG_FILE and not _is_run_config_file(entry):
      if (path / CHECKPOINT_DIR).exists():   # a run's config.json, damaged: say so
        load_config(workdir)
      raise WorkdirError(f"{entry} is not a training run's config; refusing to train into "
                         f"{workdir} (it would replace that file). Choose another --workdir.")
    if name not in RUN_ENTRIES and not name.startswith(CONFIG_FILE + ".tmp"):
      raise WorkdirError(f"{entry} was not written by a training run; refusing to train into "
                         f"{workdir}. Use a new or empty --workdir (or one of a previous run).")


def ensure_writable(workdir: str) -> None:
  """Create a local workdir and prove it takes files, or raise WorkdirError saying so."""
  if "://" in workdir:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f"Cannot write to the workdir {workdir!r} ({e.strerror or e}); "
                       "choose a writable --workdir.") from None


# --- One run per workdir ------------------------------------------------------

def _holder(fd) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  try:
    return json.loads(os.read(fd, 4096) or b"{}")
  except ValueError:
    return {}


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Hold WORKDIR/lock for the run: an flock, and the holder's pid and host in the file.

  A second run on the workdir refuses, naming the holder. The kernel drops the
  flock when its process dies (even by kill -9), so a lock file nobody holds is
  stale and taken over, with a warning. Released on exit, errors included. Object
  stores (gs://) have no locks: not locked there.
  """
  if "://" in workdir:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      h = _holder(fd)
      os.close(fd)
      raise WorkdirError(
          f"{workdir} is in use by another run (pid {h.get('pid', '?')} on host "
          f"{h.get('host', '?')}, since {h.get('since', '?')}); wait for it to finish or stop "
          "it, or use another --workdir.") from None
    try:
      same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:   # the previous holder removed it between our open and flock
      same_file = False
    if same_file:
      break
    os.close(fd)
  stale = _holder(fd)
  if stale:
    logging.warning("Taking over the lock of a run that ended without releasing it (pid %s on "
                    "host %s, since %s).", stale.get("pid"), stale.get("host"), stale.get("since"))
  me = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(me).encode(), 0)
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)    # while still holding the flock, so no other run loses its own
    os.close(fd)


def make_manager(workdir: str, keep: int | None = None, read_only: bool = False,
                 keep_steps=()) -> ocp.CheckpointManager:
  """Keeps the last `keep` checkpoints, and those at `keep_steps` (config.eval.at_steps:
  evaluated, kept for later); saves are asynchronous (device->host copies happen
  before save() returns, so donated buffers are safe)."""
  if read_only:
    # Not orbax's read_only=True, which logs two warnings on every open (they
    # landed above the quality table): no save interval, no creation, no
    # max_to_keep (so nothing is ever deleted), and callers only restore.
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0)
  elif keep_steps:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True,
        preservation_policy=policies.AnyPreservationPolicy(
            [policies.LatestN(keep), policies.CustomSteps(list(keep_steps))]))
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
  return ocp.CheckpointManager(epath.Path(resolve_workdir(workdir)) / CHECKPOINT_DIR,
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, train_state) -> None:
  """Start writing `step` (asynchronous); a failure of this or the previous save is
  a one-line WorkdirError (see save_failed)."""
  wait(manager, manager.latest_step())   # the previous save, named if it failed
  with save_failed(manager, step):
    manager.save(step, args=ocp.args.StandardSave(train_state), force=True)


def wait(manager: ocp.CheckpointManager, step) -> None:
  """Wait for the pending save of `step` to be on disk (WorkdirError if it failed)."""
  with save_failed(manager, step):
    manager.wait_until_finished()


def closing(manager: ocp.CheckpointManager):
  """ExitStack.push callback: close the manager (finishing its pending save); a failure
  is a WorkdirError, or only logged when another error is already on its way out."""
  def close(exc_type, exc, tb):
    del exc_type, tb
    try:
      with save_failed(manager, None):
        manager.close()
    except WorkdirError:
      if exc is None:
        raise
  return close


def complete_steps(directory) -> list[int]:
  """The steps with a finished checkpoint folder (orbax writes into STEP.orbax-checkpoint-tmp*
  and renames it when complete)."""
  path = epath.Path(str(directory))
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


# --- Library noise of failed saves and restores --------------------------------

class _ErrorLog:
  """Appends to WORKDIR/checkpoint_errors.log; to a temp file when the workdir takes no
  more bytes (a full disk) or is remote. `path` is where the last entry went."""

  def __init__(self, workdir: str):
    self.paths = [] if "://" in workdir else [os.path.join(workdir, ERROR_LOG)]
    self.paths.append(os.path.join(tempfile.gettempdir(), f"detcon_jax-{os.getpid()}-{ERROR_LOG}"))
    self.path = None
    self._lock = threading.Lock()

  def write(self, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with self._lock:
      for path in self.paths:
        try:
          with open(path, "a") as f:
            f.write(f"--- {stamp}\n{text.rstrip()}\n")
          self.path = path
          return
        except OSError:
          continue


_LOGS: list[_ErrorLog] = []   # the active quiet_library_errors, innermost last
_LIBRARIES = (f"{os.sep}orbax{os.sep}", f"{os.sep}asyncio{os.sep}", "tensorstore")


def _from_library(tb) -> bool:
  return any(lib in frame.f_code.co_filename for frame, _ in traceback.walk_tb(tb)
             for lib in _LIBRARIES)


class _Divert(logging.Filter):
  """On the absl, asyncio and root loggers: orbax's and asyncio's records (its "Task
  exception was never retrieved" too) go to the error log instead of the console."""

  def __init__(self, log: _ErrorLog):
    super().__init__()
    self._log, self._format = log, logging.Formatter(
        "%(levelname)s %(name)s %(pathname)s:%(lineno)d [%(threadName)s] %(message)s")

  def filter(self, record) -> bool:
    if record.name != "asyncio" and not any(lib in record.pathname for lib in _LIBRARIES):
      return True
    self._log.write(self._format.format(record))
    return False


@contextlib.contextmanager
def quiet_library_errors(workdir: str):
  """Route what orbax/asyncio/TensorStore print about failed saves and restores (log
  records, exceptions of their threads, callbacks into a closed event loop) to
  WORKDIR/checkpoint_errors.log for the duration (late callbacks and asyncio's records:
  also after it);
  everything else prints as before."""
  log = _ErrorLog(resolve_workdir(workdir))
  divert = _Divert(log)
  loggers = [logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")]
  for stale in [f for f in loggers[2].filters if isinstance(f, _Divert)]:
    loggers[2].removeFilter(stale)       # an earlier block's, left for its late records
  previous_thread_hook, previous_unraisable = threading.excepthook, sys.unraisablehook

  def thread_hook(args):
    if _from_library(args.exc_traceback):
      log.write(f"Exception in thread {getattr(args.thread, 'name', '?')}:\n"
                + "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                     args.exc_traceback)))
    else:
      previous_thread_hook(args)

  def unraisable_hook(u):
    if _from_library(u.exc_traceback):
      log.write("".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback)))
    else:
      previous_unraisable(u)

  for logger in loggers:
    logger.addFilter(divert)
  threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook
  _LOGS.append(log)
  try:
    yield log
  finally:
    _LOGS.remove(log)
    threading.excepthook = previous_thread_hook
    for logger in loggers[:2]:
      logger.removeFilter(divert)
    # sys.unraisablehook and the asyncio logger's filter stay: TensorStore completes
    # futures into orbax's closed event loops up to interpreter exit ("Event loop is
    # closed"), and asyncio reports a failed restore's task ("Task exception was never
    # retrieved") when the task is collected, which can be after the error line; both
    # still go to this log.


def error_log() -> str:
  """Where the innermost quiet_library_errors writes (named in error messages)."""
  log = _LOGS[-1] if _LOGS else None
  return (log.path or log.paths[0]) if log else "(none)"


def log_exception(e: BaseException) -> str:
  """The full trace of e to the error log; returns the log's path."""
  log = _LOGS[-1] if _LOGS else _ErrorLog(tempfile.gettempdir())
  log.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
  return log.path or "(no writable place for the log)"


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _disk_full(e: BaseException) -> bool:
  return (getattr(e, "errno", None) == errno.ENOSPC or "RESOURCE_EXHAUSTED" in str(e)
          or "No space left" in str(e))


@contextlib.contextmanager
def save_failed(manager: ocp.CheckpointManager, step):
  """A save that fails (a full disk, a vanished or read-only folder) -> one-line
  WorkdirError naming the step, the newest complete checkpoint and the log holding
  the library's traceback."""
  try:
    yield
  except Exception as e:   # orbax/tensorstore raise ValueError, OSError, RuntimeError...
    if isinstance(e, WorkdirError):
      raise
    path = log_exception(e)
    try:
      done = complete_steps(manager.directory)
    except OSError:
      done = []
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    cause = "the disk is full" if _disk_full(e) else "it failed"
    hint = " Free space there, or lower --config.checkpoint.keep." if _disk_full(e) else ""
    resume = (f"The newest complete checkpoint is step {done[-1]}: a rerun resumes there."
              if done else "No checkpoint is complete yet.")
    raise WorkdirError(f"Saving {what} in {manager.directory} failed: {cause} "
                       f"({_first_line(e, 120)}). {resume}{hint} Full trace: {path}") from None


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
  """Restore `step` (default: the newest that restores) into the shapes/shardings of
  abstract_state.

  Returns (train_state, step, skipped): skipped lists the newer steps that did
  not restore, each named in a warning (its trace in the error log, error_log()).
  (None, 0, skipped) when none restores (or there is none). An explicit `step`
  that fails raises WorkdirError.
  """
  check_step(manager, step)
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  skipped = []
  for s in steps:
    try:
      return manager.restore(s, args=ocp.args.StandardRestore(abstract_state)), int(s), skipped
    except Exception as e:   # orbax/tensorstore raise many kinds for a damaged checkpoint
      problem, path = _first_line(e), log_exception(e)
      if step is not None:
        raise WorkdirError(f"Checkpoint step {s} in {manager.directory} does not restore "
                           f"({problem}; full trace: {path}).") from None
      logging.warning("Checkpoint step %d in %s does not restore (%s); trying the one before.",
                      s, manager.directory, problem)
      skipped.append(int(s))
  return None, 0, skipped


def check_step(manager: ocp.CheckpointManager, step: int | None) -> None:
  """An explicit step (--step) must be one the workdir holds: else name the ones it does."""
  if step is None:
    return
  steps = sorted(int(s) for s in manager.all_steps())
  if step not in steps:
    raise WorkdirError(
        f"No checkpoint step {step} in {manager.directory}; "
        + (f"it holds steps {steps}: pass one of them to --step, or leave --step out for "
           "the newest." if steps else "it holds none: train first."))


def set_aside(manager: ocp.CheckpointManager, workdir: str, steps) -> list[str]:
  """Move checkpoints that do not restore to WORKDIR/checkpoints_unrestorable/, so the
  resumed run can save those steps again; kept for inspection, never deleted.
  Object stores have no folder rename: there the user is asked to move them."""
  if "://" in workdir:
    raise WorkdirError(f"Checkpoint step(s) {list(steps)} in {manager.directory} do not "
                       "restore (see the warnings above); move them out of that folder and "
                       "rerun to resume from the newest one that does.")
  moved = []
  for step in steps:
    target = os.path.join(workdir, SET_ASIDE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(str(manager.directory), str(step)), target)
    moved.append(target)
  manager.reload()
  return moved


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
  try:
    stored = json.loads(path.read_text())
  except ValueError as e:   # cut short (disk full, a copy interrupted) or edited by hand
    raise WorkdirError(
        f"{path} is not valid JSON ({e}); it holds the run's config, which resuming, "
        "evaluating and exporting rebuild the run from. Restore it from a copy, or use a new "
        "--workdir.") from None
  return ml_collections.ConfigDict(stored)


# --- A trained encoder, for evaluation and export ---------------------------

def load_encoder(workdir: str, step: int | None = None):
  """-> (config, model, variables): the run's backbone and its trained variables.

  The config is rebuilt from WORKDIR/config.json, the objective from
  config.method, and the checkpoint (default: the newest that restores) is
  restored onto this host's first device. `model.apply(variables, images,
  train=False)` runs it.
  """
  config, model, variables, _ = restore_encoder(workdir, step)
  return config, model, variables


def restore_encoder(workdir: str, step: int | None = None):
  """load_encoder, also returning the step restored: (config, model, variables, step)."""
  from detcon_jax.models.resnet import encoder_from_config
  from detcon_jax.objectives import registry
  config, state, step = restore_train_state(workdir, step)
  variables = registry.encoder_variables(state["params"], state["state"])
  return config, encoder_from_config(config), variables, step


def restore_train_state(workdir: str, step: int | None = None):
  """(config, the whole train state {'params', 'state', ...}, step) on this host's first
  device: for evaluations that need more than the backbone (heads, key network)."""
  from data_pipelines import batch as B
  from detcon_jax.objectives import registry
  from detcon_jax.core import state as state_lib

  config = load_config(workdir)
  if step is not None:   # a step that does not exist fails before the model is traced
    manager = make_manager(workdir, read_only=True)
    try:
      check_step(manager, step)
    finally:
      manager.close()
  objective = registry.get_objective(config.method)
  tx, _ = state_lib.make_optimizer(objective, config)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in
           B.train_batch_shapes(config.batch_size, num_masks=config.loss.num_masks,
                                specs=objective.views(config)).items()}
  abstract = jax.eval_shape(lambda r, b: state_lib.init_train_state(objective, tx, config, r, b),
                            jax.random.PRNGKey(0), batch)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with quiet_library_errors(workdir):
    manager = make_manager(workdir, read_only=True)
    try:
      state, step, skipped = restore(manager, abstract_with_sharding(abstract, device), step)
    finally:
      manager.close()
    log = error_log()
  if state is None and skipped:
    raise WorkdirError(f"No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} restores "
                       f"(steps {skipped}, see the warnings above; full traces: {log}).")
  if state is None:
    raise FileNotFoundError(f"No checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)}; "
                            "train first (python -m detcon_jax.train --workdir=...).")
  return config, state, step


# --- Preemption --------------------------------------------------------------

class Interrupted(BaseException):
  """A stop signal arrived while nothing was left to save (see PreemptionFlag.abortable).
  A BaseException, like KeyboardInterrupt: `except Exception` in the evaluation or the
  demo build must not swallow it."""


class PreemptionFlag:
  """SIGTERM or SIGINT -> flag; the loop saves and exits at the next step boundary
  (exit status 128 + signum: 143, 130). A second Ctrl-C stops at once, unsaved.

  Inside `abortable()` (everything already saved: an evaluation) a signal raises
  Interrupted instead, so the run does not wait for the evaluation to end.
  Installed only for single-process runs: with jax.distributed, JAX's own
  preemption notifier handles SIGTERM and the hosts agree on a sync step
  through CheckpointManager.reached_preemption (see loop._stop_requested).
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, install: bool = True):
    self._event = threading.Event()
    self._previous = {}
    self._install = install
    self._abortable = False
    self.signum = None

  def __enter__(self):
    if self._install and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt
    self.signum = signum
    self._event.set()
    if self._abortable:
      raise Interrupted(signal.Signals(signum).name)

  @contextlib.contextmanager
  def abortable(self):
    """A signal inside (or already received) raises Interrupted."""
    self._abortable = True
    try:
      if self._event.is_set():
        raise Interrupted(signal.Signals(self.signum).name)
      yield
    finally:
      self._abortable = False

  def is_set(self) -> bool:
    return self._event.is_set()

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


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
