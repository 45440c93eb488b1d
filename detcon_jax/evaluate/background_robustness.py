"""Background robustness: ImageNet-9 variants and BG-Gap (Xiao et al. 2021; Ryali et al. 2021).

Each test image is recomposed from its ground-truth foreground (all GT instances,
the records' instance map > 0) in five variants:

  original    the image;
  only_fg     the foreground on black;
  only_bg_t   the foreground hole filled from the image's own background ("tiled");
  mixed_same  the foreground on the tiled background of a train image of the same class;
  mixed_rand  the foreground on the tiled background of a train image of another class.

The mixed backgrounds come from the train split: on the correlated demo
(config.data.demo_bg_correlation) only the train split ties a class to a
background photo, the test split's backgrounds are uniform, so a same-class
test background would carry no class signal and BG-Gap would measure nothing.
Tiled backgrounds are made here from the GT foreground with the build's hole
filling (data_pipelines/masks/background.tiled: Telea inpainting of the dilated
hole), not read from the records, whose stored backgrounds follow the saliency map.
The pool (the first POOL_SIZE // classes train images of each class) is also in the
probe's training set, so Mixed-Same may be slightly optimistic (a held-out pool would not be).

A linear probe is fit once on the train split's Original features
(linear_probe.fit_probe) and scored on every variant of the test split;
BG-Gap = acc(mixed_same) - acc(mixed_rand), the part of the accuracy owed to a
background that agrees with the class. Mixed choices are a pure function of
(seed, variant, test position), so every model row sees the same images.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from data_pipelines import batch as B
from data_pipelines.masks import tiled_background as tiling
from detcon_jax.evaluate import linear_probe

VARIANTS = ("original", "only_fg", "mixed_same", "mixed_rand", "only_bg_t")
POOL_SIZE = 240          # train backgrounds kept in all (per class: POOL_SIZE // classes, >= 1)


def tiled_background(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
  """float [H, W, 3] in [0, 1]: the image with its foreground hole filled."""
  u8 = (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  return tiling.tiled(u8, np.where(foreground, 255, 0).astype(np.uint8)) / np.float32(255)


def compose(image: np.ndarray, foreground: np.ndarray, background) -> np.ndarray:
  """The image's foreground pixels over `background` (an image or a constant)."""
  return np.where(np.asarray(foreground, bool)[..., None], image,
                  background).astype(np.float32)


def background_pool(batches: Iterable[dict], num_classes: int,
                    size: int = POOL_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """(tiled backgrounds float [N, H, W, 3], labels [N]): the first size // num_classes
  labelled images of each class in the batches (a train-split pass)."""
  per_class = max(1, size // max(1, num_classes))
  counts = np.zeros(max(1, num_classes), int)
  backgrounds, labels = [], []
  for batch in batches:
    for image, inst, label in zip(batch[B.IMAGE], batch[B.INSTANCES], batch[B.LABEL]):
      label = int(label)
      if 0 <= label < len(counts) and counts[label] < per_class:
        counts[label] += 1
        backgrounds.append(tiled_background(np.asarray(image), np.asarray(inst) > 0))
        labels.append(label)
    if counts.min() >= per_class:
      break
  if not labels:
    raise ValueError("The background evaluation found no labelled train image to take "
                     "backgrounds from.")
  return np.stack(backgrounds), np.asarray(labels)


def pick(labels: np.ndarray, positions: np.ndarray, pool_labels: np.ndarray, same: bool,
         seed: int) -> np.ndarray:
  """Pool indices: per test image (label, position in the split) a random pool entry of
  the same class (same=True) or of another class; the whole pool when none exists."""
  out = []
  for label, pos in zip(labels, positions):
    rng = np.random.default_rng([seed, int(same), int(pos)])
    ok = np.flatnonzero((pool_labels == label) == same)
    out.append(rng.choice(ok if len(ok) else np.arange(len(pool_labels))))
  return np.asarray(out, int)


def variant_images(batch: dict, variant: str, pool: tuple[np.ndarray, np.ndarray],
                   first: int, seed: int = 0) -> np.ndarray:
  """float [B, H, W, 3]: `variant` of a test batch whose first image is at split position
  `first`; pool = background_pool(train batches)."""
  images = np.asarray(batch[B.IMAGE], np.float32)
  fg = np.asarray(batch[B.INSTANCES]) > 0
  if variant == "original":
    return images
  if variant == "only_fg":
    return compose(images, fg, np.float32(0))
  if variant == "only_bg_t":
    return np.stack([tiled_background(im, f) for im, f in zip(images, fg)])
  if variant in ("mixed_same", "mixed_rand"):
    positions = first + np.arange(len(images))
    idx = pick(np.asarray(batch[B.LABEL]), positions, pool[1], variant == "mixed_same", seed)
    return compose(images, fg, pool[0][idx])
  raise ValueError(f"Unknown background variant {variant!r}; choose from {VARIANTS}.")


def variant_batches(test_batches: Iterable[dict], variant: str, pool, seed: int = 0
                    ) -> Iterator[dict]:
  """The test batches with their images replaced by `variant` (labels kept)."""
  first = 0
  for batch in test_batches:
    yield {B.IMAGE: variant_images(batch, variant, pool, first, seed), B.LABEL: batch[B.LABEL]}
    first += len(batch[B.IMAGE])


def panel(batch: dict, pool, seed: int = 0, n: int = 4) -> np.ndarray:
  """uint8 rows of the first n test images, one column per variant (VARIANTS order)."""
  from detcon_jax.evaluate import visualize
  head = {k: np.asarray(v)[:n] for k, v in batch.items()}
  return visualize.side_by_side(*[visualize.to_uint8(variant_images(head, v, pool, 0, seed))
                                  for v in VARIANTS])


def bg_gap(accuracies: dict) -> float:
  """acc(Mixed-Same) - acc(Mixed-Rand)."""
  return float(accuracies["mixed_same"] - accuracies["mixed_rand"])


def evaluate(train_features, train_labels, test_features: dict, test_labels, *,
             sweep="default", seed: int = 0) -> dict:
  """A probe fit on Original train features, scored on each variant's test features
  ({variant: [N, C]}): {variant: top1, ..., bg_gap, C}."""
  probe = linear_probe.fit_probe(train_features, train_labels, sweep=sweep, seed=seed)
  out = {v: linear_probe.score(probe, test_features[v], test_labels) for v in VARIANTS}
  return {**out, "bg_gap": bg_gap(out), "C": probe["C"]}


def variant_features(model, variables_by_name: dict, records_dir: str, settings,
                     num_classes: int) -> tuple[dict, np.ndarray]:
  """Pooled features of every variant but Original (features.py, which the caller ran on
  the originals) for each variable set: ({name: {'pooled/<variant>': [N, C]}}, panel)."""
  from data_pipelines import input as data_input
  from detcon_jax.evaluate import features as F

  def split(name, batch_size=settings.batch_size):
    return data_input.eval_iterator(records_dir, name, batch_size=batch_size,
                                    image_size=settings.image_size)

  pool = background_pool(split("train"), num_classes)
  variants = VARIANTS[1:]
  chained = (b for v in variants for b in variant_batches(split("test"), v, pool, settings.seed))
  feats, _ = F.extract_features(model, variables_by_name, chained, spatial=False, keep=())
  out = {}
  for name, f in feats.items():       # one pass (one compilation): variants back to back
    parts = np.split(f[F.POOLED], len(variants))
    out[name] = {f"{F.POOLED}/{v}": p for v, p in zip(variants, parts)}
  return out, panel(next(iter(split("test", 4))), pool, settings.seed)
