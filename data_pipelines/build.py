"""Build sharded TFRecords with precomputed masks, plus manifest.json.

  python -m data_pipelines.build --source=demo|folder:PATH|tfds:NAME --out=DIR \
      --masks=fh,grid[,gt] [--workers=N] [--image_size=S] [--shard_size=N]

The expensive segmentation runs here once, in parallel worker processes, never
in the training input loop. Each shard is written to a temporary file, renamed
when complete, and described by a sidecar `<shard>.json`; a rerun skips shards
whose sidecar matches the current settings, so an interrupted build resumes.
Inputs that cannot be used (unreadable, truncated, too small) are skipped,
counted and listed with the reason in the manifest; the build goes on.

Workers are spawned (not forked) and import only numpy/PIL/skimage; the main
process serializes tf.train.Examples and writes the shards.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import sys
import time
import warnings

import numpy as np
from PIL import Image

from data_pipelines import demo as demo_lib
from data_pipelines import masks as masks_lib
from data_pipelines import records
from data_pipelines.masks import fh

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SIZE = 224          # shorter side of stored real images (paper FH scale)
DEFAULT_MIN_SIDE = 32             # smaller inputs are skipped and reported


# ----------------------------------------------------------------- decoding
def to_rgb_uint8(img: Image.Image) -> np.ndarray:
  """Any PIL image -> uint8 RGB: grayscale, palette, RGBA (over white), CMYK, 16-bit."""
  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    arr = np.asarray(img).astype(np.float64)
    top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
    arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=2)
  if mode in ("RGBA", "LA", "PA", "P"):
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_image_file(path: str) -> np.ndarray:
  """Decode a file fully (truncated files raise here, not later)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with Image.open(path) as img:
      img.load()
      return to_rgb_uint8(img)


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """Resize so the shorter side is `size`, keeping the aspect ratio."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(new, Image.BICUBIC))


# ----------------------------------------------------------------- sources
def _plan(source: str, opts: dict) -> dict:
  """What to build: per split a list of items, plus dataset-level facts."""
  if source == "demo":
    d = {k: opts.get(k, v) for k, v in demo_lib.DEFAULTS.items()}
    d["size"] = opts.get("image_size") or d["size"]
    return dict(kind="demo", demo=d, demo_version=demo_lib.VERSION, image_size=d["size"],
                has_gt=True,
                num_classes=demo_lib.NUM_CLASSES, class_names=list(demo_lib.CLASSES),
                splits={"train": list(range(d["num_train"])),
                        "test": list(range(d["num_test"]))},
                photos=[n for n, _ in demo_lib.photos()])
  if source.startswith("folder:"):
    return _plan_folder(source[len("folder:"):])
  if source.startswith("tfds:"):
    return _plan_tfds(source[len("tfds:"):], opts)
  raise ValueError(f"Unknown --source={source!r}; use demo, folder:PATH or tfds:NAME.")


def _images_under(path: str) -> list[str]:
  out = []
  for root, _, files in os.walk(path):
    out += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
  return sorted(out)


def _plan_folder(path: str) -> dict:
  """Splits from train/test/val subfolders if present; labels from class subfolders."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--source=folder:{path}: no such directory.")
  subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
  split_dirs = {s: os.path.join(path, s) for s in ("train", "test", "val") if s in subdirs}
  if not split_dirs:
    split_dirs = {"train": path}
  class_names = sorted({d for sd in split_dirs.values() for d in os.listdir(sd)
                        if os.path.isdir(os.path.join(sd, d))})
  splits = {}
  for split, sd in split_dirs.items():
    items = []
    for f in _images_under(sd):
      top = os.path.relpath(f, sd).split(os.sep)[0]
      items.append((f, class_names.index(top) if top in class_names and top != os.path.basename(f)
                    else -1))
    splits[split] = items
  if not any(splits.values()):
    raise ValueError(f"--source=folder:{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
  return dict(kind="folder", path=path, has_gt=False, num_classes=len(class_names),
              class_names=class_names, splits=splits)


def _plan_tfds(name: str, opts: dict) -> dict:
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=opts.get("data_dir"))
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
    raise ValueError(f"tfds:{name} has no readable splits; is it prepared in data_dir?")
  return dict(kind="tfds", name=name, data_dir=opts.get("data_dir"), has_gt=False,
              num_classes=len(names) if names else 0, class_names=names,
              splits={s: list(range(n)) for s, n in counts.items()})


def _tfds_payload(plan, split, items) -> list:
  """Read a tfds slice in the main process (mock_data and data_dir apply here)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(plan["name"], data_dir=plan["data_dir"])
  ds = builder.as_dataset(split=f"{split}[{items[0]}:{items[-1] + 1}]", shuffle_files=False)
  out = []
  for i, ex in zip(items, tfds.as_numpy(ds)):
    out.append((i, ex["image"], int(ex.get("label", -1))))
  return out


# ----------------------------------------------------------------- worker side
def _finish(image, index, example_id, label, specs, opts, instances=None, classes=None,
            saliency=None):
  """Masks + encoding for one decoded image -> record dict (plain bytes)."""
  maps = masks_lib.compute_all(image, specs, instances=instances)
  rec = dict(image=records.encode_image(image, opts["image_format"]), fmt=opts["image_format"],
             height=image.shape[0], width=image.shape[1], index=int(index),
             example_id=example_id, label=int(label),
             masks={n: records.encode_ids(m) for n, m in maps.items()})
  if instances is not None:
    rec.update(instances=records.encode_ids(instances), classes=np.asarray(classes, np.int64))
  if saliency is not None:
    rec["saliency"] = records.encode_image(saliency, "png")
  return rec


def _prepare(image, opts):
  """Check size and resize a decoded real image; returns (image, None) or (None, reason)."""
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=2)
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  image = image[..., :3]
  if image.dtype != np.uint8:
    top = 65535.0 if image.max() > 255 else 255.0
    image = np.clip(image.astype(np.float64) / top * 255 + 0.5, 0, 255).astype(np.uint8)
  h, w = image.shape[:2]
  if min(h, w) < opts["min_side"]:
    return None, f"too small: {w}x{h} px, shorter side < --min_side={opts['min_side']}"
  return resize_shorter(image, opts["image_size"]), None


def _process_shard(job: dict) -> dict:
  """Runs in a worker: decode/generate, mask and encode one shard's inputs."""
  opts, specs, split = job["opts"], job["specs"], job["split"]
  recs, skipped = [], []
  for item in job["items"]:
    if job["kind"] == "demo":
      ex = demo_lib.example(split, item, **{k: v for k, v in opts["demo"].items()
                                           if k not in ("num_train", "num_test")})
      recs.append(_finish(ex["image"], item, f"demo/{split}/{item}", ex["label"], specs, opts,
                          ex["instances"], ex["classes"], ex["saliency"]))
      continue
    if job["kind"] == "folder":
      path, label = item
      index, example_id = job["first_index"] + len(recs) + len(skipped), path
      try:
        image = load_image_file(path)
      except Exception as e:                 # unreadable / truncated / not an image
        skipped.append(dict(split=split, input=path, reason=f"{type(e).__name__}: {e}"))
        continue
    else:                                    # tfds: already decoded in the main process
      index, image, label = item
      example_id = f"{split}/{index}"
    image, reason = _prepare(np.asarray(image), opts)
    if reason:
      skipped.append(dict(split=split, input=example_id, reason=reason))
      continue
    try:
      recs.append(_finish(image, index, example_id, label, specs, opts))
    except ValueError as e:
      skipped.append(dict(split=split, input=example_id, reason=str(e)))
  return dict(records=recs, skipped=skipped)


# ----------------------------------------------------------------- main side
def _write_shard(out_dir, fname, result, settings):
  import tensorflow as tf
  path = os.path.join(out_dir, fname)
  with tf.io.TFRecordWriter(path + ".tmp") as w:
    for rec in result["records"]:
      w.write(records.example_bytes(**rec))
  os.replace(path + ".tmp", path)
  side = dict(file=fname, count=len(result["records"]), skipped=result["skipped"],
              settings=settings)
  with open(path + ".json.tmp", "w") as f:
    json.dump(side, f)
  os.replace(path + ".json.tmp", path + ".json")
  return side


def _done(out_dir, fname, settings):
  """The sidecar of a complete shard built with the same settings and inputs, else None."""
  path = os.path.join(out_dir, fname)
  try:
    with open(path + ".json") as f:
      side = json.load(f)
  except (OSError, ValueError):
    return None
  return side if side.get("settings") == settings and os.path.exists(path) else None


def build(source: str, out_dir: str, masks=("fh", "grid", "gt"), workers: int | None = None,
          **opts) -> dict:
  """Build records for `source` into out_dir and return the manifest.

  opts: image_size (demo side / real shorter side), shard_size, fh_scales,
  fh_backend ('skimage'|'opencv'), grid_sizes, min_side, image_format,
  progress, data_dir (tfds), and the demo's num_train, num_test, seed,
  bg_correlation, max_objects. The demo defaults to FH scales rescaled to its
  image size (fh.scales_for); real data defaults to the paper's scales.
  """
  t0 = time.time()
  plan = _plan(source, opts)
  kinds = masks.split(",") if isinstance(masks, str) else list(masks)
  if "gt" in kinds and not plan["has_gt"]:
    raise ValueError(f"--masks includes 'gt' but {source} has no instance maps; "
                     f"use --masks={','.join(k for k in kinds if k != 'gt')}.")
  size = opts.get("image_size") or plan.get("image_size") or DEFAULT_IMAGE_SIZE
  fh_scales = opts.get("fh_scales") or (fh.scales_for(size) if plan["kind"] == "demo"
                                        else fh.PAPER_SCALES)
  specs = masks_lib.expand(kinds, image_size=size, fh_scales=fh_scales,
                           fh_backend=opts.get("fh_backend", "skimage"),
                           grid_sizes=opts.get("grid_sizes") or (4,))
  wopts = dict(image_size=size, min_side=opts.get("min_side", DEFAULT_MIN_SIDE),
               image_format=opts.get("image_format", "png" if plan["kind"] == "demo" else "jpeg"),
               demo=plan.get("demo"), demo_version=plan.get("demo_version"))
  shard_size = int(opts.get("shard_size") or (250 if plan["kind"] == "demo" else 1000))
  settings = dict(source=source, specs=specs, opts=wopts, shard_size=shard_size)
  os.makedirs(out_dir, exist_ok=True)

  jobs, sides = [], {}
  for split, items in plan["splits"].items():
    n_shards = max(1, -(-len(items) // shard_size))
    for s in range(n_shards):
      fname = records.shard_name(split, s, n_shards)
      chunk = items[s * shard_size:(s + 1) * shard_size]
      # A shard is reused only if built from the same inputs (e.g. the same files).
      shard_settings = dict(settings, inputs=hashlib.sha1(repr(chunk).encode()).hexdigest())
      side = _done(out_dir, fname, shard_settings)
      if side is not None:
        sides[fname] = side
      else:
        jobs.append(dict(kind=plan["kind"], split=split, fname=fname, items=chunk,
                         first_index=s * shard_size, opts=wopts, specs=specs,
                         settings=shard_settings))
  total = sum(len(j["items"]) for j in jobs)
  workers = max(1, int(workers or os.cpu_count() or 1))
  from tqdm import tqdm
  bar = tqdm(total=total, desc=f"build {source}", unit="img", file=sys.stderr,
             disable=not opts.get("progress", True) or total == 0)

  def payload(job):
    if plan["kind"] == "tfds" and job["items"]:
      job = dict(job, items=_tfds_payload(plan, job["split"], job["items"]))
    return job

  def finish(job, result):
    sides[job["fname"]] = _write_shard(out_dir, job["fname"], result, job["settings"])
    bar.update(len(job["items"]))

  if workers == 1 or len(jobs) <= 1:
    for job in jobs:
      finish(job, _process_shard(payload(job)))
  else:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      pending, todo = {}, list(jobs)
      while todo or pending:           # at most 2 shards per worker in flight (memory)
        while todo and len(pending) < 2 * workers:
          job = todo.pop(0)
          pending[pool.submit(_process_shard, payload(job))] = job
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for fut in done:
          finish(pending.pop(fut), fut.result())
  bar.close()

  splits, skipped = {}, []
  for split in plan["splits"]:
    names = sorted(f for f in sides if f.startswith(split + "-"))
    shards = [dict(file=f, count=sides[f]["count"]) for f in names]
    splits[split] = dict(count=sum(s["count"] for s in shards), shards=shards)
    skipped += [x for f in names for x in sides[f]["skipped"]]
  manifest = dict(
      schema_version=records.SCHEMA_VERSION, complete=True, source=source,
      image_size=size, image_size_meaning=("square side" if plan["kind"] == "demo"
                                           else "shorter side"),
      num_classes=plan["num_classes"], class_names=plan["class_names"],
      has_gt=plan["has_gt"], splits=splits, masks=specs,
      fh_scale_rule=(f"paper scales x (image_size/224)^{fh.SCALE_EXPONENT} (fh.scales_for: "
                     "keeps the 224 px segment counts at smaller sizes)"
                     if tuple(fh_scales) != fh.PAPER_SCALES else "paper scales"),
      skipped=skipped, num_skipped=len(skipped), demo=plan.get("demo"),
      demo_version=plan.get("demo_version"), demo_photos=plan.get("photos"), build_seconds=round(time.time() - t0, 1))
  records.write_manifest(out_dir, manifest)
  return manifest


def write_records(out_dir: str, examples: dict, *, shard_size: int = 1000, num_classes: int = 0,
                  class_names=(), source: str = "arrays") -> dict:
  """Records + manifest from in-memory examples, for tests and small custom data.

  examples: {split: [dict(image=uint8 [H,W,3], masks={name: id map}, label=-1,
  instances=None, classes=None)]}; indices are positions in each list. Uses the
  same writer and manifest as `build`, so readers see no difference.
  """
  os.makedirs(out_dir, exist_ok=True)
  splits, names, has_gt = {}, set(), True
  for split, exs in examples.items():
    n_shards = max(1, -(-len(exs) // shard_size))
    shards = []
    for s in range(n_shards):
      recs = []
      for i in range(s * shard_size, min(len(exs), (s + 1) * shard_size)):
        ex = exs[i]
        names |= set(ex["masks"])
        has_gt &= ex.get("instances") is not None
        rec = dict(image=records.encode_image(ex["image"], "png"), fmt="png",
                   height=ex["image"].shape[0], width=ex["image"].shape[1], index=i,
                   example_id=f"{source}/{split}/{i}", label=int(ex.get("label", -1)),
                   masks={n: records.encode_ids(m) for n, m in ex["masks"].items()})
        if ex.get("instances") is not None:
          rec.update(instances=records.encode_ids(ex["instances"]), classes=ex["classes"])
        recs.append(rec)
      fname = records.shard_name(split, s, n_shards)
      side = _write_shard(out_dir, fname, dict(records=recs, skipped=[]), {"source": source})
      shards.append(dict(file=fname, count=side["count"]))
    splits[split] = dict(count=sum(x["count"] for x in shards), shards=shards)
  manifest = dict(schema_version=records.SCHEMA_VERSION, complete=True, source=source,
                  image_size=None, num_classes=num_classes, class_names=list(class_names),
                  has_gt=has_gt, splits=splits, masks={n: {"kind": n.split("_")[0]} for n in
                                                       sorted(names)},
                  skipped=[], num_skipped=0)
  records.write_manifest(out_dir, manifest)
  return manifest


def ensure_demo_records(out_dir: str, **opts) -> dict:
  """The demo records in out_dir, building them unless a complete, current set exists.

  A set built by an older demo generator (manifest demo_version != demo.VERSION)
  is rebuilt, so training never reads scenes the code no longer makes.
  """
  try:
    manifest = records.read_manifest(out_dir)
    if (manifest.get("complete") and manifest.get("source") == "demo"
        and manifest.get("demo_version") == demo_lib.VERSION):
      return manifest
  except (FileNotFoundError, ValueError):
    pass
  return build("demo", out_dir, masks=("fh", "grid", "gt"), **opts)


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", required=True, help="demo | folder:PATH | tfds:NAME")
  p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
  p.add_argument("--masks", default="fh,grid", help="comma list of fh, grid, gt")
  p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
  p.add_argument("--image_size", type=int, default=None,
                 help="demo: square side (96); real images: shorter side (224)")
  p.add_argument("--shard_size", type=int, default=None,
                 help="examples per shard (demo 250, else 1000); >= 1 shard per host")
  p.add_argument("--fh_scales", default=None,
                 help="e.g. 500,1000,1500 (default: paper's; demo: rescaled to its size)")
  p.add_argument("--fh_backend", default="skimage", choices=fh.BACKENDS)
  p.add_argument("--grid_sizes", default="4", help="e.g. 2,4")
  p.add_argument("--min_side", type=int, default=DEFAULT_MIN_SIDE,
                 help="skip (and report) images whose shorter side is smaller")
  p.add_argument("--num_train", type=int, default=None, help="demo only")
  p.add_argument("--num_test", type=int, default=None, help="demo only")
  p.add_argument("--seed", type=int, default=None, help="demo only")
  p.add_argument("--bg_correlation", type=float, default=None, help="demo only, in [0, 1]")
  p.add_argument("--data_dir", default=None, help="tfds data_dir")
  a = p.parse_args(argv)
  opts = {k: v for k, v in vars(a).items()
          if v is not None and k not in ("source", "out", "masks", "workers")}
  if "fh_scales" in opts:
    opts["fh_scales"] = tuple(int(s) for s in opts["fh_scales"].split(","))
  opts["grid_sizes"] = tuple(int(s) for s in a.grid_sizes.split(","))
  m = build(a.source, a.out, masks=a.masks, workers=a.workers, **opts)
  counts = ", ".join(f"{s}: {v['count']}" for s, v in m["splits"].items())
  print(f"Wrote {a.out}: {counts}; masks {', '.join(m['masks'])}; "
        f"{m['num_skipped']} inputs skipped (see manifest.json); {m['build_seconds']} s.")
  for x in m["skipped"][:10]:
    print(f"  skipped {x['input']}: {x['reason']}")


if __name__ == "__main__":
  main()
