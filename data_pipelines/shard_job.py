"""One shard's job, the unit both runners execute: read its inputs, compute masks (+
saliency, backgrounds), encode the records and write the shard with its sidecar.

build.py plans the shards and runs them locally (worker processes call
process_shard; the main process writes); beam.py runs run_job on each Beam worker.
Workers are spawned (not forked) and import only this module's light dependencies
(numpy/PIL/skimage/numba; TensorFlow only where a tfds source or gs:// needs it).
"""
from __future__ import annotations

import collections
import json

import numpy as np

from data_pipelines import demo as demo_lib
from data_pipelines import masks as masks_lib
from data_pipelines import records, sources, tfds_segmentation
from data_pipelines.decode import DEFAULT_MAX_ASPECT, load_image_file, prepare
from data_pipelines.masks import tiled_background as background_lib
from data_pipelines.masks import saliency as saliency_lib


# ----------------------------------------------------------------- worker side
def _finish(image, index, example_id, label, specs, opts, instances=None, classes=None):
  """Masks (+ saliency) + encoding for one decoded image -> record dict (plain bytes)."""
  maps = masks_lib.compute_all(image, specs, instances=instances)
  rec = dict(image=records.encode_image(image, opts["image_format"]), fmt=opts["image_format"],
             height=image.shape[0], width=image.shape[1], index=int(index),
             example_id=example_id, label=int(label),
             masks={n: records.encode_ids(m) for n, m in maps.items()})
  if instances is not None:
    rec.update(instances=records.encode_ids(instances), classes=np.asarray(classes, np.int64))
  if opts.get("saliency"):
    sal = saliency_lib.compute(image, opts["saliency"])
    rec["saliency"] = records.encode_saliency(sal)
    if opts.get("background"):
      rec["background"] = records.encode_image(
          background_lib.tiled(image, sal, opts["background"]), "png")
  return rec


def _prepare(image, opts):
  """Check size and resize a decoded real image; returns (image, None) or (None, reason)."""
  return prepare(image, opts["image_size"], opts["min_side"],
                 opts.get("max_aspect", DEFAULT_MAX_ASPECT))


def _read_demo(job: dict, item: int, index: int) -> dict:
  """A generated scene, already at its stored size, with its instance map and classes."""
  ex = demo_lib.example(job["split"], item, **{k: v for k, v in job["opts"]["demo"].items()
                                               if k not in ("num_train", "num_test")})
  return dict(index=item, example_id=f"demo/{job['split']}/{item}", image=ex["image"],
              label=ex["label"], gt=(ex["instances"], ex["classes"]), prepared=True)


def _read_folder(job: dict, item: tuple, index: int) -> dict:
  """An image file; one that cannot be read comes back with the reason to skip it."""
  path, label = item
  try:
    image = load_image_file(path)
  except Exception as e:                     # unreadable / truncated / not an image
    return dict(example_id=path, reason=f"{type(e).__name__}: {e}")
  return dict(index=index, example_id=path, image=image, label=label, gt=None, prepared=False)


def _read_tfds(job: dict, item: tuple, index: int) -> dict:
  """A tfds example, decoded by payload(): (index, image, label, gt or None)."""
  index, image, label, gt = item
  return dict(index=index, example_id=f"{job['split']}/{index}", image=image, label=label,
              gt=gt, prepared=False)


# job['kind'] -> reader(job, item, index) -> dict(index, example_id, image, label, gt,
# prepared: already at the stored size), or dict(example_id, reason) for an input to skip.
READERS = {"demo": _read_demo, "folder": _read_folder, "tfds": _read_tfds}


def process_shard(job: dict) -> dict:
  """Decode/generate, mask and encode one shard's inputs (a worker's whole job).

  Returns {'records': [record dicts for records.example_bytes], 'skipped': [...]}.
  """
  opts, specs, split = job["opts"], job["specs"], job["split"]
  read = READERS[job["kind"]]
  recs, skipped = [], []
  for item in job["items"]:
    index = job.get("first_index", 0) + len(recs) + len(skipped)
    x = read(job, item, index)
    image, gt, reason = x.get("image"), x.get("gt"), x.get("reason")
    if not reason and not x["prepared"]:
      raw_shape = np.shape(image)
      image, reason = _prepare(np.asarray(image), opts)
      if not reason and gt is not None:
        gt, reason = tfds_segmentation.fit(gt, raw_shape, image.shape)
    if reason:
      skipped.append(dict(split=split, input=x["example_id"], reason=reason))
      continue
    try:
      recs.append(_finish(image, x["index"], x["example_id"], x["label"], specs, opts,
                          *(gt or (None, None))))
    except ValueError as e:
      skipped.append(dict(split=split, input=x["example_id"], reason=str(e)))
  return dict(records=recs, skipped=skipped)


def payload(plan: dict, job: dict) -> dict:
  """The job with its inputs readable by a worker (tfds slices are decoded here)."""
  if plan["kind"] == "tfds" and job["items"]:
    return dict(job, items=sources.tfds_payload(plan, job["split"], job["items"]))
  return job


# ----------------------------------------------------------------- writing
def write_shard(out_dir, fname, result, settings) -> dict:
  """Shard file + its sidecar; returns the sidecar (count, bytes, sha256, skipped)."""
  path = records.join(out_dir, fname)
  digest = records.write_shard(path, (records.example_bytes(**r) for r in result["records"]))
  labels = collections.Counter(str(r["label"]) for r in result["records"])
  side = dict(file=fname, count=len(result["records"]), skipped=result["skipped"],
              labels=dict(sorted(labels.items())), settings=settings, **digest)
  records.write_text(path + ".json", json.dumps(side))
  return side


def done(out_dir, fname, settings):
  """The sidecar of a complete shard built with the same settings and inputs, else None."""
  path = records.join(out_dir, fname)
  try:
    side = json.loads(records.read_text(path + ".json"))
  except (OSError, ValueError):
    return None
  except Exception as e:                       # tf.errors.NotFoundError on gs://
    if type(e).__name__ == "NotFoundError":
      return None
    raise
  return side if side.get("settings") == settings and records.exists(path) else None


def run_job(out_dir: str, plan: dict, job: dict) -> dict:
  """payload -> process_shard -> write_shard, all in one place (a Beam worker's step)."""
  return write_shard(out_dir, job["fname"], process_shard(payload(plan, job)), job["settings"])
