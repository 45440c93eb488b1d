"""Linear probe: multinomial logistic regression on frozen pooled features.

The protocol of Ericsson et al. as used in Revisiting Contrastive Learning,
appendix A.2: standardised features, softmax cross-entropy with an L2 penalty
fit by L-BFGS (scikit-learn), the penalty chosen on a held-out part of the
train split over log-spaced values, then a refit on the whole train split and
top-1 on the test split. The paper sweeps 45 values in [1e-5, 1e5]
(`sweep="full"`); the default sweep takes every decade of that range (11
values) so the demo stays affordable on a 2-core CPU. The result says which
sweep ran.
"""
from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

SWEEPS = {"full": 45, "default": 11, "quick": 5}
C_RANGE = (-5.0, 5.0)  # log10 of sklearn's C, the inverse L2 strength
HOLDOUT_FRACTION = 0.2
MAX_ITER = 1000
# One BLAS thread: these fits are small matrix products, and multi-threaded
# BLAS on a shared 2-core machine ran them 15x slower (threads spinning).
BLAS_THREADS = 1


def l2_grid(sweep: str | int = "default") -> np.ndarray:
  """The inverse-L2 strengths C to try: `sweep` names an entry of SWEEPS or gives a count."""
  if isinstance(sweep, str):
    if sweep not in SWEEPS:
      raise ValueError(f"Unknown linear-probe sweep {sweep!r}; use one of {sorted(SWEEPS)} "
                       "or a number of values.")
    sweep = SWEEPS[sweep]
  if int(sweep) < 1:
    raise ValueError(f"The linear-probe sweep needs at least one value, got {sweep}.")
  return np.logspace(*C_RANGE, int(sweep))


def _fit(model, x, y):
  with warnings.catch_warnings(), threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
    # Weakly regularised fits may stop at max_iter; the held-out score judges them anyway.
    warnings.simplefilter("ignore", ConvergenceWarning)
    return model.fit(x, y)


def _labelled(features, labels):
  x, y = np.asarray(features, np.float64), np.asarray(labels)
  return x[y >= 0], y[y >= 0]


def fit_probe(train_features, train_labels, *, sweep: str | int = "default",
              holdout_fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> dict:
  """The best-regularised probe refit on the whole train split: {scaler, model, C,
  holdout_top1, sweep}; score() applies it to any test set (one probe, many test sets).

  Unlabelled (-1) examples are left out. The held-out part is stratified by
  class when every class has at least two examples.
  """
  train_x, train_y = _labelled(train_features, train_labels)
  if len(np.unique(train_y)) < 2:
    raise ValueError("The linear probe needs at least two classes among labelled train examples.")
  grid = l2_grid(sweep)

  counts = np.unique(train_y, return_counts=True)[1]
  fit_x, val_x, fit_y, val_y = train_test_split(
      train_x, train_y, test_size=holdout_fraction, random_state=seed,
      stratify=train_y if counts.min() >= 2 else None)
  scaler = StandardScaler().fit(fit_x)
  fit_x, val_x = scaler.transform(fit_x), scaler.transform(val_x)
  # Strong to weak penalty, each fit starting from the previous solution.
  model = LogisticRegression(solver="lbfgs", max_iter=MAX_ITER, warm_start=True, random_state=seed)
  val_scores = [float(_fit(model.set_params(C=c), fit_x, fit_y).score(val_x, val_y))
                for c in grid]
  best = int(np.argmax(val_scores))  # ties go to the stronger penalty (smaller C)

  scaler = StandardScaler().fit(train_x)
  model = LogisticRegression(C=grid[best], solver="lbfgs", max_iter=MAX_ITER, random_state=seed)
  model = _fit(model, scaler.transform(train_x), train_y)
  return {"scaler": scaler, "model": model, "C": float(grid[best]),
          "holdout_top1": val_scores[best],
          "sweep": f"{len(grid)} values of C in [1e{C_RANGE[0]:g}, 1e{C_RANGE[1]:g}]"}


def score(probe: dict, test_features, test_labels) -> float:
  """Top-1 of a fit_probe() probe on labelled test examples."""
  test_x, test_y = _labelled(test_features, test_labels)
  if len(test_y) == 0:
    raise ValueError("No labelled test example (all labels are -1): probe accuracy is undefined.")
  return float(probe["model"].score(probe["scaler"].transform(test_x), test_y))


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 sweep: str | int = "default", holdout_fraction: float = HOLDOUT_FRACTION,
                 seed: int = 0) -> dict:
  """Top-1 test accuracy of the best-regularised probe, with the chosen C and the sweep."""
  if not (np.asarray(test_labels) >= 0).any():
    raise ValueError("No labelled test example (all labels are -1): probe accuracy is undefined.")
  probe = fit_probe(train_features, train_labels, sweep=sweep,
                    holdout_fraction=holdout_fraction, seed=seed)
  return {"top1": score(probe, test_features, test_labels),
          **{k: probe[k] for k in ("C", "holdout_top1", "sweep")}}
