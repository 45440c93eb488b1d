"""The method-agnostic training loop.

Sections, in order: validate -> data -> objective and optimiser -> init or
resume -> compile -> loop (step, log, checkpoint, preemption) -> summary ->
evaluation. The objective is looked up by config.method and the trainer knows
nothing method-specific: the train state and step are in state.py, the
writers in writers.py.

Exact resume: the train state is checkpointed whole, the data iterator is
restarted at the checkpoint's step (the input pipeline is deterministic in
(seed, step)) and the per-step rng is fold_in(rng(seed), step).
"""
from __future__ import annotations

import collections
import functools
import itertools
import os
import time
from typing import Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from configs.common import ConfigError, validate
from data_pipelines import batch as B
from detcon_jax.objectives import registry
from detcon_jax.train import checkpointing, sharding, writers
from detcon_jax.train.state import init_train_state, make_optimizer, make_train_step

TB_DIR = writers.TB_DIR
# BatchSource(config, start_step, host_index, host_count) -> iterator of host batches.
BatchSource = Callable[..., Iterator[dict]]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the run stopped without writing a checkpoint."""


# --- Data ------------------------------------------------------------------

def records_batches(config, start_step: int, host_index: int, host_count: int, views=None):
  """The real input: this host's slice of the global batch from config.data.records_dir,
  with the views the objective asks for (default: config.method's)."""
  from data_pipelines import input as data_input
  views = registry.get_objective(config.method).views(config) if views is None else views
  return data_input.train_iterator(
      config.data.records_dir, batch_size=config.batch_size // host_count, views=views,
      mask_source=config.data.mask_source, num_masks=config.loss.num_masks,
      seed=config.seed, start_step=start_step, host_index=host_index, host_count=host_count,
      shuffle_window=config.data.shuffle_buffer)


def ensure_records(config) -> None:
  """Build the embedded demo records when config.data.build_demo and they are missing."""
  if config.data.get("build_demo", False):
    from data_pipelines import build
    build.ensure_demo_records(config.data.records_dir)


def _on_mesh(host_batches: Iterator[dict], mesh, prefetch: int = 2):
  """Host batches -> global arrays, `prefetch` batches ahead of the step."""
  queue = collections.deque()
  def fill(n):
    for b in itertools.islice(host_batches, n):
      queue.append(sharding.host_batch_to_global(b, mesh))
  fill(prefetch)
  while queue:
    yield queue.popleft()
    fill(1)


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


# Keys that fix the shapes of the checkpointed state: a resumed run must match.
STATE_KEYS = ("method", "model", "head")


def check_resumable(config, stored, workdir: str) -> None:
  """A clear error instead of a shape mismatch deep inside the checkpoint restore."""
  for key in STATE_KEYS:
    new, old = config[key], stored[key]
    new, old = (x.to_dict() if hasattr(x, "to_dict") else x for x in (new, old))
    if new != old:
      raise ConfigError(f"{workdir} holds a run with config.{key}={old!r}, but this run has "
                        f"{new!r}; use a new --workdir, or the same config.{key} to resume.")


def train(config, workdir: str, *, objective=None, batches: BatchSource | None = None) -> dict:
  """Train (or resume) config in workdir; returns a summary dict.

  objective / batches default to the registry entry for config.method and the
  TFRecord input pipeline; tests pass small ones.
  """
  t_start = time.time()
  # Validate before touching data or compiling anything.
  objective = registry.get_objective(config.method) if objective is None else objective
  validate(config, device_count=jax.device_count(), process_count=jax.process_count(),
           objective=objective)
  primary = jax.process_index() == 0
  workdir = checkpointing.resolve_workdir(workdir)
  manager = checkpointing.make_manager(workdir, config.checkpoint.keep)
  start_step = manager.latest_step() or 0
  if start_step:
    check_resumable(config, checkpointing.load_config(workdir), workdir)
  if primary:
    checkpointing.save_config(workdir, config)

  mesh = sharding.make_mesh()
  tx, schedule = make_optimizer(objective, config)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if start_step >= config.steps:
    manager.close()
    say(f"{workdir} is already trained to step {start_step} (config.steps={config.steps}); "
        "nothing to do. Raise --config.steps to train further.")
    return dict(method=config.method, status="done", start_step=start_step, step=start_step,
                losses={}, checkpoint=os.path.join(workdir, checkpointing.CHECKPOINT_DIR,
                                                   str(start_step)))

  # Data first: a missing mask field or records dir fails here, before compiling.
  if batches is None:
    ensure_records(config)
    batches = functools.partial(records_batches, views=objective.views(config))
  try:   # checks the records against the config: manifest, mask source, shards per host
    host_batches = batches(config, start_step, jax.process_index(), jax.process_count())
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config.data (records_dir={config.data.records_dir!r}): {e}") from e
  host_iter = iter(host_batches)
  first_host = next(host_iter)
  global_batches = _on_mesh(itertools.chain([first_host], host_iter), mesh)
  first = next(global_batches)

  replicated = sharding.replicated(mesh)
  init = jax.jit(lambda rng, b: init_train_state(objective, tx, config, rng, b),
                 out_shardings=replicated)
  if start_step:
    abstract = checkpointing.abstract_with_sharding(jax.eval_shape(init, init_rng, first),
                                                    replicated)
    ts, _ = checkpointing.restore(manager, abstract, start_step)
    say(f"Resumed from {manager.directory} at step {start_step}.")
  else:
    ts = init(init_rng, first)

  setup_s = time.time() - t_start
  t = time.time()
  step_fn = jax.jit(make_train_step(objective, tx, schedule, config, train_rng),
                    in_shardings=(replicated, sharding.batch_sharded(mesh)),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  step_fn = step_fn.lower(ts, first).compile()
  compile_s = time.time() - t
  say(f"{config.method}: {jax.device_count()} x {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} host(s), global batch {config.batch_size}; "
      f"set up in {setup_s:.1f}s, compiled in {compile_s:.1f}s; "
      f"TensorBoard: {os.path.join(workdir, TB_DIR)}")

  writer = writers.make_writer(workdir, primary)
  if not start_step and B.MASKS1 in first_host:   # what the masks look like after augmentation
    from detcon_jax.evaluate.visualize import view_mask_overlay_images
    writer.images(0, "input/views with masks", view_mask_overlay_images(first_host))
  losses: dict[int, float] = {}
  status, last_saved = "done", start_step if start_step else None
  pending = []   # (step, device metrics) dispatched but not yet read back

  def drain():
    """Read back pending metrics (one step behind the device); stop on NaN/inf."""
    out = None
    for s, m in pending:
      out = checkpointing.to_host(m)
      loss = float(out["loss"])
      if not np.isfinite(loss):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"Loss is {loss} at step {s} (lr {float(out['lr']):.4g}). Stopped; no checkpoint "
            f"was written after step {last_saved}. Lower --config.optimizer.base_lr, raise "
            "--config.optimizer.warmup_steps, or check the input data.")
      losses[s] = loss
    pending.clear()
    return out

  def save(step):
    nonlocal last_saved
    drain()
    if not checkpointing.all_finite(ts["params"]):
      raise NonFiniteLossError(f"Parameters are not finite after step {step - 1}; "
                               "no checkpoint written. Lower --config.optimizer.base_lr.")
    checkpointing.save(manager, step, ts)
    last_saved = step

  step = start_step
  devices = jax.device_count()
  t_run = t_log = time.time()
  eval_s = 0.0
  log_from = step
  bar = tqdm(total=config.steps, initial=start_step, disable=not primary, unit="step",
             desc=config.method, dynamic_ncols=True, mininterval=2.0)
  try:
    with checkpointing.PreemptionFlag(install=jax.process_count() == 1) as flag:
      batch = first
      while step < config.steps:
        if _stop_requested(flag, manager, step):
          status = "preempted"
          break
        if batch is None:
          batch = next(global_batches)
        ts, metrics = step_fn(ts, batch)
        batch = None
        if len(pending) == 1:
          drain()                 # the previous step; this one keeps the device busy
        pending.append((step, metrics))
        step += 1
        bar.update(1)
        if step % config.log_every_steps == 0 or step == config.steps:
          values = drain()
          now = time.time()
          step_s = (now - t_log) / (step - log_from)
          values = {k: float(v) for k, v in values.items()}
          values["loss"] = float(np.mean([losses[s] for s in range(log_from, step)]))
          values.update(step_time_s=step_s,
                        img_per_s_per_device=config.batch_size / step_s / devices)
          values.update({f"data/{k}": v for k, v in getattr(host_batches, "stats", {}).items()})
          writer.scalars(step, values)
          bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.3g}")
          t_log, log_from = now, step
        every = config.checkpoint.every_steps
        eval_every = config.eval.every_steps
        if (every and step % every == 0) or (eval_every and step % eval_every == 0):
          save(step)
        if eval_every and step % eval_every == 0 and step < config.steps:
          t_eval = time.time()
          manager.wait_until_finished()
          writers.run_evaluations(config, workdir, step)
          paused = time.time() - t_eval     # kept out of step time and img/s
          t_log, eval_s = t_log + paused, eval_s + paused
      if last_saved != step:
        save(step)
      manager.wait_until_finished()
  finally:
    bar.close()
    writer.close()
    manager.close()

  wall = time.time() - t_run - eval_s
  ran = step - start_step
  ordered = [losses[k] for k in sorted(losses)]
  window = min(config.log_every_steps, len(ordered)) or 1
  summary = dict(method=config.method, status=status, start_step=start_step, step=step,
                 loss_first=float(np.mean(ordered[:window])) if ordered else None,
                 loss_last=float(np.mean(ordered[-window:])) if ordered else None,
                 losses=losses, setup_s=setup_s, compile_s=compile_s, wall_s=wall,
                 step_time_s=wall / max(ran, 1),
                 img_per_s_per_device=config.batch_size * ran / max(wall, 1e-9) / devices,
                 checkpoint=os.path.join(workdir, checkpointing.CHECKPOINT_DIR, str(step)))
  say(summary_line(summary))
  if status == "done" and config.eval.at_end:
    summary["eval"] = writers.run_evaluations(config, workdir, step)
  return summary


def summary_line(s: dict) -> str:
  """One line for the end of a run."""
  loss = (f"loss {s['loss_first']:.4f} -> {s['loss_last']:.4f} (first/last log interval)"
          if s["loss_first"] is not None else "no steps run")
  return (f"[{s['method']}] {s['status']}: steps {s['start_step']}->{s['step']} in "
          f"{s['wall_s']:.1f}s (+{s['compile_s']:.1f}s compile) | {s['step_time_s']:.3f} s/step | "
          f"{s['img_per_s_per_device']:.1f} img/s/device | {loss} | checkpoint {s['checkpoint']}")


__all__ = ["train", "init_train_state", "make_train_step",
           "NonFiniteLossError", "ConfigError", "records_batches", "summary_line"]
