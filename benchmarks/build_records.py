"""Record build throughput: the local runner and Apache Beam (DirectRunner), 1 and 2 workers.

  python benchmarks/build_records.py [--images=160] [--shard_size=20]

Builds the same ImageNet-like input several ways and prints images/s for each:
a folder of JPEG photos (~500x375, like ImageNet's), decoded, resized to a
224 px shorter side, FH masks at the paper's three scales plus a 4x4 grid,
encoded (JPEG image, 16-bit PNG masks) into sharded TFRecords. It checks that
every build wrote the same bytes, then turns the best per-core rate into an
ImageNet estimate (1,281,167 images). Needs apache-beam for the Beam rows
(pip install -e '.[beam]'). On a shared machine absolute figures move with
the load: compare the rows of one run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import build, demo  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def photo_folder(root: str, n: int) -> str:
  """n JPEGs of about ImageNet's size, cut from the photos shipped in installed packages."""
  rng = np.random.default_rng(0)
  photos = [p for _, p in demo.photos()]
  os.makedirs(root, exist_ok=True)
  for i in range(n):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((500, 375), Image.BICUBIC)
    img.save(os.path.join(root, f"img_{i:05d}.jpg"), quality=90)
  return root


def timed_build(src, out, **kw):
  shutil.rmtree(out, ignore_errors=True)
  t = time.perf_counter()
  m = build.build(f"folder:{src}", out, masks="fh,grid", image_size=224, progress=False, **kw)
  return m, time.perf_counter() - t


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=160)
  p.add_argument("--shard_size", type=int, default=20)
  p.add_argument("--skip_local", action="store_true")
  a = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="detcon_build_bench_")
  try:
    src = photo_folder(os.path.join(tmp, "photos"), a.images)
    cores = os.cpu_count() or 1
    print(f"# record build benchmark: {a.images} JPEGs 500x375 -> 224 px, masks "
          f"fh_s500/1000/1500 + grid_4, shards of {a.shard_size} ({cores} cores, "
          f"load {os.getloadavg()[0]:.1f})")
    rows, manifests = [], []
    runs = [] if a.skip_local else [("local runner", 1, {}), ("local runner", 2, {})]
    try:
      import apache_beam  # noqa: F401
      runs += [("beam DirectRunner", 1, dict(runner="beam", beam_options=[
                   "--runner=DirectRunner", "--direct_num_workers=1",
                   "--direct_running_mode=in_memory"])),
               ("beam DirectRunner", 2, dict(runner="beam", beam_options=[
                   "--runner=DirectRunner", "--direct_num_workers=2",
                   "--direct_running_mode=multi_processing"]))]
    except ImportError:
      print("(apache-beam not installed: no Beam rows; pip install -e '.[beam]')")
    for label, workers, kw in runs:
      out = os.path.join(tmp, f"out_{len(rows)}")
      m, secs = timed_build(src, out, shard_size=a.shard_size, workers=workers, **kw)
      rate = a.images / secs
      rows.append((label, workers, rate))
      manifests.append(m["splits"])
      print(f"{label:18s} {workers} worker(s): {secs:6.1f} s, {rate:6.1f} images/s, "
            f"{rate / workers:5.1f} images/s/worker")
    same = all(s == manifests[0] for s in manifests)
    print(f"all builds wrote identical shards (sizes and sha256): {same}")
    for label in sorted({r[0] for r in rows}):
      r = {w: rate for lab, w, rate in rows if lab == label}
      if 1 in r and 2 in r:
        print(f"{label}: 2 workers / 1 worker = x{r[2] / r[1]:.2f}")
    best = max(rate / w for _, w, rate in rows) if rows else 0
    if best:
      core_hours = IMAGENET_TRAIN / best / 3600
      print(f"ImageNet train ({IMAGENET_TRAIN:,} images) at {best:.1f} images/s/core: "
            f"{core_hours:.0f} core-hours, i.e. under an hour on {int(np.ceil(core_hours))} "
            f"cores (e.g. {int(np.ceil(core_hours / 16))} Dataflow workers of 16 vCPUs)")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
