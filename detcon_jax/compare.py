"""Compare multi-seed sweeps: python -m detcon_jax.compare ROOT_A ROOT_B ... [--baseline=ROOT_A]

Reads every seed's evaluation results (ROOT/seed_N/eval/step_M.json, written by
python -m detcon_jax.sweep; nothing is recomputed) and prints one table: per root,
the mean +- standard error over seeds of each metric, and the difference from the
baseline root paired by seed, with its 95% confidence interval (Student's t over
the per-seed differences, n - 1 degrees of freedom) and a verdict: "higher" or
"lower" when the interval excludes 0, else "within noise". Writes compare.json,
compare.md and compare.png (each metric against pretraining step, one line per
root, a band of +- one standard error) into --out (default: the baseline root),
and the same picture to TensorBoard (OUT/tb). Roots whose seeds or evaluated steps
differ are refused in one `error:` line: a paired comparison needs the same seeds,
and a curve the same steps. With several evaluated steps (--config.eval.at_steps), it
also names per row and metric the first step whose mean reaches the baseline's
last-step mean, with that paired difference: DetCon's "x fewer steps" claim.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re

import numpy as np
from scipy import stats

from detcon_jax import cli

CONFIDENCE = 0.95
FILES = ("compare.json", "compare.md", "compare.png")
STATISTICS = (f"mean +- standard error over seeds (sample standard deviation / sqrt(n)); "
              f"difference from the baseline paired by seed, {CONFIDENCE:.0%} confidence "
              "interval from Student's t with n - 1 degrees of freedom; verdict 'higher' or "
              "'lower' when the interval excludes 0, else 'within noise'")


# --- Statistics ----------------------------------------------------------------

def mean_sem(values) -> tuple[float, float]:
  """(mean, standard error of the mean); the error is NaN for one value."""
  x = np.asarray(values, np.float64)
  sem = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
  return float(np.mean(x)), sem


def paired_difference(values, baseline, confidence: float = CONFIDENCE):
  """Mean of values - baseline (paired by position, i.e. by seed) and its t confidence
  interval: (mean, low, high); the interval is NaN for one pair."""
  d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  mean, sem = mean_sem(d)
  if len(d) < 2 or math.isnan(sem):
    return mean, math.nan, math.nan
  half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sem
  return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
  if math.isnan(low) or math.isnan(high):
    return "n/a (needs 2+ seeds)"
  return "higher" if low > 0 else "lower" if high < 0 else "within noise"


# --- Reading the sweeps ----------------------------------------------------------

def read_root(root: str, row: str | None = None) -> dict[int, dict[int, dict[str, float]]]:
  """{seed: {step: {metric: value}}} from ROOT/seed_N/eval/step_M.json: the trained
  network's row, or the row named `row` (e.g. the random-init baseline beside it)."""
  from detcon_jax.evaluate import run as eval_run
  from detcon_jax.sweep import SEED_DIR
  if not os.path.isdir(root):
    raise ValueError(f"{root}: no such sweep root (made by python -m detcon_jax.sweep "
                     "--root=ROOT).")
  pattern = SEED_DIR.format("*")
  out = {}
  for seed_dir in sorted(glob.glob(os.path.join(root, pattern))):
    seed = re.fullmatch(SEED_DIR.format(r"(\d+)"), os.path.basename(seed_dir))
    if not seed:
      continue
    steps = {}
    for path in glob.glob(os.path.join(seed_dir, eval_run.EVAL_DIR, "step_*.json")):
      with open(path) as f:
        results = json.load(f)
      values = results["rows"].get(row or f"step {results['step']}")
      if values is None:
        continue
      steps[int(results["step"])] = {k: math.nan if v is None else float(v)
                                     for k, v in values.items()}
    out[int(seed.group(1))] = steps
  if not any(out.values()):
    raise ValueError(f"{root}: no evaluation results (ROOT/seed_N/eval/step_M.json); run "
                     "python -m detcon_jax.sweep --root=ROOT (with config.eval.at_end or "
                     "--config.eval.at_steps) first.")
  return out


def check_alike(runs: dict[str, dict]) -> tuple[list[int], list[int]]:
  """The seeds and steps every root shares, or ValueError naming what differs."""
  for name, seeds in runs.items():
    steps = {s: sorted(v) for s, v in seeds.items()}
    if len({tuple(v) for v in steps.values()}) > 1:
      raise ValueError(
          f"{name}: its seeds were evaluated at different steps ("
          + ", ".join(f"seed {s}: {v}" for s, v in steps.items())
          + "); finish the sweep (rerun it) before comparing.")
  seeds = {name: sorted(v) for name, v in runs.items()}
  steps = {name: sorted(next(iter(v.values()))) for name, v in runs.items()}
  for what, got, fix in (("seeds", seeds, "rows are paired by seed; sweep every root with "
                                           "the same --seeds"),
                         ("evaluated steps", steps, "sweep every root with the same "
                                                    "--config.eval.at_steps and steps")):
    if len({tuple(v) for v in got.values()}) > 1:
      raise ValueError(f"the roots differ in {what} ("
                       + "; ".join(f"{n}: {v}" for n, v in got.items()) + f"): {fix}.")
  first = next(iter(runs))
  return seeds[first], steps[first]


def row_names(roots) -> dict[str, str]:
  """Short unique names: the roots' last path parts (the whole path where they clash)."""
  names = [os.path.basename(os.path.normpath(r)) for r in roots]
  return {r: (n if names.count(n) == 1 else r) for r, n in zip(roots, names)}


def random_init_run(root: str, seeds, steps) -> dict | None:
  """The random-init row of ROOT's evaluations, as a run: {seed: {step: metrics}}; the
  same untrained network at every step. None where a seed's JSON lacks it."""
  from detcon_jax.evaluate.run import BASELINE
  run = read_root(root, row=BASELINE)
  if any(t not in run.get(s, {}) for s in seeds for t in steps):
    return None
  return run


def compare(roots, baseline: str | None = None, metrics=None,
            random_init: bool = True) -> dict:
  """The comparison as a dict (compare.json): per step, row and metric the seeds' values,
  mean, sem and the paired difference from the baseline. random_init: add the
  baseline root's random-init row first (the untrained network, where it was evaluated)."""
  if not roots:
    raise ValueError("no roots given: python -m detcon_jax.compare ROOT_A ROOT_B ...")
  names = row_names(roots)
  baseline = roots[0] if baseline is None else baseline
  match = [r for r in roots if os.path.normpath(r) == os.path.normpath(baseline)]
  if not match:
    raise ValueError(f"--baseline={baseline}: not one of the roots {list(roots)}.")
  base = names[match[0]]
  runs = {names[r]: read_root(r) for r in roots}
  seeds, steps = check_alike(runs)
  have = [set.intersection(*(set(runs[n][s][t]) for s in seeds for t in steps)) for n in runs]
  untrained = random_init_run(match[0], seeds, steps) if random_init else None
  if untrained is not None:
    from detcon_jax.evaluate.run import BASELINE
    runs = {BASELINE: untrained, **runs}
  common = set.intersection(*have)
  if metrics:
    missing = [m for m in metrics if m not in common]
    if missing:
      raise ValueError(f"--metrics: {missing} not in every root's results; they share "
                       f"{sorted(common)}.")
  else:
    from detcon_jax.evaluate.run import EVALUATIONS
    metrics = sorted(common, key=lambda m: (list(EVALUATIONS).index(m)
                                            if m in EVALUATIONS else len(EVALUATIONS), m))
  if not metrics:
    raise ValueError("the roots share no metric; evaluate them with the same config.eval.evals.")
  results = {}
  for step in steps:
    per_row = results[str(step)] = {}
    for name, run in runs.items():
      per_row[name] = {}
      for m in metrics:
        values = [run[s][step].get(m, math.nan) for s in seeds]
        mean, sem = mean_sem(values)
        entry = {"values": values, "mean": mean, "sem": sem}
        if name != base and not math.isnan(mean):
          d, lo, hi = paired_difference(values, [runs[base][s][step][m] for s in seeds])
          entry["difference"] = {"mean": d, "ci": [lo, hi], "verdict": verdict(lo, hi)}
        per_row[name][m] = entry
  out = {"roots": {names[r]: os.path.abspath(r) for r in roots}, "baseline": base,
         "seeds": seeds, "steps": steps, "metrics": list(metrics),
         "confidence": CONFIDENCE, "statistics": STATISTICS, "results": results}
  if len(steps) > 1:
    out["steps_to_match"] = steps_to_match(runs, base, seeds, steps, metrics)
  return out


def steps_to_match(runs: dict, base: str, seeds, steps, metrics) -> dict:
  """{row: {metric: ...}}: the first evaluated step at which a trained row's mean reaches the
  baseline's mean at the last step (every metric here is higher-is-better), its paired
  difference from that figure with the CI and verdict, and last / step ("x fewer steps":
  DetCon's efficiency claim); step None where no evaluated step reaches it."""
  from detcon_jax.evaluate.run import BASELINE
  last = steps[-1]
  out = {}
  for name, run in runs.items():
    if name in (base, BASELINE):
      continue
    out[name] = {}
    for m in metrics:
      target = [runs[base][s][last][m] for s in seeds]
      entry = {"step": None, "target": mean_sem(target)[0]}
      for step in steps:
        values = [run[s][step].get(m, math.nan) for s in seeds]
        if mean_sem(values)[0] >= entry["target"]:
          d, lo, hi = paired_difference(values, target)
          entry.update(step=step, fewer=last / step, difference={
              "mean": d, "ci": [lo, hi], "verdict": verdict(lo, hi)})
          break
      out[name][m] = entry
  return out


def format_steps_to_match(c: dict) -> list[str]:
  """One line per row and metric: where the row reaches the baseline's last-step figure."""
  if "steps_to_match" not in c:
    return []
  last = c["steps"][-1]
  lines = [f"steps to reach {c['baseline']}'s step-{last} mean (paired difference from it):"]
  for name, by_metric in c["steps_to_match"].items():
    for m, e in by_metric.items():
      f, fs = _fmt(m), _fmt(m, signed=True)
      if e["step"] is None:
        lines.append(f"  {name}, {_title(m)}: not reached by step {last} ({f(e['target'])})")
        continue
      d = e["difference"]
      lines.append(f"  {name}, {_title(m)}: step {e['step']} ({e['fewer']:.3g}x fewer steps; "
                   f"reaches {f(e['target'])}: {fs(d['mean'])} [{fs(d['ci'][0])}, "
                   f"{fs(d['ci'][1])}], {d['verdict']})")
  return lines


# --- Output ---------------------------------------------------------------------

def _fmt(metric: str, signed: bool = False):
  from detcon_jax.evaluate.run import EVALUATIONS
  fmt = EVALUATIONS[metric].fmt if metric in EVALUATIONS else "{:.4g}"
  fmt = fmt.replace("{:+", "{:")
  fmt = fmt.replace("{:", "{:+") if signed else fmt
  return lambda v: "-" if v is None or math.isnan(v) else fmt.format(v)


def _title(metric: str) -> str:
  from detcon_jax.evaluate.run import EVALUATIONS
  return EVALUATIONS[metric].title if metric in EVALUATIONS else metric


def table_rows(c: dict, step: int) -> list[list[str]]:
  """[metric, row, mean +- se, difference [CI], verdict] per metric and row."""
  out = []
  for m in c["metrics"]:
    f, fs = _fmt(m), _fmt(m, signed=True)
    for i, (name, row) in enumerate(c["results"][str(step)].items()):
      e = row[m]
      diff, why = "baseline", ""
      if "difference" in e:
        d = e["difference"]
        diff = f"{fs(d['mean'])} [{fs(d['ci'][0])}, {fs(d['ci'][1])}]"
        why = d["verdict"]
      out.append([_title(m) if i == 0 else "", name, f"{f(e['mean'])} +- {f(e['sem'])}",
                  diff, why])
  return out


HEADER = ["metric", "row", "mean +- s.e.", "difference [95% CI]", "verdict"]


def format_table(c: dict, step: int) -> str:
  rows = [HEADER] + table_rows(c, step)
  widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
  lines = [f"step {step}, seeds {c['seeds']}, baseline {c['baseline']} "
           f"({len(c['seeds'])} paired differences per row)"]
  lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
  return "\n".join(lines + format_steps_to_match(c))


def format_markdown(c: dict) -> str:
  lines = [f"# Comparison of {', '.join(c['roots'])}", "",
           f"Seeds {c['seeds']}; baseline `{c['baseline']}`. Statistics: {c['statistics']}.", ""]
  for name, path in c["roots"].items():
    lines.append(f"- `{name}`: {path}")
  for step in reversed(c["steps"]):
    lines += ["", f"## Step {step}", "", "| " + " | ".join(HEADER) + " |",
              "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(c, step)]
  match = format_steps_to_match(c)
  if match:
    lines += ["", "## Steps to match the baseline", ""] + [f"- {l.strip()}" for l in match[1:]]
  return "\n".join(lines) + "\n"


def plot(c: dict):
  """Each metric against pretraining step: a line per root, a band of +- one s.e."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metrics = c["metrics"]
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
  steps = np.asarray(c["steps"])
  for ax, m in zip(axes[0], metrics):
    for name in c["results"][str(c["steps"][0])]:
      mean = np.asarray([c["results"][str(s)][name][m]["mean"] for s in steps])
      sem = np.nan_to_num(np.asarray([c["results"][str(s)][name][m]["sem"] for s in steps]))
      line, = ax.plot(steps, mean, marker="o", label=name)
      ax.fill_between(steps, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
    ax.set_title(_title(m))
    ax.set_xlabel("pretraining step")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize="small")
  fig.suptitle(f"mean +- standard error over seeds {c['seeds']}", fontsize="medium")
  fig.tight_layout()
  return fig


def write(c: dict, out: str) -> list[str]:
  """compare.json, compare.md, compare.png in out, and the picture to TensorBoard OUT/tb."""
  from detcon_jax.evaluate.run import _jsonable
  from detcon_jax.core import writers
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f) for f in FILES]
  with open(paths[0], "w") as f:
    json.dump(_jsonable(c), f, indent=1)
  with open(paths[1], "w") as f:
    f.write(format_markdown(c))
  fig = plot(c)
  fig.savefig(paths[2], dpi=100)
  fig.canvas.draw()
  picture = np.asarray(fig.canvas.buffer_rgba())[None, ..., :3].copy()
  writer = writers.TensorBoard(out)
  try:
    writer.images(c["steps"][-1], "compare/metrics against pretraining step", picture)
  finally:
    writer.close()
  return paths


def define_flags():
  """The command line's flags (only when run as a program, as sweep.define_flags)."""
  from absl import flags
  return (flags.DEFINE_string("baseline", None, "The root the others are compared with "
                              "(default: the first)."),
          flags.DEFINE_list("metrics", None, "Metrics (evaluation names: knn, linear, "
                            "retrieval, ...; default: every one all roots have)."),
          flags.DEFINE_string("out", None, "Where compare.json/.md/.png and tb/ go "
                              "(default: the baseline root)."),
          flags.DEFINE_bool("random_init", True, "Add the random-init row (the untrained "
                            "network, from the baseline root's evaluations) first."))


def main(argv, baseline, metrics, out, random_init):
  roots = argv[1:]
  try:
    c = compare(roots, baseline.value, metrics.value, random_init.value)
    print(format_table(c, c["steps"][-1]), flush=True)
    paths = write(c, out.value or c["roots"][c["baseline"]])
  except (ValueError, OSError) as e:
    cli.fail(e)
  print(f"statistics: {STATISTICS}")
  print(f"wrote {', '.join(paths)}; plot: {paths[2]} (also in TensorBoard: "
        f"{os.path.join(os.path.dirname(paths[2]), 'tb')})")


if __name__ == "__main__":
  _FLAGS = define_flags()
  cli.run(lambda argv: main(argv, *_FLAGS), positional=True)
