"""Build sources: what to build (a plan) and how a worker gets each input.

  demo          the embedded demo scenes (data_pipelines/demo.py), generated per index
  folder:PATH   image files under PATH (local or gs://), laid out as tfds ImageFolder:
                PATH/[train|test|val/]CLASS/**/IMAGE, class = subfolder (see plan_folder)
  tfds:NAME     a TensorFlow Datasets builder (prepared in --data_dir, or from
                manual_dir downloads, e.g. imagenet2012); GT instance maps where
                tfds_segmentation.py lists its segmentation feature (oxford_iiit_pet)

A plan is a plain dict: kind, per-split item lists, and dataset-level facts
(classes, ground truth). Items are small (an index or a path), so they travel
to build workers (processes, Beam workers) cheaply; `load` turns one into a
decoded image there.
"""
from __future__ import annotations

import os
import posixpath

from data_pipelines import demo as demo_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def plan(source: str, opts: dict) -> dict:
  """What to build: per split a list of items, plus dataset-level facts."""
  if source == "demo":
    return plan_demo(opts)
  if source.startswith("folder:"):
    return plan_folder(source[len("folder:"):])
  if source.startswith("tfds:"):
    return plan_tfds(source[len("tfds:"):], opts)
  raise ValueError(f"Unknown --source={source!r}; use demo, folder:PATH or tfds:NAME.")


def plan_demo(opts: dict) -> dict:
  d = {k: opts.get(k, v) for k, v in demo_lib.DEFAULTS.items()}
  d["size"] = opts.get("image_size") or d["size"]
  return dict(kind="demo", demo=d, demo_version=demo_lib.VERSION, image_size=d["size"],
              has_gt=True,
              num_classes=demo_lib.NUM_CLASSES, class_names=list(demo_lib.CLASSES),
              splits={"train": list(range(d["num_train"])),
                      "test": list(range(d["num_test"]))},
              photos=[n for n, _ in demo_lib.photos()])


# --- folders (local or gs://) ------------------------------------------------

def _remote(path: str) -> bool:
  return "://" in path


def _isdir(path: str) -> bool:
  if _remote(path):
    import tensorflow as tf
    return tf.io.gfile.isdir(path)
  return os.path.isdir(path)


def _subdirs(path: str) -> list[str]:
  if _remote(path):
    import tensorflow as tf
    return sorted(d.rstrip("/") for d in tf.io.gfile.listdir(path)
                  if tf.io.gfile.isdir(posixpath.join(path, d)))
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def images_under(path: str) -> list[str]:
  """Image files below path, sorted (the build order, hence record indices)."""
  out = []
  if _remote(path):
    import tensorflow as tf
    for root, _, files in tf.io.gfile.walk(path):
      out += [posixpath.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
  else:
    for root, _, files in os.walk(path):
      out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
  return sorted(out)


def _utf8(path: str) -> bool:
  """False for a local name os.walk decoded with surrogate escapes (bytes not UTF-8)."""
  try:
    path.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def _printable(path: str) -> str:
  """The path with its non-UTF-8 bytes as \\xNN, printable and JSON-safe."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def plan_folder(path: str) -> dict:
  """The ImageFolder convention: PATH/[SPLIT/]CLASS/**/IMAGE.

  Splits come from train/test/val subfolders if present (else all is 'train');
  the label is the sorted index of the first folder below the split (deeper
  folders belong to that class); class names are the union over splits. A
  folder with no subfolders at all is unlabelled (label -1, num_classes 0),
  e.g. photos for pretraining only. Where class subfolders exist, image files
  beside them have no class: they are listed in 'outside' and skipped (with a
  reason in the manifest), not given a label of their own.
  """
  if not _isdir(path):
    raise FileNotFoundError(f"--source=folder:{path}: no such directory; give a folder of "
                            "images, laid out PATH/CLASS/IMAGE (see docs/data.md).")
  join = posixpath.join if _remote(path) else os.path.join
  subdirs = _subdirs(path)
  split_dirs = {s: join(path, s) for s in ("train", "test", "val") if s in subdirs}
  if not split_dirs:
    split_dirs = {"train": path}
  class_names = sorted({d for sd in split_dirs.values() for d in _subdirs(sd)})
  splits, outside = {}, []
  for split, sd in split_dirs.items():
    items = []
    for f in images_under(sd):
      parts = f[len(sd):].lstrip("/" + os.sep).replace(os.sep, "/").split("/")
      if not _utf8(f):   # the records store the path as example/id (UTF-8)
        outside.append(dict(split=split, input=_printable(f), reason="the file name is not "
                            "valid UTF-8; rename it (e.g. convmv -f latin1 -t utf8) to use it"))
      elif len(parts) > 1:
        items.append((f, class_names.index(parts[0])))
      elif class_names:
        outside.append(dict(split=split, input=f, reason="not in a class subfolder "
                            f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}); "
                            "move it into one to use it"))
      else:
        items.append((f, -1))
    splits[split] = items
  if not any(splits.values()):
    raise ValueError(f"--source=folder:{path} holds no image files "
                     f"({', '.join(IMAGE_SUFFIXES)}){' in class subfolders' if outside else ''}; "
                     "put images in PATH/CLASS/ (or PATH/ for unlabelled data).")
  return dict(kind="folder", path=path, has_gt=False, num_classes=len(class_names),
              class_names=class_names, splits=splits, outside=outside)


# --- TensorFlow Datasets -------------------------------------------------------

def plan_tfds(name: str, opts: dict) -> dict:
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=opts.get("data_dir"))
  except tfds.core.registered.DatasetNotFoundError:
    import difflib
    close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(
        with_community_datasets=False), n=3)
    raise ValueError(f"--source=tfds:{name}: no such TensorFlow Datasets builder"
                     f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; see "
                     "https://www.tensorflow.org/datasets/catalog for names.") from None
  info = builder.info
  if "image" not in info.features:
    raise ValueError(f"tfds:{name} has no 'image' feature; features: {list(info.features)}.")
  label = info.features["label"] if "label" in info.features else None
  names = list(getattr(label, "names", []) or [])
  counts = {s: info.splits[s].num_examples for s in info.splits}
  if not counts:            # no split metadata (e.g. tfds.testing.mock_data): count them
    for s in ("train", "validation", "test"):
      try:
        counts[s] = int(builder.as_dataset(split=s).reduce(0, lambda n, _: n + 1))
      except Exception:
        continue
  if not counts:
    raise ValueError(f"tfds:{name} has no readable splits; prepare it first, e.g. "
                     f"`tfds build {name} --data_dir=DIR --manual_dir=DOWNLOADS` "
                     "(see docs/data.md), then pass --data_dir=DIR.")
  from data_pipelines import tfds_segmentation
  has_gt = tfds_segmentation.lookup(name, info.features) is not None
  return dict(kind="tfds", name=name, data_dir=opts.get("data_dir"), has_gt=has_gt,
              num_classes=len(names) if names else 0, class_names=names,
              splits={s: list(range(n)) for s, n in counts.items()})


def tfds_payload(plan_: dict, split: str, items) -> list:
  """Decoded (index, image, label, gt) of a contiguous tfds slice (mock_data applies
  here); gt: (instance map, classes) from tfds_segmentation where has_gt, else None."""
  import tensorflow_datasets as tfds

  from data_pipelines import tfds_segmentation
  builder = tfds.builder(plan_["name"], data_dir=plan_["data_dir"])
  ds = builder.as_dataset(split=f"{split}[{items[0]}:{items[-1] + 1}]", shuffle_files=False)
  out = []
  for i, ex in zip(items, tfds.as_numpy(ds)):
    label = int(ex.get("label", -1))
    gt = tfds_segmentation.instances(plan_["name"], ex, label) if plan_["has_gt"] else None
    out.append((i, ex["image"], label, gt))
  return out
