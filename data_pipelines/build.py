"""Build sharded TFRecords with precomputed masks, plus manifest.json.

  python -m data_pipelines.build --source=demo|folder:PATH|tfds:NAME --out=DIR \
      --masks=fh,grid[,gt][,mcg][,saliency][,background] [--saliency=mbd|spectral|geodesic] \
      [--workers=N] [--image_size=S] [--shard_size=N] \
      [--runner=local|beam [Beam pipeline options, e.g. --direct_num_workers=2]]

The expensive segmentation and saliency run here once, never in the training
input loop. `saliency` in --masks (or --saliency=DETECTOR) stores one saliency
map per image (masks/saliency.py; default detector saliency.DEFAULT).
`background` in --masks also stores a tiled background per image (the binarised
saliency's hole filled from the surrounding background: masks/tiled_background.py), for
the background augmentations (data_pipelines/background_augment.py); it implies saliency.
Sources (sources.py) say what to build; decode.py turns each input into uint8
RGB at the stored size; shard_job.py computes masks, encodes and writes one shard;
this module plans the shards, runs them and writes the manifest.

Runners: 'local' (default) uses worker processes on this machine; 'beam' runs
the same per-shard job (shard_job.py) as an Apache Beam pipeline (beam.py: the
DirectRunner locally, Dataflow with the usual pipeline options). Both write
byte-identical shards (records.py serializes deterministically).

Each shard is written to a temporary file, moved into place when complete, and
described by a sidecar `<shard>.json` (count, size, sha256, settings); a rerun
skips shards whose sidecar matches the current settings, so an interrupted
build resumes. Inputs that cannot be used (unreadable, truncated, too small)
are skipped, counted and listed with the reason in the manifest; the build
goes on. OUT may be a local directory or a gs:// URL.

Workers are spawned (not forked) and import only numpy/PIL/skimage(/numba);
the main process serializes tf.train.Examples and writes the shards.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time

from data_pipelines import demo as demo_lib
from data_pipelines import masks as masks_lib
from data_pipelines import records, sources
from data_pipelines.decode import (DEFAULT_IMAGE_SIZE, DEFAULT_MAX_ASPECT,  # noqa: F401 (API)
                                   DEFAULT_MIN_SIDE, resize_shorter, to_rgb_uint8)
from data_pipelines.masks import tiled_background as background_lib
from data_pipelines.masks import fh
from data_pipelines.masks import saliency as saliency_lib
from data_pipelines.shard_job import done, payload, process_shard, write_shard
from data_pipelines.sources import IMAGE_SUFFIXES  # noqa: F401 (API)

RUNNERS = ("local", "beam")


# ----------------------------------------------------------------- the build
class OtherSourceError(ValueError):
  """The output directory holds what a build must not replace (never written into):
  records of another source, files that are not records (a user's own), or records
  of the same source built with other settings (unless overwrite=True)."""


def _json(path: str):
  try:
    return json.loads(records.read_text(path))
  except Exception:   # unreadable or not JSON: not ours
    return None


def _is_records_manifest(m) -> bool:
  return isinstance(m, dict) and all(k in m for k in ("schema_version", "source"))


def _is_sidecar(side) -> bool:
  return (isinstance(side, dict) and "file" in side
          and isinstance(side.get("settings"), dict) and "source" in side["settings"])


def _flat_settings(settings: dict) -> dict:
  """Build settings with the worker options lifted to the top and 'specs' named 'masks'."""
  flat = {("masks" if k == "specs" else k): v for k, v in settings.items() if k != "opts"}
  flat.update(settings.get("opts") or {})
  return flat


def _changed(stored: dict, settings: dict) -> list[str]:
  """'what: before -> now' for the build settings that differ (masks, image size...)."""
  old, new = _flat_settings(stored), _flat_settings(json.loads(json.dumps(settings)))

  def show(key, value):
    return ",".join(value) if key == "masks" and isinstance(value, dict) else repr(value)

  return [f"{k}: {show(k, old.get(k))} -> {show(k, new.get(k))}"
          for k in sorted(old.keys() | new.keys())
          if k != "inputs" and old.get(k) != new.get(k)]


def check_out_dir(out_dir: str, source: str, settings: dict | None = None,
                  overwrite: bool = False) -> None:
  """Refuse an out_dir that holds anything but this project's records of `source`, so
  that a build (or the demo preset's build_demo) never replaces what it did not write.

  Ours: a records manifest.json, shard sidecars (<shard>.json), shards with a sidecar
  or listed in the manifest, and the temporaries of an interrupted write. Refused: any
  other file (named), records whose manifest or sidecars name another source, and --
  given `settings` -- records of this source built with other settings (other masks,
  image size...), unless overwrite (the build then replaces them).
  """
  names = records.listdir(out_dir)
  manifest, sides, foreign = None, {}, []
  if records.MANIFEST in names:
    manifest = _json(records.join(out_dir, records.MANIFEST))
    if not _is_records_manifest(manifest):
      foreign.append(records.MANIFEST)
      manifest = None
  for name in names:
    if name.endswith(".tfrecord.json"):
      side = _json(records.join(out_dir, name))
      if _is_sidecar(side):
        sides[name[:-len(".json")]] = side
      else:
        foreign.append(name)
  listed = {s.get("file") for split in (manifest or {}).get("splits", {}).values()
            for s in split.get("shards", [])}
  for name in names:
    if name in (records.MANIFEST, records.MANIFEST + ".tmp") or name.endswith(
        (".tfrecord.json", ".tfrecord.json.tmp")):
      continue
    if name.endswith(".tfrecord") and (name in sides or name in listed):
      continue
    if name.startswith("tmp") and name.endswith(".tfrecord.tmp"):   # records.write_shard's
      continue
    foreign.append(name)
  if foreign:
    raise OtherSourceError(
        f"{records.join(out_dir, sorted(foreign)[0])} is not part of this project's records; "
        f"refusing to build {source} records in {out_dir}. Choose another --out (for the demo "
        "preset: --config.data.records_dir) or an empty directory.")
  found = {str(manifest["source"])} if manifest else set()
  found |= {str(side["settings"]["source"]) for side in sides.values()}
  other = sorted(f for f in found if f != source)
  if other:
    raise OtherSourceError(
        f"{out_dir} holds records built from {other[0]} ({records.MANIFEST}); refusing to "
        f"write {source} records there. Choose another --out (for the demo preset: "
        "--config.data.records_dir), delete the directory to replace them, or train on "
        "them with --config.data.build_demo=False.")
  if settings is None or overwrite:
    return
  for name, side in sorted(sides.items()):
    changed = _changed(side["settings"], settings)
    if changed:
      raise OtherSourceError(
          f"{out_dir} holds {source} records built with other settings ({'; '.join(changed)}; "
          f"{name}.json); refusing to replace them. Pass --overwrite to rebuild them with "
          "these settings, or choose another --out.")


def _saliency_detector(kinds: list, saliency) -> str | None:
  """The saliency detector to store: --saliency, or the default when 'saliency' is
  among the mask kinds (removed from them); None for no saliency."""
  if "saliency" in kinds:
    kinds.remove("saliency")
    saliency = saliency or saliency_lib.DEFAULT
  if saliency in (None, "", "none"):
    return None
  saliency_lib.detector(saliency)            # unknown names fail here, before any work
  return saliency


def plan_build(source: str, out_dir: str, masks=("fh", "grid", "gt"), saliency=None,
               overwrite: bool = False, **opts) -> dict:
  """Everything a runner needs: the source plan, mask specs, and the shard jobs
  still to do (complete shards with matching sidecars are kept in 'sides').
  overwrite: replace records of this source built with other settings (refused
  otherwise: check_out_dir)."""
  plan = sources.plan(source, opts)
  kinds = masks.split(",") if isinstance(masks, str) else list(masks)
  background = background_lib.DEFAULT if "background" in kinds else None
  if background:                # built from the saliency map: implies it
    kinds.remove("background")
    saliency = saliency or saliency_lib.DEFAULT
  saliency = _saliency_detector(kinds, saliency)
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
               max_aspect=opts.get("max_aspect", DEFAULT_MAX_ASPECT),
               image_format=opts.get("image_format", "png" if plan["kind"] == "demo" else "jpeg"),
               demo=plan.get("demo"), demo_version=plan.get("demo_version"),
               saliency=saliency, background=background)
  shard_size = int(opts.get("shard_size") or (250 if plan["kind"] == "demo" else 1000))
  settings = dict(source=source, specs=specs, opts=wopts, shard_size=shard_size)
  check_out_dir(out_dir, source, settings, overwrite)
  try:   # fail now, not after the first shard's masks
    records.makedirs(out_dir)
    if not records.is_remote(out_dir):
      with tempfile.TemporaryFile(dir=out_dir):
        pass
  except OSError as e:
    raise OSError(f"--out={out_dir}: cannot write there ({e.strerror or e}); choose a "
                  "writable directory.") from None

  jobs, sides = [], {}
  for split, items in plan["splits"].items():
    n_shards = max(1, -(-len(items) // shard_size))
    for s in range(n_shards):
      fname = records.shard_name(split, s, n_shards)
      chunk = items[s * shard_size:(s + 1) * shard_size]
      # A shard is reused only if built from the same inputs (e.g. the same files).
      shard_settings = dict(settings, inputs=hashlib.sha1(repr(chunk).encode()).hexdigest())
      side = done(out_dir, fname, shard_settings)
      if side is not None:
        sides[fname] = side
      else:
        jobs.append(dict(kind=plan["kind"], split=split, fname=fname, items=chunk,
                         first_index=s * shard_size, opts=wopts, specs=specs,
                         settings=shard_settings))
  return dict(source=source, out_dir=out_dir, plan=plan, specs=specs, size=size,
              fh_scales=tuple(fh_scales), jobs=jobs, sides=sides, saliency=saliency,
              background=background)


def _run_local(b: dict, workers: int | None, progress: bool) -> None:
  jobs, out_dir, plan = b["jobs"], b["out_dir"], b["plan"]
  total = sum(len(j["items"]) for j in jobs)
  workers = max(1, int(workers or os.cpu_count() or 1))
  from tqdm import tqdm
  bar = tqdm(total=total, desc=f"build {b['source']}", unit="img", file=sys.stderr,
             disable=not progress or total == 0)

  def finish(job, result):
    b["sides"][job["fname"]] = write_shard(out_dir, job["fname"], result, job["settings"])
    bar.update(len(job["items"]))

  if workers == 1 or len(jobs) <= 1:
    for job in jobs:
      finish(job, process_shard(payload(plan, job)))
  else:
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_exit_with_parent,
                                  initargs=(os.getpid(),))
    try:
      pending, todo = {}, list(jobs)
      while todo or pending:           # at most 2 shards per worker in flight (memory)
        while todo and len(pending) < 2 * workers:
          job = todo.pop(0)
          pending[pool.submit(process_shard, payload(plan, job))] = job
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for fut in done:
          finish(pending.pop(fut), fut.result())
    except BaseException as e:         # a signal (Stopped, train's Interrupted), Ctrl-C, an
      _stop_workers(pool, signalled=not isinstance(e, Exception))   # error: stop the
      raise                            # workers now, not after their current shard
    pool.shutdown()
  bar.close()


def _exit_with_parent(parent: int) -> None:
  """Worker initializer: exit when the build process is gone (even after kill -9)."""
  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)
  threading.Thread(target=watch, daemon=True).start()


def _stop_workers(pool: cf.ProcessPoolExecutor, signalled: bool = False) -> None:
  """Terminate the workers mid-shard (shutdown alone would wait for their shards).

  After a signal the pool is not shut down: the signal may have landed while this
  thread held the pool's lock (inside submit), and shutdown would wait for it
  forever; the CLI leaves with os._exit instead (main)."""
  processes = list((getattr(pool, "_processes", None) or {}).values())
  for p in processes:
    p.terminate()
  if not signalled:
    pool.shutdown(wait=False, cancel_futures=True)
  for p in processes:
    p.join(5)


class Stopped(BaseException):
  """SIGTERM/SIGINT during the CLI build (complete shards stay; a rerun resumes)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _raise_stopped(signum, frame):
  raise Stopped(signum)


def finish_manifest(b: dict, seconds: float, **extra) -> dict:
  """manifest.json from the shards' sidecars (written last: its presence means complete)."""
  plan, sides, fh_scales = b["plan"], b["sides"], b["fh_scales"]
  splits, skipped = {}, []
  for split in plan["splits"]:
    names = sorted(f for f in sides if f.startswith(split + "-"))
    shards = [{k: sides[f][k] for k in ("file", "count", "bytes", "sha256") if k in sides[f]}
              for f in names]
    splits[split] = dict(count=sum(s["count"] for s in shards), shards=shards)
    if plan["class_names"]:   # examples per class, from the shards' sidecars
      labels = collections.Counter()
      for f in names:
        labels.update(sides[f].get("labels", {}))
      splits[split]["class_counts"] = {n: labels.get(str(i), 0)
                                       for i, n in enumerate(plan["class_names"])}
    skipped += [x for f in names for x in sides[f]["skipped"]]
  skipped += plan.get("outside", [])
  manifest = dict(
      schema_version=records.SCHEMA_VERSION, complete=True, source=b["source"],
      image_size=b["size"], image_size_meaning=("square side" if plan["kind"] == "demo"
                                                else "shorter side"),
      num_classes=plan["num_classes"], class_names=plan["class_names"],
      has_gt=plan["has_gt"], splits=splits, masks=b["specs"],
      fh_scale_rule=(f"paper scales x (image_size/224)^{fh.SCALE_EXPONENT} (fh.scales_for: "
                     "keeps the 224 px segment counts at smaller sizes)"
                     if tuple(fh_scales) != fh.PAPER_SCALES else "paper scales"),
      skipped=skipped, num_skipped=len(skipped), demo=plan.get("demo"),
      demo_version=plan.get("demo_version"), demo_photos=plan.get("photos"),
      build_seconds=round(seconds, 1),
      saliency=saliency_lib.describe(b["saliency"]) if b.get("saliency") else None,
      background=background_lib.describe(b["background"]) if b.get("background") else None,
      **extra)
  records.write_manifest(b["out_dir"], manifest)
  return manifest


def build(source: str, out_dir: str, masks=("fh", "grid", "gt"), workers: int | None = None,
          runner: str = "local", beam_options=(), saliency: str | None = None,
          overwrite: bool = False, **opts) -> dict:
  """Build records for `source` into out_dir and return the manifest.

  opts: image_size (demo side / real shorter side), shard_size, fh_scales,
  fh_backend ('skimage'|'opencv'), grid_sizes, min_side, image_format,
  progress, data_dir (tfds), and the demo's num_train, num_test, seed,
  bg_correlation, max_objects. The demo defaults to FH scales rescaled to its
  image size (fh.scales_for); real data defaults to the paper's scales.
  saliency: a detector of masks/saliency.py whose map is stored per image
  ('saliency' among the masks means the default detector).
  runner: 'local' (processes, `workers` of them) or 'beam' (beam_options are
  Beam pipeline flags, e.g. ['--direct_num_workers=2'] or Dataflow's).
  overwrite: replace records of this source in out_dir built with other settings
  (other masks, image size...); without it they are refused (check_out_dir).
  """
  if runner not in RUNNERS:
    raise ValueError(f"Unknown runner {runner!r}; choose one of {RUNNERS}.")
  t0 = time.time()
  b = plan_build(source, out_dir, masks, saliency=saliency, overwrite=overwrite, **opts)
  if runner == "beam":
    from data_pipelines import beam
    beam.run(b, list(beam_options))
  else:
    _run_local(b, workers, opts.get("progress", True))
  return finish_manifest(b, time.time() - t0)


def write_records(out_dir: str, examples: dict, *, shard_size: int = 1000, num_classes: int = 0,
                  class_names=(), source: str = "arrays") -> dict:
  """Records + manifest from in-memory examples, for tests and small custom data.

  examples: {split: [dict(image=uint8 [H,W,3], masks={name: id map}, label=-1,
  instances=None, classes=None, saliency=None, background=None)]} (saliency: [H,W]
  in [0, 1] or uint8, background: uint8 [H,W,3], each on every example or none);
  indices are positions in each list. Uses the same writer and manifest as `build`,
  so readers see no difference.
  """
  records.makedirs(out_dir)
  splits, names, has_gt = {}, set(), True
  all_exs = [ex for exs in examples.values() for ex in exs]
  has_saliency = {ex.get("saliency") is not None for ex in all_exs}
  has_background = {ex.get("background") is not None for ex in all_exs}
  if len(has_saliency) > 1 or len(has_background) > 1:
    raise ValueError("write_records: give saliency (background) on every example or on none.")
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
        if ex.get("saliency") is not None:
          rec["saliency"] = records.encode_saliency(ex["saliency"])
        if ex.get("background") is not None:
          rec["background"] = records.encode_image(ex["background"], "png")
        recs.append(rec)
      fname = records.shard_name(split, s, n_shards)
      side = write_shard(out_dir, fname, dict(records=recs, skipped=[]), {"source": source})
      shards.append({k: side[k] for k in ("file", "count", "bytes", "sha256")})
    splits[split] = dict(count=sum(x["count"] for x in shards), shards=shards)
  manifest = dict(schema_version=records.SCHEMA_VERSION, complete=True, source=source,
                  image_size=None, num_classes=num_classes, class_names=list(class_names),
                  has_gt=has_gt, splits=splits, masks={n: {"kind": n.split("_")[0]} for n in
                                                       sorted(names)},
                  skipped=[], num_skipped=0,
                  saliency={"detector": "given"} if True in has_saliency else None,
                  background={"method": "given"} if True in has_background else None)
  records.write_manifest(out_dir, manifest)
  return manifest


DEMO_MASKS = ("fh", "grid", "gt")


class DemoSettingsError(ValueError):
  """The demo records in a directory were generated with other scene settings."""


def check_demo_correlation(out_dir: str, manifest: dict, asked: float) -> None:
  """Refuse demo records whose class/background correlation differs from `asked`.

  They are not rebuilt in place: the directory is shared by every run started from
  the same folder (data/demo by default), so a rebuild would switch the data under
  other runs and their evaluations, and each alternation would cost a rebuild.
  """
  if not 0.0 <= float(asked) <= 1.0:
    raise DemoSettingsError(f"demo_bg_correlation={asked} must lie in [0, 1].")
  if not manifest or manifest.get("source") != "demo":
    return
  stored = float((manifest.get("demo") or {}).get("bg_correlation") or 0.0)
  if stored != float(asked):
    raise DemoSettingsError(
        f"{out_dir} holds demo records with bg_correlation={stored:g}, not {float(asked):g}; "
        "give each correlation its own directory (--config.data.records_dir=data/demo_bgcorr) "
        "or delete this one to rebuild it.")


def ensure_demo_records(out_dir: str, masks=(), saliency: bool = False,
                        background: bool = False, **opts) -> dict:
  """The demo records in out_dir, building them unless a complete, current set exists
  that holds the mask kinds `masks` (with the current settings) and, with
  saliency=True, the saliency field; with background=True, the tiled backgrounds.

  A set built by an older demo generator (manifest demo_version != demo.VERSION)
  is rebuilt, so training never reads scenes the code no longer makes; a set
  lacking what is asked is rebuilt with it added (keeping its other masks).
  Builds use DEMO_MASKS plus those asked, and store the default saliency
  (cheap at the demo's 96 px). Records of another opts['bg_correlation'] (the
  manifest's demo settings) are refused, never reused (check_demo_correlation).
  """
  kinds = list(dict.fromkeys(DEMO_MASKS + tuple(masks)))
  keep_background = background
  correlation = opts.get("bg_correlation") or 0.0
  check_demo_correlation(out_dir, {}, correlation)      # a bad value fails before any build
  try:
    manifest = records.read_manifest(out_dir)
    check_demo_correlation(out_dir, manifest, correlation)
    stored = manifest.get("masks", {})
    if (manifest.get("complete") and manifest.get("source") == "demo"
        and manifest.get("demo_version") == demo_lib.VERSION):
      asked = masks_lib.expand(list(masks), fh_scales=fh.scales_for(manifest["image_size"]))
      asked_stored = {n: spec for n, spec in stored.items() if spec.get("kind") in masks}
      if (asked_stored == asked and (not saliency or records.has_field(manifest, "saliency"))
          and (not background or records.has_field(manifest, "background"))):
        return manifest
      if manifest.get("derived_from"):   # e.g. a learned-masks round: not the build's to remake
        raise DemoSettingsError(
            f"{out_dir} holds records derived from {manifest['derived_from']} (mask kinds "
            f"{sorted({s.get('kind') for s in stored.values()})}) that lack what this config "
            f"needs; the demo build will not overwrite them. Make them anew: "
            f"`{records.rebuild_command(out_dir, manifest)}`.")
      kinds += sorted({spec.get("kind") for spec in stored.values()} - set(kinds))
      keep_background |= records.has_field(manifest, "background")
  except DemoSettingsError:
    raise
  except (FileNotFoundError, ValueError):
    pass
  if keep_background:
    kinds.append("background")
  return build("demo", out_dir, masks=kinds, saliency=saliency_lib.DEFAULT, overwrite=True,
               **opts)   # the demo's own records: rebuilt with what is asked added


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="With --runner=beam, flags this CLI does not know are Beam "
                              "pipeline options, e.g. --direct_num_workers=2, or for Dataflow "
                              "--beam_runner=DataflowRunner --project=P --region=R "
                              "--temp_location=gs://B/tmp --extra_package=WHEEL (see docs/data.md).")
  p.add_argument("--source", required=True, help="demo | folder:PATH | tfds:NAME")
  p.add_argument("--out", required=True,
                 help="output directory (local or gs://) for shards + manifest.json")
  p.add_argument("--masks", default="fh,grid",
                 help="comma list of fh, grid, gt, mcg, saliency (the default detector) and "
                 "background (tiled backgrounds; implies saliency)")
  p.add_argument("--saliency", default=None,
                 help=f"store a saliency map per image from this detector: "
                 f"{'|'.join(saliency_lib.REGISTRY)} (default with 'saliency' in --masks: "
                 f"{saliency_lib.DEFAULT})")
  p.add_argument("--runner", default="local", choices=RUNNERS,
                 help="local: worker processes here; beam: an Apache Beam pipeline")
  p.add_argument("--beam_runner", default="DirectRunner",
                 help="with --runner=beam: DirectRunner (local) or DataflowRunner")
  p.add_argument("--workers", type=int, default=None,
                 help="local runner: processes (default: all cores); beam DirectRunner: "
                 "--direct_num_workers")
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
  p.add_argument("--max_aspect", type=float, default=DEFAULT_MAX_ASPECT,
                 help="skip (and report) images whose long side is more than this many "
                 "times the short side (stored long side <= max_aspect x image_size)")
  p.add_argument("--num_train", type=int, default=None, help="demo only")
  p.add_argument("--num_test", type=int, default=None, help="demo only")
  p.add_argument("--seed", type=int, default=None, help="demo only")
  p.add_argument("--bg_correlation", type=float, default=None, help="demo only, in [0, 1]")
  p.add_argument("--data_dir", default=None, help="tfds data_dir")
  p.add_argument("--overwrite", action="store_true",
                 help="replace records of the same source in --out built with other settings "
                 "(other --masks, --image_size...); refused without it")
  a, rest = p.parse_known_args(argv)
  if rest and a.runner != "beam":
    p.error(f"unrecognized arguments: {' '.join(rest)} (Beam options need --runner=beam)")
  opts = {k: v for k, v in vars(a).items()
          if v is not None and k not in ("source", "out", "masks", "saliency", "workers",
                                         "runner", "beam_runner", "overwrite")}
  if "fh_scales" in opts:
    opts["fh_scales"] = tuple(int(s) for s in opts["fh_scales"].split(","))
  opts["grid_sizes"] = tuple(int(s) for s in a.grid_sizes.split(","))
  beam_options = []
  if a.runner == "beam":
    beam_options = [f"--runner={a.beam_runner}"] + rest
    if a.workers and a.beam_runner == "DirectRunner" and not any(
        r.startswith("--direct_num_workers") for r in rest):
      beam_options.append(f"--direct_num_workers={a.workers}")
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, _raise_stopped)
  try:
    m = build(a.source, a.out, masks=a.masks, workers=a.workers, runner=a.runner,
              beam_options=beam_options, saliency=a.saliency, overwrite=a.overwrite, **opts)
  except Stopped as e:
    print(f"Stopped by {e}; complete shards are kept: rerun the same command to resume.",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + e.signum)   # not sys.exit: exit handlers would join the pool's threads
  except (ImportError, ValueError, OSError) as e:   # bad source, folder, out dir, masks
    sys.exit("error: " + " ".join(str(e).split()))
  counts = ", ".join(f"{s}: {v['count']}" for s, v in m["splits"].items())
  sal = f"; saliency {m['saliency']['detector']}" if m.get("saliency") else ""
  sal += f"; backgrounds {m['background']['method']}" if m.get("background") else ""
  print(f"Wrote {a.out}: {counts}; masks {', '.join(m['masks'])}{sal}; "
        f"{m['num_skipped']} inputs skipped (see manifest.json); {m['build_seconds']} s.")
  for x in m["skipped"][:10]:
    print(f"  skipped {x['input']}: {x['reason']}")


if __name__ == "__main__":
  main()
