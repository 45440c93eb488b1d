"""The method-agnostic training loop.

Sections, in order, one function each: validate, workdir (writable, locked)
(train) -> resume checks, falling back past checkpoints that do not restore
(_restore) -> data (shards verified; _batch_source), first batch -> init or
resume, config.json (_init_or_resumed) -> compile (_compile) -> loop (step, log,
checkpoint, preemption; _train_steps) -> summary (_summary) -> evaluation
(_evaluate_at_end); _run calls them in turn. Nothing but the lock (and empty
folders) is written before the config, the data and the resume are checked. The objective is looked up by config.method and the trainer knows
nothing method-specific: the train state and step are in state.py, the
writers in writers.py.

Exact resume: the train state is checkpointed whole, the data iterator is
restarted at the checkpoint's step (the input pipeline is deterministic in
(seed, step)) and the per-step rng is fold_in(rng(seed), step).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import queue
import signal
import threading
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from detcon_jax.errors import (USER_ERRORS, ConfigError, InputError, NonFiniteLossError,
                               WorkdirError)
from data_pipelines import background_augment as bg_lib
from data_pipelines import batch as B
from detcon_jax.objectives import online_masks, registry
from detcon_jax.core import checkpointing, sharding, writers
from detcon_jax.core.optimizer import warmup_steps
from detcon_jax.core.state import init_train_state, make_optimizer, make_train_step
from detcon_jax.core.validation import check_memory, validate, validate_records

TB_DIR = writers.TB_DIR
# BatchSource(config, start_step, host_index, host_count) -> iterator of host batches.
BatchSource = Callable[..., Iterator[dict]]


# --- Evaluations -----------------------------------------------------------

def run_evaluations(config, workdir: str, step: int):
  """detcon_jax.evaluate runs config.eval.evals on the checkpoint at `step`
  (random-init baseline beside it) and prints the table.

  Imported lazily so that training never pulls in the evaluation stack unless
  config.eval.at_end / config.eval.every_steps ask for it.
  """
  from detcon_jax.evaluate.run import evaluate_workdir
  return evaluate_workdir(workdir, evals=tuple(config.eval.evals), step=step)


def evaluated(workdir: str, step: int) -> bool:
  """Whether the evaluation of `step` was written (WORKDIR/eval/step_N.json): what
  marks a run with config.eval.at_end as finished."""
  from etils import epath
  from detcon_jax.evaluate.run import EVAL_DIR
  return (epath.Path(workdir) / EVAL_DIR / f"step_{step}.json").exists()


# --- Data ------------------------------------------------------------------

def records_batches(config, start_step: int, host_index: int, host_count: int, views=None):
  """The real input: this host's slice of the global batch from config.data.records_dir,
  with the views the objective asks for (default: config.method's).

  This host's shards are first checked against manifest.json (present, size or
  record count, sha256), since tf.data skips or retries a bad shard silently.
  """
  from data_pipelines import input as data_input
  from data_pipelines import records
  manifest = records.read_manifest(config.data.records_dir)
  paths, _ = data_input.host_shards(config.data.records_dir, manifest, "train", host_index,
                                    host_count)
  records.verify_shards(config.data.records_dir, manifest, "train", paths,
                        checksums=config.data.verify_checksums)
  views = registry.get_objective(config.method).views(config) if views is None else views
  return data_input.train_iterator(
      config.data.records_dir, batch_size=config.batch_size // host_count, views=views,
      mask_source=online_masks.records_mask_source(config),
      mask_key=online_masks.records_mask_key(config), num_masks=config.loss.num_masks,
      seed=config.seed, start_step=start_step, host_index=host_index, host_count=host_count,
      shuffle_window=config.data.shuffle_buffer,
      foreground_threshold=config.data.get("foreground_threshold", 0.5),
      background=bg_lib.settings(config),
      multi_hot=bool(config.data.get("multi_hot_labels", False)))


def ensure_records(config, views=None) -> None:
  """Build the embedded demo records when config.data.build_demo and they are missing,
  or lack the saliency field or mask source the run's views need."""
  if config.data.get("build_demo", False):
    from data_pipelines import build
    from data_pipelines import views as V
    from data_pipelines.masks import REGISTRY
    views = registry.get_objective(config.method).views(config) if views is None else views
    views = bg_lib.with_fields(views, bg_lib.settings(config))
    saliency = any({V.SALIENCY, V.FOREGROUND} & set(s.fields) or s.min_salient_cover > 0
                   for s in views)
    kind = online_masks.records_mask_source(config).split("_")[0]
    background = bg_lib.needs_tiled(bg_lib.settings(config))
    try:
      build.ensure_demo_records(config.data.records_dir, saliency=saliency,
                                background=background,
                                masks=(kind,) if kind in REGISTRY else (),
                                bg_correlation=config.data.get("demo_bg_correlation", 0.0))
    except OSError as e:   # the build's message names its --out, which train users never pass
      reason = getattr(e.__context__, "strerror", None) or e.strerror or str(e)
      needs = [f"{kind} masks" if kind in REGISTRY else "",
               "saliency maps" if saliency else "", "tiled backgrounds" if background else ""]
      raise ConfigError(
          f"config.data.records_dir={config.data.records_dir!r}: the demo records there must "
          f"be built or upgraded for this config ({', '.join(n for n in needs if n)}), but "
          f"the directory cannot be written ({reason}). Make it writable, or point "
          "--config.data.records_dir at a writable directory.") from None


def check_eval_data(config) -> None:
  """The records serve the evaluations config.eval runs: fail now, not after training."""
  if not (config.eval.at_end or config.eval.get("every_steps") or config.eval.get("at_steps")):
    return
  from data_pipelines import records
  from detcon_jax.evaluate import run as eval_run
  try:
    eval_run.check_data(eval_run.parse_evals(config.eval.evals),
                        records.read_manifest(config.data.records_dir),
                        config.data.records_dir, flag="--config.eval.evals")
  except ValueError as e:
    raise ValueError(f"{e} (config.eval.evals run at the end of training; "
                     "--config.eval.at_end=False skips them.)") from None


class HostBatches:
  """Host batches pulled on a thread, so that the loop never waits without bound.

  get() waits at most timeout_s for a batch (then InputError: a stalled input,
  e.g. tf.data retrying a vanished shard forever, is an error, not a hang) and
  returns None as soon as `stop` is set (SIGTERM/SIGINT while waiting).
  """

  def __init__(self, batches: Iterator[dict], timeout_s: float, stop):
    self._queue = queue.Queue(1)
    self._closed = threading.Event()
    self._timeout_s, self._stop = timeout_s, stop
    threading.Thread(target=self._pull, args=(iter(batches),), daemon=True,
                     name="host-batches").start()

  def _pull(self, it):
    while not self._closed.is_set():
      try:
        item = (next(it), None)
      except BaseException as e:   # StopIteration too: handed over to get()
        item = (None, e)
      while not self._closed.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if item[1] is not None:
        return

  def get(self) -> dict | None:
    deadline = time.monotonic() + self._timeout_s
    while not self._stop.is_set():
      try:
        batch, error = self._queue.get(timeout=0.1)
      except queue.Empty:
        if time.monotonic() > deadline:
          raise InputError(
              f"No batch from the input pipeline in {self._timeout_s:g}s "
              "(config.data.timeout_s): it is stalled (unreadable storage, a shard gone "
              "since start-up?). Check config.data.records_dir, or raise "
              "--config.data.timeout_s for slow storage.") from None
        continue
      if isinstance(error, StopIteration):
        raise InputError("The input pipeline ended; it should repeat forever.")
      if error is not None:
        raise error
      return batch
    return None

  def close(self):
    self._closed.set()


def _on_mesh(first_host: dict, host_batches: HostBatches, mesh, prefetch: int = 2):
  """Host batches -> global arrays, `prefetch` batches ahead of the step; ends
  early when a stop is requested while waiting for input."""
  ahead = collections.deque([sharding.host_batch_to_global(first_host, mesh)])
  def fill(n):
    for _ in range(n):
      b = host_batches.get()
      if b is None:
        return
      ahead.append(sharding.host_batch_to_global(b, mesh))
  fill(prefetch - 1)
  while ahead:
    yield ahead.popleft()
    fill(1)


def data_counts(source, host_batch: int) -> tuple[int, int]:
  """(unreadable records skipped, records read) by this host's input so far."""
  stats = getattr(source, "stats", {})
  skipped = int(stats.get("corrupt_skipped", 0))
  return skipped, skipped + int(stats.get("batches", 0)) * host_batch


# Records read before the unreadable fraction is judged during a run (the end of a run
# judges whatever was read): the first few windows of a shuffled stream vary a lot.
MIN_RECORDS_JUDGED = 1000


def check_corrupt(config, skipped: int, read: int, last_saved, final: bool = False) -> None:
  """Stop when more than config.data.max_corrupt_fraction of the records read were unreadable."""
  limit = config.data.max_corrupt_fraction
  if (final or read >= MIN_RECORDS_JUDGED) and read and skipped > limit * read:
    raise InputError(
        f"{skipped} of the {read} records read so far ({skipped / read:.1%}) were unreadable, "
        f"more than config.data.max_corrupt_fraction={limit:g}; stopped (last checkpoint: "
        f"step {last_saved}). Rebuild the records (python -m data_pipelines.build), or raise "
        "--config.data.max_corrupt_fraction to train on the readable ones.")


# --- The run -----------------------------------------------------------------

def say(message: str) -> None:
  """One console line, from the first host only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def _stop_requested(flag, manager, step: int) -> bool:
  """Preemption: SIGTERM flag on one host; a cross-host sync point on several."""
  if jax.process_count() > 1:
    return manager.reached_preemption(step)
  return flag.is_set()


# Keys a resumed run may change: they do not alter what the steps compute. config.steps
# may be raised (to train further); every other key must match the stored run.
RESUME_FREE = ("log_every_steps", "checkpoint.", "eval.", "data.timeout_s",
               "data.max_corrupt_fraction", "data.build_demo", "data.verify_checksums")


def _flat(tree, prefix=""):
  """A nested dict as one level of dotted keys."""
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def check_resumable(config, stored, workdir: str) -> None:
  """One clear error, before anything is written, when this run would not continue
  the stored one exactly (model, method, batch, data, seed, views, loss, optimizer...)."""
  new, old = (_flat(json.loads(c.to_json_best_effort())) for c in (config, stored))
  for flat, c in ((new, config), (old, stored)):   # warmup as steps at the stored length:
    flat.pop("optimizer.warmup_fraction", None)     # a count and a fraction giving it agree
    flat["optimizer.warmup_steps"] = warmup_steps(c.optimizer, stored.steps)
  changed = [k for k in sorted(new.keys() & old.keys())
             if new[k] != old[k] and not k.startswith(RESUME_FREE)
             and not (k == "steps" and new[k] > old[k])]
  if changed:
    raise ConfigError(
        f"{workdir} holds a run made with "
        + ", ".join(f"config.{k}={old[k]!r} (this run: {new[k]!r})" for k in changed)
        + "; resuming with other values would not continue it exactly (only config.steps "
        "may be raised). Pass the stored values, or use a new --workdir.")


def train(config, workdir: str, *, objective=None, batches: BatchSource | None = None) -> dict:
  """Train (or resume) config in workdir; returns a summary dict.

  objective / batches default to the registry entry for config.method and the
  TFRecord input pipeline; tests pass small ones. The workdir is locked for the
  run (a second run on it refuses); SIGTERM and SIGINT save and stop.
  """
  t_start = time.time()
  # Validate before touching data or compiling anything.
  objective = registry.get_objective(config.method) if objective is None else objective
  validate(config, device_count=jax.device_count(), process_count=jax.process_count(),
           objective=objective)
  check_memory(config, objective.views(config), platform=jax.devices()[0].platform,
               process_count=jax.process_count())   # before anything is allocated
  workdir = checkpointing.resolve_workdir(workdir)
  checkpointing.check_own_workdir(workdir)   # never writes over files a run did not make
  primary = jax.process_index() == 0
  if primary:
    checkpointing.ensure_writable(workdir)
  lock = checkpointing.workdir_lock(workdir) if primary else contextlib.nullcontext()
  with checkpointing.PreemptionFlag(install=jax.process_count() == 1) as flag, lock, \
       checkpointing.quiet_library_errors(workdir), contextlib.ExitStack() as cleanup:
    manager = checkpointing.make_manager(workdir, config.checkpoint.keep,
                                         keep_steps=tuple(config.eval.get("at_steps", ())))
    cleanup.push(checkpointing.closing(manager))
    return _run(config, workdir, objective, batches, flag, manager, cleanup, t_start)


def abstract_batch(objective, config) -> dict:
  """Shapes of the global batch the objective's views make (restore targets need no data)."""
  shapes = B.train_batch_shapes(config.batch_size, num_masks=config.loss.num_masks,
                                specs=objective.views(config))
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


class _Run(NamedTuple):
  """What every section of a run reads: train()'s arguments and the pieces built once."""
  config: Any
  workdir: str
  objective: Any
  flag: Any                      # checkpointing.PreemptionFlag
  manager: Any                   # the orbax CheckpointManager
  cleanup: contextlib.ExitStack  # closed when train() returns or raises
  mesh: Any
  replicated: Any                # the sharding of the train state
  tx: Any
  schedule: Any
  init_rng: Any
  train_rng: Any
  init: Callable                 # jitted (rng, global batch) -> train state


@dataclasses.dataclass
class _Progress:
  """The step loop's state: the sections that log, save and summarise read and update it."""
  ts: Any
  start_step: int
  step: int
  last_saved: int | None
  t_run: float                   # when the steps began
  t_log: float                   # when the current log interval began
  status: str = "done"
  losses: dict = dataclasses.field(default_factory=dict)   # step -> loss
  pending: list = dataclasses.field(default_factory=list)  # (step, device metrics) unread
  chance: float | None = None    # the objective's chance level (metric 'chance'), last log
  eval_s: float = 0.0            # spent in evaluations during the run (not step time)
  log_from: int = 0              # the first step of the current log interval


def _run(config, workdir, objective, batches, flag, manager, cleanup, t_start) -> dict:
  """Init or resume, train to config.steps (or a stop), summarise and evaluate."""
  run = _setup(config, workdir, objective, flag, manager, cleanup)
  ts, start_step = _restore(run)
  if start_step >= config.steps:
    return _already_trained(run, start_step)
  source = _batch_source(run, batches, start_step)
  if source is None:
    return _stopped(run, start_step)
  host_input = HostBatches(source, config.data.timeout_s, flag)
  cleanup.callback(host_input.close)
  first_host = host_input.get()
  if first_host is None:   # stopped while waiting for the first batch: nothing new to save
    say(f"Stopped by {signal_name(flag.signum)} before step {start_step}; nothing new to save.")
    return _stopped(run, start_step)
  global_batches = _on_mesh(first_host, host_input, run.mesh)
  first = next(global_batches)
  ts = _init_or_resumed(run, ts, start_step, first)
  setup_s = time.time() - t_start
  step_fn, compile_s = _compile(run, ts, first, setup_s)
  writer = writers.make_writer(workdir, jax.process_index() == 0)
  cleanup.callback(writer.close)
  if not start_step:
    _show_inputs(writer, config, first_host)
  panel = _online_masks_panel(run, writer, first_host, first)
  now = time.time()
  progress = _Progress(ts=ts, start_step=start_step, step=start_step,
                       last_saved=start_step or None, t_run=now, t_log=now, log_from=start_step)
  del ts   # donated to the first step
  _train_steps(run, progress, step_fn, first, global_batches, source, writer, panel)
  summary = _summary(run, progress, source, setup_s, compile_s)
  say(summary_line(summary))
  step = progress.step
  if progress.status == "done" and (config.eval.at_end
                                    or step in tuple(config.eval.get("at_steps", ()))):
    return _evaluate_at_end(config, workdir, step, flag, summary)
  return summary


def _setup(config, workdir, objective, flag, manager, cleanup) -> _Run:
  """The mesh, optimizer, rngs and jitted init that the later sections share."""
  mesh = sharding.make_mesh()
  tx, schedule = make_optimizer(objective, config)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  replicated = sharding.replicated(mesh)
  init = jax.jit(lambda rng, b: init_train_state(objective, tx, config, rng, b),
                 out_shardings=replicated)
  return _Run(config, workdir, objective, flag, manager, cleanup, mesh, replicated, tx,
              schedule, init_rng, train_rng, init)


def _restore(run: _Run) -> tuple:
  """(train state, step) of the newest checkpoint that restores, the ones after it set
  aside; (None, 0) for a new run."""
  config, workdir, manager = run.config, run.workdir, run.manager
  start_step = manager.latest_step() or 0
  if not start_step:
    return None, 0
  check_resumable(config, checkpointing.load_config(workdir), workdir)
  abstract = checkpointing.abstract_with_sharding(
      jax.eval_shape(run.init, run.init_rng, abstract_batch(run.objective, config)),
      run.replicated)
  ts, start_step, skipped = checkpointing.restore(manager, abstract)
  if ts is None:
    raise WorkdirError(
        f"No checkpoint in {manager.directory} restores (steps {skipped}, see the warnings "
        "above); move them away to start over, or use a new --workdir. Full traces: "
        f"{checkpointing.error_log()}")
  if skipped:
    moved = checkpointing.set_aside(manager, workdir, skipped) if jax.process_index() == 0 else []
    say(f"warning: checkpoint step(s) {skipped} do not restore; resuming from step "
        f"{start_step} instead (moved to {', '.join(moved)}).")
  return ts, start_step


def _already_trained(run: _Run, start_step: int) -> dict:
  """A rerun of a finished run: evaluate it if config.eval.at_end has not yet, else say so."""
  config, workdir = run.config, run.workdir
  summary = dict(method=config.method, status="done", start_step=start_step, step=start_step,
                 losses={}, signal=None, checkpoint=os.path.join(
                     workdir, checkpointing.CHECKPOINT_DIR, str(start_step)))
  if config.eval.at_end and not evaluated(workdir, start_step):
    say(f"{workdir} is trained to step {start_step} but not evaluated yet; evaluating.")
    return _evaluate_at_end(config, workdir, start_step, run.flag, summary)
  say(f"{workdir} is already trained to step {start_step} (config.steps={config.steps}); "
      "nothing to do. Raise --config.steps to train further.")
  return summary


def _stopped(run: _Run, start_step: int) -> dict:
  """The summary of a run stopped by a signal before its first step."""
  return dict(method=run.config.method, status="preempted", start_step=start_step,
              step=start_step, losses={}, signal=run.flag.signum, checkpoint=None)


def _batch_source(run: _Run, batches: BatchSource | None, start_step: int):
  """This host's batches from start_step, the records (and config.eval's data) checked
  first: a missing shard, mask field or records dir fails here, before compiling. None
  when a signal stopped the demo build."""
  config, flag = run.config, run.flag
  try:   # checks the records against the config: manifest, shards, mask source, hosts
    if batches is None:   # (the demo build refuses a records_dir of another source)
      from data_pipelines import records
      try:
        with flag.abortable():   # a signal stops the demo build now (complete shards stay)
          ensure_records(config, run.objective.views(config))
      except checkpointing.Interrupted:
        say(f"Stopped by {signal_name(flag.signum)} while building the demo records in "
            f"{config.data.records_dir}; complete shards are kept for the rerun.")
        return None
      check_eval_data(config)
      validate_records(config, records.read_manifest(config.data.records_dir),
                       config.data.records_dir)   # image size, batch vs the records
      batches = functools.partial(records_batches, views=run.objective.views(config))
    return batches(config, start_step, jax.process_index(), jax.process_count())
  except ConfigError:   # names its key already
    raise
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.data (records_dir={config.data.records_dir!r}): {e}") from e


def _init_or_resumed(run: _Run, ts, start_step: int, first: dict):
  """The train state to start from (a new one from the first batch, or the restored one),
  then config.json: the config, data and resume are checked, so now the run is written."""
  if ts is None:
    ts = run.init(run.init_rng, first)
  else:
    say(f"Resumed from {run.manager.directory} at step {start_step}.")
  if jax.process_index() == 0:
    checkpointing.save_config(run.workdir, run.config)
  return ts


def _compile(run: _Run, ts, first: dict, setup_s: float) -> tuple:
  """(the compiled train step, seconds it took), announced in the run's first line."""
  config, mesh = run.config, run.mesh
  t = time.time()
  step_fn = jax.jit(make_train_step(run.objective, run.tx, run.schedule, config, run.train_rng),
                    in_shardings=(run.replicated, sharding.batch_sharded(mesh)),
                    out_shardings=(run.replicated, run.replicated), donate_argnums=0)
  step_fn = step_fn.lower(ts, first).compile()
  compile_s = time.time() - t
  say(f"{config.method}: {jax.device_count()} x {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} host(s), global batch {config.batch_size}; "
      f"set up in {setup_s:.1f}s, compiled in {compile_s:.1f}s; "
      f"TensorBoard: {os.path.join(run.workdir, TB_DIR)}")
  return step_fn, compile_s


def _show_inputs(writer, config, first_host: dict) -> None:
  """The first host batch as TensorBoard images: what the views look like after augmentation."""
  if B.MASKS1 in first_host:   # the masks
    from detcon_jax.evaluate.visualize import view_mask_overlay_images
    writer.images(0, "input/views with masks", view_mask_overlay_images(first_host))
  if any(k.endswith("/boxes") for k in first_host):   # box-based objectives' boxes
    from detcon_jax.evaluate.visualize import view_box_images
    writer.images(0, "input/views with boxes", view_box_images(first_host))
  if bg_lib.settings(config):   # view1 | view2 (| the background-swap negative)
    from detcon_jax.evaluate.visualize import side_by_side, to_uint8
    shown = [B.VIEW1, B.VIEW2] + [bg_lib.NEGATIVE] * (bg_lib.NEGATIVE in first_host)
    writer.images(0, "input/background augmentations",
                  side_by_side(*[to_uint8(np.asarray(first_host[k][:8])) for k in shown]))


def _online_masks_panel(run: _Run, writer, first_host: dict, first: dict):
  """(step, train state) -> None: with config.data.mask_source='online', the first batch's
  first 4 images to TensorBoard as view 1 | its records' (FH) masks, when read | online
  masks of view 1 | of view 2 (objectives/online_masks.preview), at every checkpoint."""
  fn = online_masks.preview(run.config, run.objective.views(run.config))
  if fn is None:
    return lambda step, ts: None
  from detcon_jax.evaluate.visualize import overlay, side_by_side, to_uint8
  fn = jax.jit(fn, out_shardings=run.replicated)
  host = {k: np.asarray(v[:4]) for k, v in first_host.items() if k in (B.VIEW1, B.VIEW2, B.MASKS1)}

  def show(step, ts):
    ids = checkpointing.to_host(fn(ts["state"], first))
    n = len(ids[B.MASKS1])
    records = [overlay(host[B.VIEW1][:n], host[B.MASKS1][:n])] if B.MASKS1 in host else []
    writer.images(step, "online masks: view1 | records' masks | online view1 | view2",
                  side_by_side(to_uint8(host[B.VIEW1][:n]), *records,
                               *[overlay(host[v][:n], ids[B.key(v, "masks")])
                                 for v in (B.VIEW1, B.VIEW2)]))
  return show


def _train_steps(run: _Run, p: _Progress, step_fn, first: dict, global_batches, source,
                 writer, panel=lambda step, ts: None) -> None:
  """Steps to config.steps or a stop (logging, checkpointing and evaluating as
  configured), then the final checkpoint (each checkpoint step also shows `panel`)."""
  config = run.config
  bar = tqdm(total=config.steps, initial=p.start_step, disable=jax.process_index() != 0,
             unit="step", desc=config.method, dynamic_ncols=True, mininterval=2.0)
  run.cleanup.callback(bar.close)
  batches = itertools.chain([first], global_batches)
  while p.step < config.steps:
    if _stop_requested(run.flag, run.manager, p.step):
      p.status = "preempted"
      break
    batch = next(batches, None)
    if batch is None:          # a stop arrived while waiting for input
      p.status = "preempted"
      break
    p.ts, metrics = step_fn(p.ts, batch)
    batch = None
    if len(p.pending) == 1:
      _drain(run, p)          # the previous step; this one keeps the device busy
    p.pending.append((p.step, metrics))
    p.step += 1
    bar.update(1)
    if p.step % config.log_every_steps == 0 or p.step == config.steps:
      _log(run, p, source, writer, bar)
    every = config.checkpoint.every_steps
    evaluate = evaluate_at(config, p.step)
    if (every and p.step % every == 0) or evaluate:
      _save(run, p, p.step)
      panel(p.step, p.ts)
    if evaluate and p.step < config.steps and not _evaluate_midway(run, p):
      p.status = "preempted"
      break
  if p.last_saved != p.step:
    _save(run, p, p.step)
    if p.status != "preempted":   # a stop exits at once (the panel may still compile)
      panel(p.step, p.ts)
  checkpointing.wait(run.manager, p.step)
  bar.close()


def _drain(run: _Run, p: _Progress):
  """Read back pending metrics (one step behind the device); stop on NaN/inf."""
  out = None
  for s, m in p.pending:
    out = checkpointing.to_host(m)
    loss = float(out["loss"])
    if not np.isfinite(loss):
      checkpointing.wait(run.manager, p.last_saved)
      raise NonFiniteLossError(
          f"Loss is {loss} at step {s} (lr {float(out['lr']):.4g}). Stopped; "
          + diverged_advice(run.workdir, p.last_saved))
    p.losses[s] = loss
  p.pending.clear()
  return out


def _save(run: _Run, p: _Progress, step: int) -> None:
  """Checkpoint the train state at `step`, once its metrics and parameters are finite."""
  _drain(run, p)
  if not checkpointing.all_finite(p.ts["params"]):
    raise NonFiniteLossError(f"Parameters are not finite after step {step - 1}. Stopped; "
                             + diverged_advice(run.workdir, p.last_saved))
  checkpointing.save(run.manager, step, p.ts)
  p.last_saved = step


def _log(run: _Run, p: _Progress, source, writer, bar) -> None:
  """The log interval ending at p.step to TensorBoard and the bar; then the unreadable
  records are judged."""
  config = run.config
  values = _drain(run, p)
  now = time.time()
  step_s = (now - p.t_log) / (p.step - p.log_from)
  values = {k: float(v) for k, v in values.items()}
  values["loss"] = float(np.mean([p.losses[s] for s in range(p.log_from, p.step)]))
  values.update(step_time_s=step_s,
                img_per_s_per_device=config.batch_size / step_s / jax.device_count())
  skipped, read = data_counts(source, config.batch_size // jax.process_count())
  values.update({f"data/{k}": v for k, v in getattr(source, "stats", {}).items()})
  values["data/corrupt_fraction"] = skipped / max(read, 1)
  writer.scalars(p.step, values)
  p.chance = values.get("chance", p.chance)
  bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}")
  p.t_log, p.log_from = now, p.step
  # At the last step the whole run is judged, before its final checkpoint: a run
  # that fails here is not "already trained" on the rerun, which judges it again.
  check_corrupt(config, skipped, read, p.last_saved, final=p.step == config.steps)


def _evaluate_midway(run: _Run, p: _Progress) -> bool:
  """config.eval.evals on the checkpoint just saved at p.step, its time kept out of step
  time and img/s; False when a signal stopped it."""
  t_eval = time.time()
  checkpointing.wait(run.manager, p.step)
  try:
    with run.flag.abortable():   # saved: a signal need not wait for the evaluation
      run_evaluations(run.config, run.workdir, p.step)
  except checkpointing.Interrupted:
    return False
  paused = time.time() - t_eval
  p.t_log, p.eval_s = p.t_log + paused, p.eval_s + paused
  return True


def _summary(run: _Run, p: _Progress, source, setup_s: float, compile_s: float) -> dict:
  """The run's summary: losses of the first and last log intervals, timings, records."""
  config, devices = run.config, jax.device_count()
  wall = time.time() - p.t_run - p.eval_s
  ran = p.step - p.start_step
  ordered = [p.losses[k] for k in sorted(p.losses)]
  window = min(config.log_every_steps, len(ordered)) or 1
  skipped, read = data_counts(source, config.batch_size // jax.process_count())
  return dict(method=config.method, status=p.status, signal=run.flag.signum,
              start_step=p.start_step, step=p.step,
              loss_first=float(np.mean(ordered[:window])) if ordered else None,
              loss_last=float(np.mean(ordered[-window:])) if ordered else None,
              chance=p.chance,
              losses=p.losses, setup_s=setup_s, compile_s=compile_s, wall_s=wall,
              step_time_s=wall / max(ran, 1),
              img_per_s_per_device=config.batch_size * ran / max(wall, 1e-9) / devices,
              records_read=read, records_skipped=skipped,
              checkpoint=os.path.join(run.workdir, checkpointing.CHECKPOINT_DIR, str(p.step)))


def _evaluate_at_end(config, workdir: str, step: int, flag, summary: dict) -> dict:
  """config.eval.evals on the final checkpoint. The run is finished once its result file
  (WORKDIR/eval/step_N.json) is written: a run stopped here exits 128+signal, and the
  rerun (already trained) runs the evaluation."""
  try:
    with flag.abortable():
      summary["eval"] = run_evaluations(config, workdir, step)
  except checkpointing.Interrupted:
    summary["signal"] = flag.signum
    say(f"Evaluation stopped by {signal_name(flag.signum)}; the run is trained and saved. "
        "Rerun the same command to evaluate it (or: python -m detcon_jax.evaluate "
        f"--workdir={workdir}).")
  return summary


def evaluate_at(config, step: int) -> bool:
  """Whether the run evaluates (and keeps) the checkpoint at `step` before its end:
  config.eval.every_steps, config.eval.at_steps."""
  every = config.eval.every_steps
  return bool(every and step % every == 0) or step in tuple(config.eval.get("at_steps", ()))


def diverged_advice(workdir: str, last_saved) -> str:
  """What to do after a NaN/inf: the fix (a lower learning rate, a longer warmup) is a
  config change, so where checkpoints exist it needs a new workdir.

  Why not resume with the lower learning rate: a researcher reads a run's config.json
  (and evaluations and exports rebuild from it) as the config every step was trained
  with, and a resume continues it exactly (check_resumable); a run spliced from two
  learning rates would be described by neither. The inputs and per-step rng are
  deterministic, so the new run in a new workdir is reproducible from its own config."""
  fixes = ("Lower --config.optimizer.base_lr, raise --config.optimizer.warmup_steps, or "
           "check the input data")
  if last_saved is None:   # nothing saved: the same workdir starts over
    return f"nothing was saved. {fixes}, and rerun (the same --workdir starts over)."
  return (f"no checkpoint was written after step {last_saved}. {fixes}, in a new --workdir: "
          f"{workdir} holds checkpoints of this config, and a resume must continue it "
          "unchanged.")


def signal_name(signum) -> str:
  """SIGTERM, SIGINT...: how messages name a signal."""
  return signal.Signals(signum).name


def exit_status(summary: dict) -> int | None:
  """The CLI's exit status: 128 + the signal that stopped the run (143 SIGTERM, 130
  SIGINT, as if it had killed the process, so that schedulers rerun the command,
  which resumes); 143 for a multi-host preemption; None when the run just ended."""
  if summary.get("signal"):
    return 128 + summary["signal"]
  return 128 + signal.SIGTERM if summary["status"] == "preempted" else None


def summary_line(s: dict) -> str:
  """One line for the end of a run."""
  loss = (f"loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} (first/last log interval)"
          if s["loss_first"] is not None else "no steps run")
  if s.get("chance") is not None:   # contrastive methods and SwAV: the loss of a uniform guess
    loss += f", chance {s['chance']:.4f}"
  records = (f"{s['records_skipped']} of {s['records_read']} records read were unreadable "
             "(skipped) | " if s.get("records_read") else "")
  return (f"[{s['method']}] {s['status']}: steps {s['start_step']}->{s['step']} in "
          f"{s['wall_s']:.1f}s (+{s['compile_s']:.1f}s compile) | {s['step_time_s']:.3f} s/step | "
          f"{s['img_per_s_per_device']:.1f} img/s/device | {loss} | {records}"
          f"checkpoint {s['checkpoint']}")

__all__ = ["train", "init_train_state", "make_train_step",
           "NonFiniteLossError", "InputError", "ConfigError", "USER_ERRORS", "records_batches",
           "summary_line", "exit_status"]
