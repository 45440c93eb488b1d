"""Multi-label linear classification, mAP (`--evals=multilabel`; Revisiting A.2, VOC07).

One binary logistic regression per class on standardised pooled frozen features
(scikit-learn, L-BFGS), the L2 constant chosen on a held-out part of the train
split over log-spaced values in [1e-5, 1e5] (linear_probe.l2_grid: 'full' is
the paper's 45, the default every decade), then a refit on the whole train
split and the mean over classes of sklearn's average_precision_score on the
test split. One C is shared by all classes: the one with the best held-out mAP
(a class may have no held-out positive, where its own AP is undefined).

Targets: every class present in the image (data_pipelines.batch.present_classes
of the eval reader's semantic map), so the demo's multi-object scenes are
scored on all their objects instead of the largest one alone.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from detcon_jax.evaluate import linear_probe


def mean_average_precision(targets, scores) -> dict:
  """{'map', 'per_class_ap'}: sklearn's AP per class (NaN where the class has no
  positive), mean over the classes that have one."""
  targets, scores = np.asarray(targets, bool), np.asarray(scores, np.float64)
  ap = np.array([average_precision_score(targets[:, k], scores[:, k]) if targets[:, k].any()
                 else np.nan for k in range(targets.shape[1])])
  return {"map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
          "per_class_ap": ap.tolist()}


def _fit_all(models, x, targets, c):
  """Fit one classifier per class (a class constant in targets gets None: its score is
  that constant)."""
  for k in range(targets.shape[1]):
    if 0 < targets[:, k].sum() < len(targets):
      models[k] = linear_probe._fit(models[k].set_params(C=c), x, targets[:, k])
  return models


def _scores(models, x, targets_train):
  out = np.zeros((len(x), len(models)))
  for k, m in enumerate(models):
    if 0 < targets_train[:, k].sum() < len(targets_train):
      out[:, k] = m.decision_function(x)
    else:
      out[:, k] = float(targets_train[:, k].mean())
  return out


def _new_models(n, seed, warm):
  return [LogisticRegression(solver="lbfgs", max_iter=linear_probe.MAX_ITER, warm_start=warm,
                             random_state=seed) for _ in range(n)]


def multilabel_probe(train_features, train_targets, test_features, test_targets, *,
                     sweep: str | int = "default",
                     holdout_fraction: float = linear_probe.HOLDOUT_FRACTION,
                     seed: int = 0) -> dict:
  """Test mAP of per-class logistic regressions; targets are bool [N, num_classes]."""
  x = np.asarray(train_features, np.float64)
  y = np.asarray(train_targets, bool)
  if not np.asarray(test_targets, bool).any():
    raise ValueError("No test image holds any class: mAP is undefined.")
  grid = linear_probe.l2_grid(sweep)
  fit_x, val_x, fit_y, val_y = train_test_split(x, y, test_size=holdout_fraction,
                                                random_state=seed)
  scaler = StandardScaler().fit(fit_x)
  fit_x, val_x = scaler.transform(fit_x), scaler.transform(val_x)
  models = _new_models(y.shape[1], seed, warm=True)   # strong to weak penalty, warm-started
  val_maps = []
  for c in grid:
    models = _fit_all(models, fit_x, fit_y, c)
    val_maps.append(mean_average_precision(val_y, _scores(models, val_x, fit_y))["map"])
  best = int(np.nanargmax(val_maps))           # ties go to the stronger penalty
  scaler = StandardScaler().fit(x)
  models = _fit_all(_new_models(y.shape[1], seed, warm=False), scaler.transform(x), y, grid[best])
  out = mean_average_precision(test_targets, _scores(models, scaler.transform(test_features), y))
  return {**out, "C": float(grid[best]), "holdout_map": val_maps[best],
          "sweep": f"{len(grid)} values of C in [1e{linear_probe.C_RANGE[0]:g}, "
                   f"1e{linear_probe.C_RANGE[1]:g}]"}
