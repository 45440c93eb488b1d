"""Train one config over several seeds, one workdir each:

  python -m detcon_jax.sweep --config=configs/detcon_s.py:demo --seeds=0,1,2 \
      --root=runs/sweep/detcon_s [--config.KEY=VALUE ...]

Each seed trains in ROOT/seed_N with the same config and overrides, config.seed = N.
`--config.eval.at_steps=100,200,400` also evaluates (and keeps) those checkpoints,
the efficiency curve `python -m detcon_jax.compare` plots. Resumable: a seed whose
checkpoint at config.steps and every evaluation JSON (WORKDIR/eval/step_N.json) exist
is skipped; an interrupted one resumes exactly (the trainer's resume), and an
evaluation that was interrupted is run again from its kept checkpoint. SIGTERM and
SIGINT stop the sweep (the seed in training saves first) with status 143 / 130;
rerunning the same command continues. Seeds run in this process, one after another;
a user error in one (a NaN loss, a config that differs from the stored run's) stops
the sweep in one `error:` line naming the seed.
"""
from __future__ import annotations

import os
import sys

from detcon_jax import cli

SEED_DIR = "seed_{}"


def seed_workdir(root: str, seed: int) -> str:
  return os.path.join(root, SEED_DIR.format(seed))


def eval_steps(config) -> list[int]:
  """The steps whose evaluation JSON a finished run has: config.eval.at_steps, and
  config.steps when config.eval.at_end."""
  steps = set(config.eval.get("at_steps", ()))
  if config.eval.at_end:
    steps.add(int(config.steps))
  return sorted(steps)


def eval_json(workdir: str, step: int) -> str:
  from detcon_jax.evaluate import run as eval_run
  return os.path.join(workdir, eval_run.EVAL_DIR, f"step_{step}.json")


def trained_to(workdir: str) -> int:
  """The newest checkpoint step in workdir (0 for none)."""
  from detcon_jax.core import checkpointing
  path = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  steps = [int(p) for p in os.listdir(path) if p.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=0)


def missing_evals(config, workdir: str) -> list[int]:
  return [s for s in eval_steps(config) if not os.path.exists(eval_json(workdir, s))]


def is_finished(config, workdir: str) -> bool:
  """Trained to config.steps with every evaluation written; a stored run made with
  another config is refused (ConfigError naming the keys), never counted as done."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    return False
  from detcon_jax.core import checkpointing
  from detcon_jax.train import loop
  loop.check_resumable(config, checkpointing.load_config(workdir), workdir)
  return trained_to(workdir) >= config.steps and not missing_evals(config, workdir)


def catch_up_evaluations(config, workdir: str) -> None:
  """Evaluate the kept checkpoints whose JSON is missing (an evaluation stopped by a
  signal, or a run that ended before its final evaluation)."""
  from detcon_jax.errors import WorkdirError
  from detcon_jax.core import checkpointing
  from detcon_jax.train import loop
  for step in missing_evals(config, workdir):
    if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR, str(step))):
      raise WorkdirError(
          f"{workdir} has no checkpoint at step {step} to evaluate (config.eval.at_steps "
          "keeps those it was trained with); use a new --root for other steps.")
    print(f"Evaluating {workdir} at step {step} (its evaluation is missing).", flush=True)
    loop.run_evaluations(config, workdir, step)


def run_sweep(config, seeds, root: str, *, objective=None, batches=None) -> int | None:
  """Train (or resume, or skip) every seed in ROOT/seed_N; returns the exit status of
  a seed stopped by a signal (143 / 130), None when every seed is finished.

  objective / batches: passed to loop.train (tests give the tiny ones).
  """
  from detcon_jax.errors import USER_ERRORS
  from detcon_jax.core import checkpointing
  from detcon_jax.train import loop
  from detcon_jax.core.validation import validate
  if not seeds:
    raise ValueError("--seeds is empty; give seeds as --seeds=0,1,2.")
  validate(config, objective=objective)   # a mistake fails before any seed starts
  done = []
  with checkpointing.PreemptionFlag() as flag:   # a signal between two seeds
    for seed in seeds:
      workdir = seed_workdir(root, seed)
      c = config.copy_and_resolve_references()
      c.seed = int(seed)
      try:
        finished = is_finished(c, workdir)
      except USER_ERRORS as e:
        raise type(e)(f"seed {seed} ({workdir}): {e}") from e
      if finished:
        print(f"seed {seed}: finished ({workdir}), skipped.", flush=True)
        done.append(seed)
        continue
      if flag.is_set():
        break
      print(f"seed {seed}: training {workdir}", flush=True)
      try:
        summary = loop.train(c, workdir, objective=objective, batches=batches)
        status = loop.exit_status(summary)
        if status is not None:
          return status
        with flag.abortable():
          catch_up_evaluations(c, workdir)
      except checkpointing.Interrupted:
        break
      except USER_ERRORS as e:
        raise type(e)(f"seed {seed} ({workdir}): {e}") from e
      done.append(seed)
  if flag.is_set():
    return 128 + flag.signum
  print(f"Sweep {root}: seeds {done} finished. " + (
      f"Compare sweeps with: python -m detcon_jax.compare {root} OTHER_ROOT ..."
      if eval_steps(config) else "No evaluation was asked for (config.eval.at_end, "
      "config.eval.at_steps), so there is nothing for detcon_jax.compare to read."), flush=True)
  return None


def parse_seeds(values) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise ValueError(f"--seeds={','.join(values)}: seeds are integers, e.g. --seeds=0,1,2.") \
        from None
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={','.join(values)}: a seed is repeated.")
  return seeds


def define_flags():
  """The command line's flags (defined only when run as a program: importing this
  module for run_sweep leaves absl's global flags alone)."""
  from absl import flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file(
      "config", None, "configs/<method>.py:<preset>, as for python -m detcon_jax.train.",
      lock_config=True)
  seeds = flags.DEFINE_list("seeds", "0,1,2", "Comma list of seeds (config.seed of each run).")
  root = flags.DEFINE_string("root", None, "Sweep directory: one workdir ROOT/seed_N per seed.")
  flags.mark_flags_as_required(["config", "root"])
  return config, seeds, root


def main(argv, config, seeds, root):
  del argv
  from detcon_jax.errors import USER_ERRORS
  if any(a.startswith("--config.seed=") for a in sys.argv):
    cli.fail("--config.seed: the sweep sets config.seed per run; give the seeds as --seeds=0,1,2.")
  try:
    status = run_sweep(config.value, parse_seeds(seeds.value), root.value)
  except (*USER_ERRORS, ValueError, OSError) as e:
    cli.fail(e)
  if status is not None:
    print("Stopped; rerun the same command to continue the sweep.", file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
  _FLAGS = define_flags()
  cli.run(lambda argv: main(argv, *_FLAGS), _FLAGS[0])
