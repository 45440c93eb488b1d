"""Mask quality: Average Best Overlap (ABO) of ground-truth instances (DetCon, Figure 7).

For every ground-truth instance, the best IoU over the segments of a mask
source in the same image; the mean over all instances of all images. DetCon
finds that downstream quality follows ABO, so this tells users which stored
masks (FH settings, grids, ...) are worth pretraining with. It depends only on
the data, not on a model. Every id of a source's map is a segment (sources
partition the image); id 0 of the instance map is background, not an instance.
"""
from __future__ import annotations

import numpy as np


def best_overlaps(instances: np.ndarray, segments: np.ndarray) -> np.ndarray:
  """Best IoU [num_instances] of each instance of one image ([H, W] id maps)."""
  if instances.shape != segments.shape:
    raise ValueError(f"instance map {instances.shape} and segment map {segments.shape} differ.")
  inst_ids, inst = np.unique(instances, return_inverse=True)
  seg_ids, seg = np.unique(segments, return_inverse=True)
  inter = np.bincount(inst.ravel() * len(seg_ids) + seg.ravel(),
                      minlength=len(inst_ids) * len(seg_ids)).reshape(len(inst_ids), len(seg_ids))
  union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
  best = (inter / union).max(1)
  return best[inst_ids != 0]


def batch_best_overlaps(instances: np.ndarray, segments: np.ndarray,
                        max_table: int = 1 << 24) -> np.ndarray:
  """Best IoU of every instance of a batch ([B, H, W] maps), all images at once.

  One bincount over (image, instance id, segment id) when the ids are small
  enough for a dense table; otherwise per image with np.unique (ids are
  global to the source image and may reach 65535).
  """
  instances, segments = np.asarray(instances, np.int64), np.asarray(segments, np.int64)
  if instances.shape != segments.shape:
    raise ValueError(f"instance maps {instances.shape} and segment maps {segments.shape} differ.")
  if instances.size == 0:
    return np.zeros(0)
  b, n_inst, n_seg = len(instances), int(instances.max()) + 1, int(segments.max()) + 1
  if instances.min() < 0 or segments.min() < 0 or b * n_inst * n_seg > max_table:
    return np.concatenate([best_overlaps(i, s) for i, s in zip(instances, segments)])
  image = np.arange(b)[:, None, None]
  inter = np.bincount(((image * n_inst + instances) * n_seg + segments).ravel(),
                      minlength=b * n_inst * n_seg).reshape(b, n_inst, n_seg)
  inst_area, seg_area = inter.sum(2), inter.sum(1)
  union = inst_area[:, :, None] + seg_area[:, None, :] - inter
  best = (inter / np.maximum(union, 1)).max(2)                   # [B, n_inst]
  present = inst_area > 0
  present[:, 0] = False                                         # 0 is background
  return best[present]


def average_best_overlap(instances: np.ndarray, segments: np.ndarray) -> dict:
  """ABO over a batch ([B, H, W] maps), with counts so results can be merged across batches.

  Returns {"abo", "num_instances", "mean_segments", "num_images"}; abo is NaN
  when there is no instance.
  """
  overlaps = batch_best_overlaps(instances, segments)
  segments = np.asarray(segments)
  return {"abo": float(overlaps.mean()) if overlaps.size else float("nan"),
          "num_instances": int(overlaps.size),
          "mean_segments": float(np.mean([len(np.unique(s)) for s in segments]))
                           if len(segments) else float("nan"),
          "num_images": int(len(segments))}


def merge(results: list[dict]) -> dict:
  """Combine per-batch results of average_best_overlap into one, weighting by counts."""
  n_inst = sum(r["num_instances"] for r in results)
  n_img = sum(r["num_images"] for r in results)
  return {"abo": sum(r["abo"] * r["num_instances"] for r in results if r["num_instances"]) / n_inst
                 if n_inst else float("nan"),
          "num_instances": n_inst,
          "mean_segments": sum(r["mean_segments"] * r["num_images"] for r in results if r["num_images"]) / n_img
                           if n_img else float("nan"),
          "num_images": n_img}


# --- Saliency quality against a ground-truth foreground ------------------------
# The salient-object-detection measures (as in pysodmetrics / the SOD literature):
# MAE = mean |S - G| per image; max F-beta: per threshold t of the 8-bit map,
# precision and recall of S >= t per image, F = (1 + b2) P R / (b2 P + R) with
# b2 = 0.3, averaged over images, then the best t; AUC: per-image ROC area,
# P(S_fg > S_bg) + P(S_fg = S_bg) / 2 on the 8-bit values. Images whose
# foreground is empty or full have no ROC/recall and are left out (counted).
BETA2 = 0.3
LEVELS = 256


def saliency_quality(saliency: np.ndarray, foreground: np.ndarray, beta2: float = BETA2) -> dict:
  """Sums over a batch ([B, H, W] saliency in [0, 1], boolean foreground), mergeable
  with merge_saliency; summarize_saliency turns them into MAE, max F, AUC."""
  sal = np.asarray(saliency, np.float64)
  fg = np.asarray(foreground, bool)
  if sal.shape != fg.shape or sal.ndim != 3:
    raise ValueError(f"saliency {sal.shape} and foreground {fg.shape} must both be [B, H, W].")
  q = np.clip(np.round(sal * (LEVELS - 1)), 0, LEVELS - 1).astype(np.int64)
  out = {"mae_sum": 0.0, "f_sum": np.zeros(LEVELS), "auc_sum": 0.0, "num_images": 0,
         "num_skipped": 0}
  for s, g, qi in zip(sal, fg, q):
    n_fg = int(g.sum())
    if n_fg == 0 or n_fg == g.size:
      out["num_skipped"] += 1
      continue
    hf = np.bincount(qi[g], minlength=LEVELS).astype(np.float64)
    hb = np.bincount(qi[~g], minlength=LEVELS).astype(np.float64)
    tp, fp = np.cumsum(hf[::-1])[::-1], np.cumsum(hb[::-1])[::-1]     # S >= t
    precision = np.divide(tp, tp + fp, out=np.zeros(LEVELS), where=tp + fp > 0)
    recall = tp / n_fg
    denom = beta2 * precision + recall
    out["f_sum"] += np.divide((1 + beta2) * precision * recall, denom, out=np.zeros(LEVELS),
                              where=denom > 0)
    below = np.concatenate([[0.0], np.cumsum(hb)[:-1]])              # bg strictly below t
    out["auc_sum"] += float((hf * (below + 0.5 * hb)).sum() / (n_fg * (g.size - n_fg)))
    out["mae_sum"] += float(np.abs(s - g).mean())
    out["num_images"] += 1
  return out


def merge_saliency(parts: list[dict]) -> dict:
  total = {"mae_sum": 0.0, "f_sum": np.zeros(LEVELS), "auc_sum": 0.0, "num_images": 0,
           "num_skipped": 0}
  for p in parts:
    for k in total:
      total[k] = total[k] + p[k]
  return total


def summarize_saliency(sums: dict) -> dict:
  """{'mae', 'max_f', 'max_f_threshold', 'auc', 'num_images', 'num_skipped'}."""
  n = sums["num_images"]
  if not n:
    return {"mae": float("nan"), "max_f": float("nan"), "max_f_threshold": float("nan"),
            "auc": float("nan"), "num_images": 0, "num_skipped": sums["num_skipped"]}
  f = sums["f_sum"] / n
  return {"mae": sums["mae_sum"] / n, "max_f": float(f.max()),
          "max_f_threshold": float(np.argmax(f) / (LEVELS - 1)), "auc": sums["auc_sum"] / n,
          "num_images": n, "num_skipped": sums["num_skipped"]}


def best_overlaps_any(instances: np.ndarray, segment_maps) -> np.ndarray:
  """Best IoU of each instance of a batch over the segments of several maps at once
  (a proposal set drawn from several levels or scales): the max over the maps."""
  return np.max([batch_best_overlaps(instances, s) for s in segment_maps], axis=0)
