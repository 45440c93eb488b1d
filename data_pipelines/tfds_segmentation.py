"""Ground-truth instance maps from a tfds dataset's segmentation feature.

REGISTRY maps a tfds dataset name (no config or version) to (feature, converter);
the converter turns that feature's decoded array [H, W(, 1)] into an instance map
(int32, 0 = background, k = instance k). A build of such a dataset stores the map
as the record's gt/instances (with the image's label as every instance's class),
exactly as the demo stores its scenes' instances, and sets has_gt, so that
--masks=...,gt and --evals=background,masks,retrieval serve its records. Datasets
not listed keep has_gt False. Adding one is one line here.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def trimap_foreground(mask: np.ndarray) -> np.ndarray:
  """Oxford-IIIT Pet trimap (1 = pet, 2 = background, 3 = border) -> instance 1 = pet + border.

  The border is the annotators' unsure band along the outline (fur, edges). It is
  counted as foreground because the background evaluation moves the foreground onto
  other backgrounds and fills its hole from the image's own background: left in the
  background, the band would carry a pet-shaped ring of pet pixels into Only-BG-T
  and the tiled backgrounds (the class leaking into "background only"); in the
  foreground it carries a thin ring of the original background instead, the
  smaller harm, and like ImageNet-9's box foregrounds it errs towards the object.
  """
  m = np.asarray(mask)
  m = m[..., 0] if m.ndim == 3 else m
  return ((m == 1) | (m == 3)).astype(np.int32)


def binary_foreground(mask: np.ndarray) -> np.ndarray:
  """A 0..255 grey foreground mask -> instance 1 above mid-grey (> 127). CUB-200-2011's
  masks are grey levels (cv2 reads them with flags=0); the threshold is not checked
  against the real files here (nothing is downloaded in tests)."""
  m = np.asarray(mask)
  m = m[..., 0] if m.ndim == 3 else m
  return (m > 127).astype(np.int32)


REGISTRY = {
    "oxford_iiit_pet": ("segmentation_mask", trimap_foreground),
    "caltech_birds2011": ("segmentation_mask", binary_foreground),
}


def lookup(name: str, features=None):
  """(feature, converter) for the tfds builder `name` (e.g. 'oxford_iiit_pet:4.*.*'),
  or None when it has no registered segmentation feature (or its features lack it)."""
  entry = REGISTRY.get(name.split(":")[0].split("/")[0])
  if entry is None or (features is not None and entry[0] not in features):
    return None
  return entry


def instances(name: str, example: dict, label: int):
  """(instance map, classes) from one decoded tfds example, or None without GT."""
  entry = lookup(name)
  if entry is None:
    return None
  inst = entry[1](example[entry[0]])
  return inst, np.full(int(inst.max()), label, np.int64)


def fit(gt, raw_shape, shape):
  """The GT at the stored image's size (nearest neighbour, as the image was resized):
  ((instances, classes), None), or (None, reason) when the map does not match the
  image it came with."""
  inst, classes = gt
  if inst.shape[:2] != tuple(raw_shape[:2]):
    return None, (f"segmentation map {inst.shape[1]}x{inst.shape[0]} px differs from its "
                  f"image's {raw_shape[1]}x{raw_shape[0]}")
  if inst.shape[:2] != tuple(shape[:2]):
    inst = np.asarray(Image.fromarray(inst.astype(np.int32)).resize(
        (shape[1], shape[0]), Image.NEAREST)).astype(np.int32)
  return (inst, classes), None
