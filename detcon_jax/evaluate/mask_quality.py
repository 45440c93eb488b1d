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
