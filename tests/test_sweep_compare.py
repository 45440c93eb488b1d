"""Multi-seed sweeps (detcon_jax.sweep) and their comparison (detcon_jax.compare):
the statistics against scipy.stats, refusals of unpaired roots, a sweep that skips
finished seeds and resumes an interrupted one exactly, evaluations at config.eval.at_steps
(their checkpoints kept, a missing JSON evaluated again). The trainer runs the tiny
objective (test_train_tiny_objective)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from detcon_jax import compare, sweep
from detcon_jax.evaluate import run as eval_run
from detcon_jax.core import writers
from detcon_jax.train import loop
from harness import (ENV, ROOT, TinyObjective, assert_same_state, latest_step, synthetic_batches,
                     tiny_config)

# --- Statistics -------------------------------------------------------------------

X = [0.412, 0.398, 0.431, 0.405, 0.420]
Y = [0.401, 0.385, 0.428, 0.396, 0.402]


def test_mean_and_standard_error_equal_scipy():
  mean, sem = compare.mean_sem(X)
  assert mean == pytest.approx(np.mean(X), abs=1e-15)
  assert sem == pytest.approx(stats.sem(X), rel=1e-12)
  assert np.isnan(compare.mean_sem([0.5])[1])


def test_paired_t_interval_equals_scipy_ttest_rel():
  d, lo, hi = compare.paired_difference(X, Y)
  ci = stats.ttest_rel(X, Y).confidence_interval(0.95)
  assert d == pytest.approx(np.mean(np.subtract(X, Y)), abs=1e-15)
  assert (lo, hi) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
  d2 = np.subtract(X, Y)      # and the textbook formula
  half = stats.t.ppf(0.975, 4) * np.std(d2, ddof=1) / np.sqrt(5)
  assert (lo, hi) == (pytest.approx(d2.mean() - half), pytest.approx(d2.mean() + half))
  assert compare.verdict(lo, hi) == "higher"
  assert compare.verdict(*compare.paired_difference(Y, X)[1:]) == "lower"
  noisy = compare.paired_difference([0.40, 0.42, 0.38], [0.41, 0.40, 0.40])
  assert noisy[1] < 0 < noisy[2] and compare.verdict(*noisy[1:]) == "within noise"
  assert compare.verdict(*compare.paired_difference([0.5], [0.4])[1:]).startswith("n/a")


# --- compare on written results ----------------------------------------------------

def write_root(root, values: dict) -> str:
  """values {seed: {step: {metric: v}}} -> ROOT/seed_N/eval/step_M.json as evaluate writes."""
  for seed, steps in values.items():
    for step, row in steps.items():
      eval_run.write_json(os.path.join(root, f"seed_{seed}", eval_run.EVAL_DIR,
                                       f"step_{step}.json"),
                          {"step": step, "rows": {eval_run.BASELINE: {"knn": 0.1},
                                                  f"step {step}": row}})
  return str(root)


def _values(offset, seeds=(0, 1, 2), steps=(10, 20)):
  return {s: {t: {"knn": 0.3 + offset + 0.01 * s + 0.001 * t, "linear": 0.5 - 0.02 * s}
              for t in steps} for s in seeds}


def test_compare_table_files_and_plot(tmp_path, capsys):
  a = write_root(tmp_path / "simclr", _values(0.0))
  b = write_root(tmp_path / "detcon", _values(0.05))
  c = compare.compare([a, b])
  assert c["seeds"] == [0, 1, 2] and c["steps"] == [10, 20] and c["metrics"] == ["knn", "linear"]
  knn = c["results"]["20"]["detcon"]["knn"]
  assert knn["mean"] == pytest.approx(np.mean([0.3 + 0.05 + 0.01 * s + 0.02 for s in range(3)]))
  assert knn["sem"] == pytest.approx(stats.sem([0.37, 0.38, 0.39]))
  assert knn["difference"]["mean"] == pytest.approx(0.05)
  assert knn["difference"]["verdict"] == "higher"          # the same +0.05 on every seed
  assert c["results"]["20"]["detcon"]["linear"]["difference"]["verdict"] == "within noise"
  assert "difference" not in c["results"]["20"]["simclr"]["knn"]
  table = compare.format_table(c, 20)
  assert "kNN top-1" in table and "+5.0% [+5.0%, +5.0%]" in table and "baseline" in table
  paths = compare.write(c, str(tmp_path / "out"))
  assert [os.path.basename(p) for p in paths] == ["compare.json", "compare.md", "compare.png"]
  assert json.load(open(paths[0]))["results"]["10"]["detcon"]["knn"]["difference"]["verdict"]
  assert "## Step 20" in open(paths[1]).read() and os.path.getsize(paths[2]) > 10_000
  assert any(p.startswith("events") for p in os.listdir(tmp_path / "out" / writers.TB_DIR))
  # The random-init row (the baseline root's, first), with the metrics it was evaluated on.
  assert list(c["results"]["20"]) == [eval_run.BASELINE, "simclr", "detcon"]
  untrained = c["results"]["20"][eval_run.BASELINE]
  assert untrained["knn"]["mean"] == pytest.approx(0.1)
  assert untrained["knn"]["sem"] == pytest.approx(0.0, abs=1e-12)
  assert untrained["knn"]["difference"]["mean"] == pytest.approx(0.1 - np.mean(
      [0.3 + 0.01 * s + 0.02 for s in range(3)]))
  assert np.isnan(untrained["linear"]["mean"]) and "difference" not in untrained["linear"]
  assert "random init" in table and list(compare.compare([a, b], random_init=False)[
      "results"]["20"]) == ["simclr", "detcon"]


def test_steps_to_match_the_baselines_last_figure(tmp_path):
  """DetCon's efficiency claim: the first step whose mean reaches the baseline's last-step
  mean, paired by seed; never reached -> step None."""
  a = write_root(tmp_path / "simclr", _values(0.0))
  b = write_root(tmp_path / "detcon", _values(0.05))
  knn = compare.compare([a, b])["steps_to_match"]["detcon"]["knn"]
  assert knn["step"] == 10 and knn["fewer"] == 2.0
  assert knn["target"] == pytest.approx(0.33)           # simclr's mean at step 20
  assert knn["difference"]["mean"] == pytest.approx(0.04)   # detcon at 10: +0.05 - 0.01
  assert knn["difference"]["verdict"] == "higher"
  assert list(compare.compare([a, b])["steps_to_match"]) == ["detcon"]   # no random init row
  c = compare.compare([b, a])                            # baseline detcon: never reached
  assert c["steps_to_match"]["simclr"]["knn"]["step"] is None
  text = compare.format_table(c, 20)
  assert "simclr, kNN top-1: not reached by step 20 (38.0%)" in text
  assert "detcon, kNN top-1: step 10 (2x fewer steps" in compare.format_table(
      compare.compare([a, b]), 20)
  assert "## Steps to match the baseline" in compare.format_markdown(c)
  one = write_root(tmp_path / "one_step", _values(0.0, steps=(20,)))
  assert "steps_to_match" not in compare.compare([one])


@pytest.mark.parametrize("other,words", [
    (_values(0.05, seeds=(0, 1)), "differ in seeds"),
    (_values(0.05, steps=(10,)), "differ in evaluated steps"),
])
def test_compare_refuses_unpaired_roots(tmp_path, other, words):
  a = write_root(tmp_path / "a", _values(0.0))
  b = write_root(tmp_path / "b", other)
  with pytest.raises(ValueError, match=words):
    compare.compare([a, b])


def test_compare_refuses_a_root_whose_seeds_stopped_at_different_steps(tmp_path):
  values = _values(0.0)
  del values[2][20]                     # seed 2 has not reached its last evaluation
  a = write_root(tmp_path / "a", values)
  with pytest.raises(ValueError, match="seeds were evaluated at different steps"):
    compare.compare([a])


def test_compare_cli_mismatch_is_one_error_line(tmp_path):
  a = write_root(tmp_path / "a", _values(0.0))
  b = write_root(tmp_path / "b", _values(0.0, seeds=(0, 1)))
  proc = subprocess.run([sys.executable, "-m", "detcon_jax.compare", a, b], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: the roots differ in seeds"), proc.stderr
  assert "[0, 1, 2]" in lines[0] and "[0, 1]" in lines[0]


# --- The sweep ------------------------------------------------------------------------

def killing_batches(seed: int, at_step: int):
  """The tiny input; SIGTERM to this process when seed `seed` reaches `at_step` (once)."""
  fired = []
  def source(config, start_step, host_index, host_count):
    def on_step(step):
      if config.seed == seed and step == at_step and not fired:
        fired.append(step)
        os.kill(os.getpid(), signal.SIGTERM)
    return synthetic_batches(on_step=on_step)(config, start_step, host_index, host_count)
  return source


def test_sweep_resumes_an_interrupted_seed_exactly_skips_finished_ones_refuses_others(
    tmp_path, capsys):
  config = tiny_config(steps=12)
  root = str(tmp_path / "sweep")
  run = lambda batches, c=config: sweep.run_sweep(c, [1], root, objective=TinyObjective(),
                                                  batches=batches)
  assert run(killing_batches(seed=1, at_step=8)) == 143          # SIGTERM: saved, stopped
  stopped = latest_step(os.path.join(root, "seed_1"))
  assert 0 < stopped < 12
  capsys.readouterr()
  assert run(synthetic_batches()) is None                        # the rerun resumes
  assert f"Resumed from {os.path.join(root, 'seed_1', 'checkpoints')} at step {stopped}." \
      in capsys.readouterr().out
  assert latest_step(os.path.join(root, "seed_1")) == 12
  loop.train(tiny_config(steps=12, seed=1), str(tmp_path / "ref"), objective=TinyObjective(),
             batches=synthetic_batches())                        # the same seed, uninterrupted
  assert_same_state(os.path.join(root, "seed_1"), tmp_path / "ref")
  last = os.path.getmtime(os.path.join(root, "seed_1", "checkpoints", "12"))
  assert run(synthetic_batches()) is None                        # finished: skipped
  assert "seed 1: finished (" in capsys.readouterr().out
  assert os.path.getmtime(os.path.join(root, "seed_1", "checkpoints", "12")) == last
  with pytest.raises(ValueError, match=r"seed 1 .*config.batch_size=8 \(this run: 4\)"):
    run(synthetic_batches(), tiny_config(steps=12, batch_size=4))


def test_eval_at_steps_keeps_their_checkpoints_and_the_sweep_fills_a_missing_json(
    tmp_path, monkeypatch):
  """config.eval.at_steps: the trainer saves, keeps and evaluates those steps (keep=1
  deletes every other); a JSON lost to an interrupted evaluation is made on the rerun.
  The evaluation itself is recorded here (the tiny objective has no registry entry)."""
  evaluated = []
  def fake_evaluations(config, workdir, step):
    evaluated.append(step)
    eval_run.write_json(sweep.eval_json(workdir, step), {"step": step, "rows": {}})
  monkeypatch.setattr(loop, "run_evaluations", fake_evaluations)
  config = tiny_config(steps=8, **{"eval.at_steps": (3, 5, 8), "checkpoint.keep": 1})
  root = str(tmp_path / "sweep")
  run = lambda: sweep.run_sweep(config, [0], root, objective=TinyObjective(),
                                batches=synthetic_batches())
  assert run() is None and evaluated == [3, 5, 8]
  workdir = os.path.join(root, "seed_0")
  assert sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))
                if p.isdigit()) == [3, 5, 8]
  os.remove(sweep.eval_json(workdir, 5))
  assert run() is None and evaluated == [3, 5, 8, 5]
  assert not sweep.missing_evals(config, workdir)
  assert run() is None and evaluated == [3, 5, 8, 5]          # finished: skipped
