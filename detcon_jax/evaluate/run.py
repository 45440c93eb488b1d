"""Evaluate a checkpoint beside its random-init baseline: registry, table, JSON, TensorBoard.

A pretraining run is only worth what its representation measures, and a number
means little without the same architecture at random initialisation beside it.
`evaluate_workdir` loads the encoder of a training workdir, runs the requested
evaluations for the checkpoint and for a seed-fixed random init (cached in
WORKDIR/eval/random_init.json, recomputed when data or settings change), prints
a table, and writes WORKDIR/eval/step_N.json plus TensorBoard scalars and
retrieval pictures under WORKDIR/tb/eval (and tb/eval_random_init, so the two
lines share a chart).

Four kinds of evaluation share the registry: model evaluations are pure
functions of frozen features and labels, run once per model row; fine-tuning
evaluations (seg_finetune) train the whole network from each row's variables
on images read once for all rows; data
evaluations (mask quality) depend only on the records; state evaluations
(grounding: Grad-CAM of query/key matching) need the whole train state, heads
and key network included, so they have no random-init row.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Callable

import jax
import numpy as np

from data_pipelines import batch as B
from detcon_jax.evaluate import features as F
from detcon_jax.evaluate import (background_robustness, finetune, gradcam, knn, linear_probe,
                                 mask_quality)
from detcon_jax.evaluate import multilabel, retrieval, segmentation
from detcon_jax.evaluate import visualize
from detcon_jax.models.resnet import STRIDE, output_stride

EVAL_DIR = "eval"
TB_DIR = os.path.join("tb", "eval")
BASELINE = "random init"
BASELINE_FILE = "random_init.json"
NUM_PICTURES = 4


@dataclasses.dataclass(frozen=True)
class Settings:
  """Knobs of the evaluations; the defaults follow the papers where affordable."""
  batch_size: int = 128
  image_size: int | None = None            # None: the records' size, down to a multiple of the stride
  seed: int = 0                            # random-init baseline and K-means seeds
  knn_k: int = knn.K
  knn_temperature: float = knn.TEMPERATURE
  linear_sweep: str = "default"            # "full": the paper's 45 values
  retrieval_k: int = retrieval.K
  retrieval_resolution: int | None = None  # None: image_size // 8 (the paper's 64 x 64 at 512)
  retrieval_dilated: bool = True           # last stage stride 1, dilation 2 (the paper's A.7)
  mask_split: str = "train"                # the split whose masks pretraining uses
  seg_linear_epochs: int = segmentation.EPOCHS
  finetune_preset: str = "demo"            # finetune.PRESETS: demo | paper
  finetune_schedule: str = "detcon"        # finetune.SCHEDULES: detcon (A.4) | revisiting (A.3)
  finetune_dilation: int = finetune.HEAD_DILATION   # 1: the Cityscapes head
  finetune_steps: int | None = None        # None: the preset's epochs over the train split


@dataclasses.dataclass(frozen=True)
class ModelEvaluation:
  """run(train, test, settings, num_classes) on dicts of features + batch arrays -> results."""
  title: str
  metric: str
  fmt: str
  needs: tuple[str, ...]
  run: Callable[..., dict]
  describe: Callable[[Settings], str]
  # (model, variables_by_name, records_dir, settings, num_classes) -> ({name: {key: test
  # features}}, picture): features of other test images (background's variants), merged
  # into `test` before run().
  extra_test: Callable[..., tuple] | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneEvaluation:
  """run(model, variables, records_dir, settings, num_classes, data) -> results: trains
  the whole network from one row's variables (data: the splits, read once for all rows)."""
  title: str
  metric: str
  fmt: str
  needs: tuple[str, ...]
  run: Callable[..., dict]
  describe: Callable[[Settings], str]
  load: Callable[..., dict]                # (records_dir, settings) -> data


@dataclasses.dataclass(frozen=True)
class DataEvaluation:
  """run(records_dir, manifest, settings, image_size) -> results; independent of the model."""
  title: str
  run: Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class StateEvaluation:
  """run(config, train_state, records_dir, settings) -> results with `metric`: needs the
  whole trained network (heads, key network), so it has no random-init row."""
  title: str
  metric: str
  fmt: str
  run: Callable[..., dict]


def _gradcam(config, train_state, records_dir, s):
  """Grounding IoU against the GT foreground, or against the saliency without GT."""
  from data_pipelines import input as data_input
  from data_pipelines import records
  manifest = records.read_manifest(records_dir)
  saliency = not manifest.get("has_gt") and records.has_field(manifest, "saliency")
  batches = data_input.eval_iterator(records_dir, "test", batch_size=s.batch_size,
                                     image_size=s.image_size, saliency=saliency)
  return gradcam.evaluate(config, train_state, batches)


def _knn(train, test, s, num_classes):
  return {"top1": knn.knn_top1(train[F.POOLED], train[B.LABEL], test[F.POOLED], test[B.LABEL],
                               num_classes=num_classes, k=s.knn_k, temperature=s.knn_temperature)}


def _linear(train, test, s, num_classes):
  del num_classes
  return linear_probe.linear_probe(train[F.POOLED], train[B.LABEL], test[F.POOLED],
                                   test[B.LABEL], sweep=s.linear_sweep, seed=s.seed)


def _retrieval(train, test, s, num_classes):
  return retrieval.segment_retrieval(
      train[F.SPATIAL], train[B.SEMANTIC], test[F.SPATIAL], test[B.SEMANTIC],
      num_classes=num_classes, k=s.retrieval_k, resolution=s.retrieval_resolution, seed=s.seed)


def _seg_linear(train, test, s, num_classes):
  return segmentation.linear_segmentation(
      train[F.SPATIAL], train[B.SEMANTIC], test[F.SPATIAL], test[B.SEMANTIC],
      num_classes=num_classes, epochs=s.seg_linear_epochs, seed=s.seed)


def _multilabel(train, test, s, num_classes):
  return multilabel.multilabel_probe(
      train[F.POOLED], B.present_classes(train[B.SEMANTIC], num_classes), test[F.POOLED],
      B.present_classes(test[B.SEMANTIC], num_classes), sweep=s.linear_sweep, seed=s.seed)


def _seg_finetune(model, variables, records_dir, s, num_classes, data):
  return finetune.evaluate(model, variables, records_dir, num_classes=num_classes,
                           image_size=s.image_size, preset=s.finetune_preset,
                           schedule=s.finetune_schedule, dilation=s.finetune_dilation,
                           steps=s.finetune_steps, seed=s.seed, data=data)


def _finetune_data(records_dir, s):
  return {split: finetune.load_split(records_dir, split, s.image_size, s.batch_size)
          for split in ("train", "test")}


def _describe_finetune(s):
  p = finetune.PRESETS.get(s.finetune_preset)
  lr, drops = finetune.SCHEDULES.get(s.finetune_schedule, (None, ()))
  return (f"seg_finetune: FCN (last stage dilated, 2 x 3x3 conv dilation {s.finetune_dilation} "
          f"+ BN + ReLU, 1x1 conv, bilinear) fine-tuned end to end, preset "
          f"{s.finetune_preset!r} ({p and p.epochs} epochs, batch {p and p.batch_size}, "
          f"{p and p.crop} px crops, scale 0.5-2 + flips), SGD momentum 0.9, wd 1e-4, lr {lr} "
          f"x0.1 at {', '.join(f'{d:.0%}' for d in drops)}; test mIoU incl. background")


def _background(train, test, s, num_classes):
  del num_classes
  variants = {v: test[F.POOLED if v == "original" else f"{F.POOLED}/{v}"]
              for v in background_robustness.VARIANTS}
  return background_robustness.evaluate(train[F.POOLED], train[B.LABEL], variants, test[B.LABEL],
                             sweep=s.linear_sweep, seed=s.seed)


def _natural(name: str):
  """fh_s90 before fh_s180: digit runs compare as numbers."""
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


SALIENCY_RESULT = "saliency"     # key of the saliency block inside the masks evaluation
TIMED_IMAGES = 8                 # images the per-kind speed is measured on


def _kind_speed(images, specs) -> float:
  """Images/s on one core for a mask kind's stored settings (all its maps per image)."""
  from data_pipelines import masks as masks_lib
  masks_lib.compute_all(images[0], specs)                  # compile / warm up
  t = time.process_time()
  for im in images:
    masks_lib.compute_all(im, specs)
  return len(images) / max(time.process_time() - t, 1e-9)


def _masks(records_dir, manifest, s, image_size):
  """ABO per stored map and per kind over all its maps (a proposal set from several
  levels or scales) with images/s/core; saliency MAE / max F / AUC when stored."""
  from data_pipelines import input as data_input
  from data_pipelines import records
  names = sorted(manifest.get("masks", {}), key=_natural)
  if not names:
    raise ValueError(f"{records_dir!r} stores no mask sources; nothing to measure.")
  kinds = {}
  for n in names:
    kinds.setdefault(manifest["masks"][n].get("kind", n.split("_")[0]), []).append(n)
  multi = {k: ns for k, ns in kinds.items() if len(ns) > 1}
  saliency = records.has_field(manifest, "saliency")
  per_source = {n: [] for n in names}
  per_kind = {k: [] for k in multi}
  sal_parts, sample = [], []
  for batch in data_input.eval_iterator(records_dir, s.mask_split, batch_size=s.batch_size,
                                        image_size=image_size, mask_sources=names,
                                        saliency=saliency):
    inst = np.asarray(batch[B.INSTANCES])
    for n in names:
      per_source[n].append(mask_quality.average_best_overlap(
          inst, np.asarray(batch[B.MASK_PREFIX + n])))
    for k, ns in multi.items():
      per_kind[k].append(mask_quality.best_overlaps_any(
          inst, [np.asarray(batch[B.MASK_PREFIX + n]) for n in ns]))
    if saliency:
      sal_parts.append(mask_quality.saliency_quality(batch[B.SALIENCY], inst > 0))
    if len(sample) < TIMED_IMAGES:
      sample += list(np.round(np.asarray(batch[B.IMAGE][:TIMED_IMAGES - len(sample)]) * 255
                              ).astype(np.uint8))
  out = {n: mask_quality.merge(r) for n, r in per_source.items()}
  from data_pipelines import masks as masks_lib
  for k, ns in kinds.items():   # timed: the kinds the build computes (not gt, not learned)
    if k != "gt" and k in masks_lib.REGISTRY and sample:
      speed = _kind_speed(sample, {n: manifest["masks"][n] for n in ns})
      for n in ns:
        out[n]["kind_images_per_s_core"] = speed
    if k in multi:
      best = np.concatenate(per_kind[k])
      out[f"{k} (all maps)"] = {
          "abo": float(best.mean()) if best.size else float("nan"),
          "num_instances": int(best.size), "num_images": out[ns[0]]["num_images"],
          "mean_segments": sum(out[n]["mean_segments"] for n in ns),
          "kind_images_per_s_core": out[ns[0]].get("kind_images_per_s_core")}
  if saliency:
    out[SALIENCY_RESULT] = dict(mask_quality.summarize_saliency(
        mask_quality.merge_saliency(sal_parts)), detector=manifest["saliency"]["detector"])
  return out


def mask_panels(records_dir, manifest, s, image_size) -> dict:
  """{TensorBoard title: uint8 panels}: the first NUM_PICTURES images of the masks' split
  beside every stored mask source (FH, grid, learned, GT, ...), side by side."""
  from data_pipelines import input as data_input
  names = sorted(manifest.get("masks", {}), key=_natural)
  batch = next(iter(data_input.eval_iterator(records_dir, s.mask_split, batch_size=NUM_PICTURES,
                                             image_size=image_size, mask_sources=names)))
  images = np.asarray(batch[B.IMAGE])
  panels = [visualize.overlay(images, np.asarray(batch[B.MASK_PREFIX + n])) for n in names]
  return {"masks/image | " + " | ".join(names):
          visualize.side_by_side(visualize.to_uint8(images), *panels)}


EVALUATIONS: dict[str, ModelEvaluation | FinetuneEvaluation | DataEvaluation | StateEvaluation] = {
    "knn": ModelEvaluation(
        "kNN top-1", "top1", "{:.1%}", (F.POOLED, B.LABEL), _knn,
        lambda s: f"kNN: weighted cosine, k={s.knn_k}, T={s.knn_temperature}, train split as memory"),
    "linear": ModelEvaluation(
        "linear top-1", "top1", "{:.1%}", (F.POOLED, B.LABEL), _linear,
        lambda s: (f"linear: L-BFGS logistic regression on standardised pooled features, "
                   f"{len(linear_probe.l2_grid(s.linear_sweep))} values of C in [1e-5, 1e5] "
                   f"({s.linear_sweep!r} sweep; 'full' = the paper's 45), chosen on 20% of train")),
    "retrieval": ModelEvaluation(
        "retrieval mIoU", "miou", "{:.3f}", (F.SPATIAL, B.SEMANTIC), _retrieval,
        lambda s: (f"retrieval: per-image K-means (K={s.retrieval_k}) on "
                   f"{'dilated (stride 1, dilation 2) ' if s.retrieval_dilated else ''}stage-4 "
                   f"features, bilinearly upsampled to {s.retrieval_resolution}x"
                   f"{s.retrieval_resolution}, "
                   "1-NN train region label, mIoU incl. background at image resolution")),
    "seg_linear": ModelEvaluation(
        "seg-linear mIoU", "miou", "{:.3f}", (F.SPATIAL, B.SEMANTIC), _seg_linear,
        lambda s: (f"seg_linear: 1x1 conv on frozen "
                   f"{'dilated ' if s.retrieval_dilated else ''}stage-4 features (BN frozen), "
                   f"bilinear to the label map, cross-entropy, Adam {s.seg_linear_epochs} "
                   "epochs; test mIoU incl. background")),
    "multilabel": ModelEvaluation(
        "multi-label mAP", "map", "{:.3f}", (F.POOLED, B.SEMANTIC), _multilabel,
        lambda s: (f"multilabel: one L-BFGS logistic regression per class on standardised "
                   f"pooled features, {len(linear_probe.l2_grid(s.linear_sweep))} values of C "
                   "in [1e-5, 1e5] chosen by held-out mAP (20% of train); targets: every "
                   "class present in the image; test mAP over classes")),
    "seg_finetune": FinetuneEvaluation(
        "FCN mIoU", "miou", "{:.3f}", (B.SEMANTIC,), _seg_finetune, _describe_finetune,
        _finetune_data),
    "background": ModelEvaluation(
        "BG-Gap", "bg_gap", "{:+.1%}", (F.POOLED, B.LABEL), _background,
        lambda s: ("BG-Gap: a linear probe (the linear protocol) fit on Original train "
                   "features, top-1 on ImageNet-9 variants of the test split from its GT "
                   "foregrounds; BG-Gap = Mixed-Same - Mixed-Rand (train-split tiled backgrounds)"),
        extra_test=background_robustness.variant_features),
    "masks": DataEvaluation("mask quality", _masks),
    "gradcam": StateEvaluation("grounding IoU", "miou", "{:.3f}", _gradcam),
}
DEFAULT_EVALS = ("knn", "linear", "retrieval", "seg_linear", "multilabel", "masks")
PER_ROW = (ModelEvaluation, FinetuneEvaluation)   # evaluations with a random-init row
DENSE = ("seg_linear", "seg_finetune")              # their per-class IoU goes in the table


# --- Running ----------------------------------------------------------------

def parse_evals(evals) -> tuple[str, ...]:
  """'knn,linear', a sequence, or a sequence of comma lists (a config override
  --config.eval.evals=knn,linear gives ('knn,linear',)) -> names, in registry order."""
  parts = [evals] if isinstance(evals, str) else list(evals)
  names = [e.strip() for part in parts for e in part.split(",") if e.strip()]
  unknown = sorted(set(names) - set(EVALUATIONS))
  if unknown or not names:
    raise ValueError(f"Unknown evaluations {unknown or names}; choose from {list(EVALUATIONS)} "
                     "(--evals=knn,linear,retrieval,masks).")
  return tuple(e for e in EVALUATIONS if e in names)


def resolve_settings(settings: Settings, manifest: dict, fallback_size: int | None = None,
                     stride: int = STRIDE) -> Settings:
  """Fill image size (records' size, else fallback_size; a multiple of the
  model's output `stride`) and retrieval resolution."""
  size = settings.image_size
  if size is None and not manifest.get("image_size"):
    size = fallback_size
  if size is None:
    if not manifest.get("image_size"):
      raise ValueError("The records' manifest gives no image size; pass one (--image_size, a "
                       f"multiple of {stride}).")
    size = max(stride, int(manifest["image_size"]) // stride * stride)
  if size % stride:
    raise ValueError(f"Evaluation image size {size} must be a multiple of {stride} "
                     "(--image_size).")
  res = settings.retrieval_resolution or max(1, size // 8)
  return dataclasses.replace(settings, image_size=size, retrieval_resolution=res)


def data_identity(records_dir: str, manifest: dict, settings: Settings) -> dict:
  """What the numbers were measured on (also the baseline cache key's data part)."""
  where = records_dir if "://" in records_dir else os.path.abspath(records_dir)
  return {"records_dir": where, "source": manifest.get("source"),
          "counts": {k: v["count"] for k, v in manifest["splits"].items()},
          "image_size": settings.image_size}


def unsupported(manifest: dict) -> dict[str, str]:
  """{evaluation: why these records cannot serve it} (labels, instance maps, a test split,
  and for gradcam a foreground to score against)."""
  from data_pipelines import records
  out = {}
  for name, ev in EVALUATIONS.items():
    needs = ev.needs if isinstance(ev, PER_ROW) else ()
    if B.LABEL in needs and not manifest.get("num_classes"):
      out[name] = "no image labels (a folder source labels images by class subfolder)"
    elif (B.SEMANTIC in needs or name in ("masks", "background")) and not manifest.get("has_gt"):
      out[name] = ("no ground-truth instance maps, hence no semantic labels (only "
                   "--source=demo and tfds datasets with a segmentation feature in "
                   "data_pipelines/tfds_segmentation.py store them)")
    elif name == "masks":
      continue
    elif "test" not in manifest.get("splits", {}):
      out[name] = "no test split (a folder source takes it from PATH/test/)"
    elif (isinstance(ev, StateEvaluation) and not manifest.get("has_gt")
          and not records.has_field(manifest, "saliency")):
      out[name] = ("neither ground-truth foregrounds nor saliency maps (rebuild with "
                   "--saliency=mbd)")
  return out


def check_data(evals, manifest: dict, records_dir: str, flag: str = "--evals") -> None:
  """One error naming what the records lack and the evaluations that do apply (flag=...)."""
  missing = {e: r for e, r in unsupported(manifest).items() if e in evals}
  if missing:
    usable = [e for e in EVALUATIONS if e not in unsupported(manifest)]
    groups = {}
    for e, reason in missing.items():
      groups.setdefault(reason, []).append(e)
    why = "; ".join(f"{', '.join(es)}: {reason}" for reason, es in groups.items())
    raise ValueError(
        f"{records_dir!r} (source {manifest.get('source')}) cannot serve {why}. "
        + (f"Use {flag}={','.join(usable)} on these records." if usable else
           "No evaluation applies to them; evaluate on labelled records (--data=DIR)."))


def evaluate_variables(model, variables_by_name: dict[str, dict], records_dir: str,
                       evals=DEFAULT_EVALS, settings: Settings = Settings()) -> tuple[dict, dict]:
  """Run `evals` for every named variable set on the records.

  Returns (results, pictures): results = {"rows": {name: {eval: metric}},
  "details": {name: {eval: {...}}}, "masks": {source: {...}}, "settings",
  "notes", "data"}; pictures = {name: {eval: uint8 panels image | GT | prediction}}
  for the evaluations that predict label maps (retrieval, seg_linear, seg_finetune),
  plus {eval: panels} of evaluations with their own pictures (background).
  """
  from data_pipelines import input as data_input
  from data_pipelines import records

  evals = parse_evals(evals)
  manifest = records.read_manifest(records_dir)
  check_data(evals, manifest, records_dir)
  for split in ("train", "test"):   # tf.data would skip a missing or short shard silently
    if split in manifest["splits"]:
      records.verify_shards(records_dir, manifest, split)
  settings = resolve_settings(settings, manifest, stride=output_stride(model.stem_pool))
  model_evals = [e for e in evals if isinstance(EVALUATIONS[e], ModelEvaluation)]
  tuned = [e for e in evals if isinstance(EVALUATIONS[e], FinetuneEvaluation)]
  results = {"rows": {n: {} for n in variables_by_name},
             "details": {n: {} for n in variables_by_name},
             "settings": dataclasses.asdict(settings),
             "notes": [EVALUATIONS[e].describe(settings) for e in model_evals + tuned],
             "data": data_identity(records_dir, manifest, settings)}
  pictures, seconds = {}, results.setdefault("seconds", {})
  predicted = {}                          # {name: {eval: label maps of the first test images}}

  def record(name, e, out):
    predictions = out.pop("predictions", None)
    if predictions is not None:
      predicted.setdefault(name, {})[e] = predictions[:NUM_PICTURES]
    results["rows"][name][e] = out[EVALUATIONS[e].metric]
    results["details"][name][e] = out

  num_classes = int(manifest.get("num_classes") or 0)
  extra_pictures = {}
  if model_evals and variables_by_name:
    needs = {n for e in model_evals for n in EVALUATIONS[e].needs}
    keep = [k for k in (B.LABEL, B.SEMANTIC) if k in needs]
    split_data, t = {}, time.time()
    for split in ("train", "test"):
      batches = data_input.eval_iterator(records_dir, split, batch_size=settings.batch_size,
                                         image_size=settings.image_size)
      split_data[split] = F.extract_features(
          model, variables_by_name, batches, spatial=F.SPATIAL in needs, keep=keep,
          dense_model=model.clone(dilate_last=True) if settings.retrieval_dilated else None)
    seconds["features"] = time.time() - t
    for e in model_evals:
      if EVALUATIONS[e].extra_test is not None:
        t = time.time()
        extra, extra_pictures[e] = EVALUATIONS[e].extra_test(
            model, variables_by_name, records_dir, settings, num_classes)
        for name in variables_by_name:
          split_data["test"][0][name].update(extra[name])
        seconds[f"{e} features"] = time.time() - t
    for name in variables_by_name:
      train = split_data["train"][0][name] | split_data["train"][1]
      test = split_data["test"][0][name] | split_data["test"][1]
      for e in model_evals:
        t = time.time()
        out = EVALUATIONS[e].run(train, test, settings, num_classes)
        seconds[e] = seconds.get(e, 0.0) + time.time() - t
        record(name, e, out)
  for e in tuned if variables_by_name else ():
    t = time.time()
    data = EVALUATIONS[e].load(records_dir, settings)
    for name, variables in variables_by_name.items():
      record(name, e, EVALUATIONS[e].run(model, variables, records_dir, settings, num_classes,
                                         data))
    seconds[e] = time.time() - t
  if predicted:
    first = next(iter(data_input.eval_iterator(records_dir, "test", batch_size=NUM_PICTURES,
                                               image_size=settings.image_size)))
    pictures = {n: {e: visualize.segmentation_panels(first[B.IMAGE], first[B.SEMANTIC], p)
                    for e, p in by_eval.items()} for n, by_eval in predicted.items()}
  pictures.update(extra_pictures)       # keyed by evaluation name, not model row
  if "masks" in evals:
    t = time.time()
    results["masks"] = EVALUATIONS["masks"].run(records_dir, manifest, settings,
                                                settings.image_size)
    if SALIENCY_RESULT in results["masks"]:
      results[SALIENCY_RESULT] = results["masks"].pop(SALIENCY_RESULT)
    pictures["masks"] = mask_panels(records_dir, manifest, settings, settings.image_size)
    seconds["masks"] = time.time() - t
  return results, pictures


# --- Output -----------------------------------------------------------------

def format_table(results: dict, title: str = "") -> str:
  """The model rows (baseline first) as a plain-text table, then mask quality."""
  lines = [title] if title else []
  rows = results["rows"]
  evals = [e for e in EVALUATIONS if any(e in r for r in rows.values())]
  if evals:
    width = max(len("model"), *(len(n) for n in rows)) + 2
    cols = [max(len(EVALUATIONS[e].title), 8) + 3 for e in evals]
    lines.append("model".ljust(width) + "".join(EVALUATIONS[e].title.rjust(c)
                                                for e, c in zip(evals, cols)))
    for name, row in rows.items():
      cells = [(EVALUATIONS[e].fmt.format(row[e]) if e in row else "-").rjust(c)
               for e, c in zip(evals, cols)]
      lines.append(name.ljust(width) + "".join(cells))
    lines += ["  " + n for n in results.get("notes", [])]
    per_class = [(n, e, d[e]["per_class_iou"]) for n, d in results.get("details", {}).items()
                 for e in DENSE if e in d and "per_class_iou" in d[e]]
    if per_class:
      lines.append("per-class IoU (bg = background, then class 0, 1, ...; - = class absent):")
      width = max(len(f"{n} {e}") for n, e, _ in per_class) + 2
      for n, e, iou in per_class:
        lines.append(f"{n} {e}".ljust(width) + " ".join(
            "-".rjust(4) if v is None or not np.isfinite(v) else f"{v:4.2f}" for v in iou))
  masks = results.get("masks")
  if masks:
    any_src = next(iter(masks.values()))
    lines.append(f"mask quality on the {results['settings']['mask_split']} split "
                 f"({any_src['num_images']} images, {any_src['num_instances']} GT instances): "
                 "ABO = mean over GT instances of the best IoU with a segment")
    width = max(len("source"), *(len(n) for n in masks)) + 2
    lines.append("source".ljust(width) + "ABO".rjust(8) + "segments/image".rjust(17)
                 + "images/s/core".rjust(16))
    for name, m in masks.items():
      speed = m.get("kind_images_per_s_core")
      lines.append(name.ljust(width) + f"{m['abo']:8.3f}" + f"{m['mean_segments']:17.1f}"
                   + (f"{speed:16.1f}" if speed else "-".rjust(16)))
    lines.append(f"  images/s/core: all maps of the kind per image, on {TIMED_IMAGES} images "
                 "at the evaluation size, CPU time of this process")
  bg = {n: d["background"] for n, d in results.get("details", {}).items() if "background" in d}
  if bg:
    lines.append("background variants: linear-probe top-1 per test variant (probe fit on "
                 "Original train features)")
    width = max(len("model"), *(len(n) for n in bg)) + 2
    lines.append("model".ljust(width) + "".join(v.rjust(12) for v in background_robustness.VARIANTS)
                 + "BG-Gap".rjust(9))
    for name, d in bg.items():
      lines.append(name.ljust(width) + "".join(f"{d[v]:12.1%}" for v in background_robustness.VARIANTS)
                   + f"{d['bg_gap']:+9.1%}")
  sal = results.get(SALIENCY_RESULT)
  if sal:
    lines.append(f"saliency ({sal['detector']}) against the GT foreground on the "
                 f"{results['settings']['mask_split']} split ({sal['num_images']} images): "
                 f"MAE {sal['mae']:.3f}, max F (beta^2=0.3) {sal['max_f']:.3f} "
                 f"at {sal['max_f_threshold']:.2f}, AUC {sal['auc']:.3f}")
  if results.get("seconds"):
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items()))
  return "\n".join(lines)


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if math.isnan(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_json(path: str, obj) -> None:
  """Atomic locally; gs:// workdirs go through tf.io.gfile (records.write_text)."""
  from data_pipelines import records
  records.makedirs(os.path.dirname(path))
  records.write_text(path, json.dumps(_jsonable(obj), indent=1, sort_keys=True))


def write_tensorboard(workdir: str, step: int, results: dict, pictures: dict) -> None:
  """Scalars per model row (one run each, same tags) and retrieval pictures."""
  import tensorflow as tf
  for name, row in results["rows"].items():
    if name in results.get("compare", ()):
      continue
    run = TB_DIR if name != BASELINE else TB_DIR + "_random_init"
    writer = tf.summary.create_file_writer(os.path.join(workdir, run))
    with writer.as_default(step=step):
      for e, v in row.items():
        tf.summary.scalar(f"eval/{e}_{EVALUATIONS[e].metric}", v)
      for e, panels in pictures.get(name, {}).items():
        tf.summary.image(f"eval/{e} image | GT | prediction", panels, max_outputs=NUM_PICTURES)
      for v in background_robustness.VARIANTS:
        if v in results["details"][name].get("background", {}):
          tf.summary.scalar(f"eval/background_{v}_top1",
                            results["details"][name]["background"][v])
      if name != BASELINE and "background" in pictures:
        tf.summary.image("eval/background " + " | ".join(background_robustness.VARIANTS),
                         pictures["background"], max_outputs=NUM_PICTURES)
      if name != BASELINE:
        for title, panels in pictures.get("masks", {}).items():
          tf.summary.image(title, panels, max_outputs=NUM_PICTURES)
        for src, m in results.get("masks", {}).items():
          tf.summary.scalar("masks/abo_" + re.sub(r"\W+", "_", src).strip("_"), m["abo"])
        for k in ("mae", "max_f", "auc"):
          if results.get(SALIENCY_RESULT):
            tf.summary.scalar(f"masks/saliency_{k}", results[SALIENCY_RESULT][k])
    writer.close()


# --- Workdir entry point ------------------------------------------------------

def _cached_baseline(path: str, key: dict, evals) -> dict | None:
  """The cached random-init rows when they were made with the same key and cover evals."""
  from data_pipelines import records
  if not records.exists(path):
    return None
  cached = json.loads(records.read_text(path))
  if cached.get("key") != key or not set(evals) <= set(cached["rows"][BASELINE]):
    return None
  return cached


def _state_evaluations(workdir, step, evals, data_dir, settings, name, results) -> dict:
  """Run the StateEvaluations of `evals` on the whole train state at `step` into results'
  row `name`; returns their overlay pictures {eval: uint8 panels}."""
  from detcon_jax.core import checkpointing
  chosen = [e for e in evals if isinstance(EVALUATIONS[e], StateEvaluation)]
  if not chosen:
    return {}
  config, train_state, _ = checkpointing.restore_train_state(workdir, step)
  overlays = {}
  for e in chosen:
    t = time.time()
    out = EVALUATIONS[e].run(config, train_state, data_dir, settings)
    results.setdefault("seconds", {})[e] = time.time() - t
    pictures = out.pop("overlays", None)
    if pictures is not None:
      overlays[e] = pictures
    results["rows"].setdefault(name, {})[e] = out[EVALUATIONS[e].metric]
    results["details"].setdefault(name, {})[e] = out
  return overlays


def results_dir(workdir: str, config, data_dir: str) -> str:
  """Where a workdir keeps its evaluations of data_dir: WORKDIR/eval for the records it
  trained on (what sweep, compare and the resume check read); WORKDIR/eval/on_NAME_HASH for
  other records, so evaluating a run on other data never replaces its own results."""
  def where(d):
    return d.rstrip("/") if "://" in d else os.path.abspath(d)
  own = os.path.join(workdir, EVAL_DIR)
  if where(data_dir) == where(config.data.records_dir):
    return own
  import hashlib
  name = re.sub(r"\W+", "_", os.path.basename(where(data_dir))).strip("_") or "records"
  digest = hashlib.sha1(where(data_dir).encode()).hexdigest()[:8]
  return os.path.join(own, f"on_{name}_{digest}")


def merged_results(path: str, results: dict) -> dict:
  """results with the evaluations that an earlier results file at `path` holds and this
  run did not redo (same data only): `--evals=masks` or `--evals=knn` after a full
  evaluation adds to it instead of replacing it."""
  from data_pipelines import records
  if not records.exists(path):
    return results
  old = json.loads(records.read_text(path))
  if old.get("data") != _jsonable(results.get("data")):
    return results
  merged = dict(results)
  for part in ("rows", "details"):
    merged[part] = {row: {**old.get(part, {}).get(row, {}), **values}
                    for row, values in results.get(part, {}).items()}
    for row, values in old.get(part, {}).items():   # rows this run did not evaluate
      merged[part].setdefault(row, values)
  for part in ("masks", "seconds"):
    if part in old or part in results:
      merged[part] = {**old.get(part, {}), **results.get(part, {})}
  if SALIENCY_RESULT in old and SALIENCY_RESULT not in results:
    merged[SALIENCY_RESULT] = old[SALIENCY_RESULT]
  return merged


def evaluate_workdir(workdir: str, evals=DEFAULT_EVALS, data_dir: str | None = None,
                     step: int | None = None, *, settings: Settings = Settings(),
                     baseline: bool = True, write: bool = True, verbose: bool = True,
                     compare=()) -> dict:
  """Evaluate the checkpoint at `step` (default: latest) of a training workdir.

  compare: other workdirs (same config.model) whose newest checkpoints get rows of
  their own in the table and the JSON (not in this run's TensorBoard).

  Prints the table, then writes WORKDIR/eval/step_N.json and TensorBoard
  output (first host only; a write error comes after the table, so no result
  is lost) and returns the results dict. Evaluations already in that file and not
  redone here are kept (merged_results); results on records other than the run's go
  to their own folder (results_dir). The default step is the newest
  checkpoint that restores (a damaged one is skipped with a warning). data_dir
  defaults to the run's config.data.records_dir. The random-init row is cached
  in WORKDIR/eval/random_init.json, keyed by model, settings and data.
  """
  from data_pipelines import records
  from detcon_jax.core import checkpointing

  evals = parse_evals(evals)
  config, model, variables, step = checkpointing.restore_encoder(
      workdir, None if step is None else int(step))
  data_dir = data_dir or config.data.records_dir
  manifest = records.read_manifest(data_dir)
  settings = resolve_settings(settings, manifest, fallback_size=config.image_size,
                              stride=output_stride(model.stem_pool))
  name = f"step {step}"
  variables_by_name = {name: variables}
  for other in compare:
    other_config, _, other_variables, other_step = checkpointing.restore_encoder(other)
    if other_config.model.to_dict() != config.model.to_dict():
      raise ValueError(f"--compare={other} trains another model ({other_config.model.to_dict()}) "
                       f"than {workdir} ({config.model.to_dict()}); compare runs of one model.")
    variables_by_name[f"{other_config.method} {other.rstrip('/')} step {other_step}"] = (
        other_variables)

  model_evals = [e for e in evals if isinstance(EVALUATIONS[e], PER_ROW)]
  out_dir = results_dir(workdir, config, data_dir)
  baseline_path = os.path.join(out_dir, BASELINE_FILE)
  key = _jsonable({"model": config.model.to_dict(), "settings": dataclasses.asdict(settings),
                   "data": data_identity(data_dir, manifest, settings)})
  cached = _cached_baseline(baseline_path, key, model_evals) if baseline and model_evals else None
  if baseline and model_evals and cached is None:
    variables_by_name = {BASELINE: F.random_init_variables(model, settings.image_size,
                                                           settings.seed), **variables_by_name}

  results, pictures = evaluate_variables(model, variables_by_name, data_dir, evals, settings)
  overlays = _state_evaluations(workdir, step, evals, data_dir, settings, name, results)
  results["workdir"], results["step"] = os.path.abspath(workdir), step
  results["compare"] = [n for n in variables_by_name if n not in (name, BASELINE)]
  primary = jax.process_index() == 0
  if cached is not None:
    for part in ("rows", "details"):
      results[part] = {BASELINE: {e: cached[part][BASELINE][e] for e in model_evals},
                       **results[part]}
    results["baseline_cached"] = baseline_path
  if primary and verbose:   # before any file is written: a write error loses no result
    counts = results["data"]["counts"]
    print(format_table(results, f"evaluation of {workdir} at step {step} on {data_dir} "
                                f"({', '.join(f'{v} {k}' for k, v in counts.items())} images, "
                                f"{settings.image_size} px)"), flush=True)
  if not primary:
    return results
  import tensorflow as tf
  try:
    if cached is None and baseline and model_evals:
      write_json(baseline_path, {"key": key, "rows": {BASELINE: results["rows"][BASELINE]},
                                 "details": {BASELINE: results["details"][BASELINE]}})
    if write:
      path = os.path.join(out_dir, f"step_{step}.json")
      write_json(path, merged_results(path, results))
      write_tensorboard(workdir if out_dir == os.path.join(workdir, EVAL_DIR) else out_dir,
                        step, results, pictures)
      gradcam.write_overlays(os.path.join(workdir, TB_DIR), step, overlays)
      if verbose and out_dir != os.path.join(workdir, EVAL_DIR):
        print(f"Results on {data_dir} (not the run's own records) written to {path}; the "
              f"run's own evaluations in {os.path.join(workdir, EVAL_DIR)} are unchanged.")
  except (OSError, tf.errors.OpError) as e:   # TensorBoard's writer raises the latter
    reason = getattr(e, "strerror", None) or getattr(e, "message", None) or e
    raise checkpointing.WorkdirError(
        f"Cannot write the results into {os.path.join(workdir, EVAL_DIR)} ({reason})"
        + ("; the table above holds them" if verbose else "") + ". Make the workdir "
        "writable to keep them there.") from e
  return results
