"""Input pipeline throughput: two-view augmentation with/without masks, FH precompute.

  python benchmarks/input_pipeline.py [--records=DIR] [--image_size=64] [--batch_size=64]
  python benchmarks/input_pipeline.py --source=jpeg [--examples=256] [--cache=DIR]

--source=jpeg (issue 23): every method's views at its imagenet preset, from
records of ImageNet-like JPEGs (500x375, as benchmarks/build_records.py makes)
stored at the build's default shorter side of 224 px (the size the imagenet
presets expect: decode.DEFAULT_IMAGE_SIZE), with FH masks, a 4x4 grid, saliency
and tiled backgrounds; built once and cached under --cache (default
~/.cache/detcon_jax/input_bench_jpeg). Each row runs the training input itself
(detcon_jax.train.loop.records_batches with the method's imagenet config) and
prints CPU ms/example and images/s/core from this process's CPU time (not wall
time: on a shared machine wall time measures the other users too), one source
image = one example with all its views. The last row, JPEG decode + one
random-resized crop + flip (the supervised preset's view), is the upper bound.

Default mode prints
  * examples/s and CPU ms/example of the training iterator (two views, DetCon
    A.1 BYOL tables) with masks (views whose spec carries the 'masks' field:
    decode one FH map, crop/flip it with the views, sample 16 ids) and without,
    and their ratio (the cost of carrying masks);
  * FH precompute images/s/core, three scales per image: the build's kernel
    (masks/fh_kernel.py, numba; maps identical to scikit-image's) against
    scikit-image's felzenszwalb called per scale, alternating image by image in
    one run, with their ratio, on demo scenes at 96 px (demo scales) and 224 px
    and on real photos at 224 px (paper scales); then the OpenCV backend, and
    all cores (a process pool, as the build uses);
  * how closely OpenCV's graph segmentation matches scikit-image's (adjusted
    Rand index, average best overlap, segment counts): the OpenCV backend is
    only a drop-in replacement if these say the segmentations are the same.
On a shared machine absolute numbers move with the load; compare the ratios.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --baseline runs this script on the library of another tree (DETCON_BENCH_ROOT).
sys.path.insert(0, os.environ.get("DETCON_BENCH_ROOT", ROOT))

from data_pipelines import build, demo  # noqa: E402
from data_pipelines.masks import fh  # noqa: E402

# --source=jpeg rows: label -> (configs module, change to its imagenet preset). The
# config's own views and train_iterator arguments are used (loop.records_batches).
JPEG_ROWS = {
    "classic two views (BYOL)": ("byol", None),
    "+ FH masks (DetCon-B)": ("detcon_b", None),
    "2x224 + 6x96 multi-crop (SwAV)": ("swav", None),
    "MaskCo boxes": ("maskco", None),
    "saliency-constrained crops (CAST)": ("cast", None),
    "BG Swaps (MoCo v2)": ("moco_v2", lambda c: c.background.update(mode="swaps")),
    "upper bound: JPEG decode + one random-resized crop": ("supervised", None),
}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "detcon_jax",
                             "input_bench_jpeg")


def input_rates(records, batch_size, image_size, steps, rounds=2):
  """(wall ex/s, CPU ms/example) with and without masks, measured in alternation.

  One iterator lives at a time (a live one refills its buffers in the
  background). CPU time of this process is far less sensitive to other users
  of a shared machine than wall time, so the ratio is taken from it.
  """
  import gc
  from data_pipelines import input as input_lib
  from data_pipelines import views
  wall, cpu = {True: [], False: []}, {True: [], False: []}
  for _ in range(rounds):
    for m in (True, False):
      it = input_lib.train_iterator(records, batch_size=batch_size,
                                    views=views.two_views(image_size, masks=m),
                                    host_index=0, host_count=1)
      for _ in range(3):                                # warm up: tracing, buffers
        next(it)
      t, c = time.perf_counter(), time.process_time()
      for _ in range(steps):
        next(it)
      n = steps * batch_size
      wall[m].append(n / (time.perf_counter() - t))
      cpu[m].append(1e3 * (time.process_time() - c) / n)
      del it
      gc.collect()
  return ({m: float(np.median(v)) for m, v in wall.items()},
          {m: float(np.median(v)) for m, v in cpu.items()})


def _images(n, size):
  return [demo.example("train", i, size=size)["image"] for i in range(n)]


def fh_rate(images, scales, backend):
  t = time.perf_counter()
  for img in images:
    fh.compute_scales(img, scales, backend=backend)
  return len(images) / (time.perf_counter() - t)


def photos_224(n):
  """Real photos shipped inside installed packages, shorter side 224, centre crops."""
  from data_pipelines.decode import resize_shorter
  out = []
  for _, photo in demo.photos():
    img = resize_shorter(photo, 224)
    h, w = img.shape[:2]
    for k in range(3):            # three crops per photo (left/centre/right or top/mid/bottom)
      y, x = (h - 224) * k // 2, (w - 224) * k // 2
      out.append(np.ascontiguousarray(img[y:y + 224, x:x + 224]))
  return (out * (n // len(out) + 1))[:n]


def kernel_vs_skimage(images, scales, rounds=2):
  """(kernel images/s, scikit-image images/s, identical maps) on one core, alternating
  image by image so both see the same machine load; all maps are compared."""
  from skimage.segmentation import felzenszwalb
  fh.compute_scales(images[0], scales)                   # compile / load the kernel cache
  tk = ts = 0.0
  same = True
  for _ in range(rounds):
    for img in images:
      t = time.perf_counter()
      ours = fh.compute_scales(img, scales)
      tk += time.perf_counter() - t
      t = time.perf_counter()
      ref = [felzenszwalb(img, scale=s, sigma=fh.PAPER_SIGMA, min_size=s) for s in scales]
      ts += time.perf_counter() - t
      same &= all(np.array_equal(a, b) for a, b in zip(ours, ref))
  n = rounds * len(images)
  return n / tk, n / ts, same


def _fh_chunk(images):
  for img in images:
    fh.compute_scales(img, fh.scales_for(96))
  return len(images)


def abo(a, b):
  """Average over segments of a of the best IoU with any segment of b."""
  na, nb = a.max() + 1, b.max() + 1
  inter = np.bincount(a.ravel() * nb + b.ravel(), minlength=na * nb).reshape(na, nb)
  union = np.bincount(a.ravel(), minlength=na)[:, None] + np.bincount(b.ravel(), minlength=nb)
  return float((inter / (union - inter)).max(1).mean())


def agreement(images, scales):
  from sklearn.metrics import adjusted_rand_score
  rows = []
  for s in scales:
    ari, ab, ns, no, same = [], [], [], [], 0
    for img in images:
      a, b = fh.compute(img, s), fh.compute(img, s, backend="opencv")
      ari.append(adjusted_rand_score(a.ravel(), b.ravel()))
      ab.append(abo(a, b))
      ns.append(a.max() + 1)
      no.append(b.max() + 1)
      same += int(np.array_equal(a, b))
    rows.append((s, np.mean(ari), np.mean(ab), np.mean(ns), np.mean(no), same / len(images)))
  return rows


def jpeg_records(cache: str, images: int, shard_size: int = 32) -> str:
  """Records of `images` ImageNet-like JPEGs at the stored size the imagenet presets
  expect, with every field a method's views read; built once under cache."""
  from data_pipelines import records
  from data_pipelines.decode import DEFAULT_IMAGE_SIZE
  out = os.path.join(cache, f"records_{images}_{DEFAULT_IMAGE_SIZE}")
  try:
    if records.read_manifest(out).get("complete"):
      return out
  except (OSError, ValueError):
    pass
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import build_records      # benchmarks/ is not a package
  src = build_records.photo_folder(os.path.join(cache, f"photos_{images}"), images)
  t = time.perf_counter()
  build.build(f"folder:{src}", out, masks="fh,grid,background", image_size=DEFAULT_IMAGE_SIZE,
              shard_size=shard_size, progress=False, overwrite=True,
              workers=max(1, min(os.cpu_count() or 1, images // 64)))  # 1: no process start
  print(f"built {images} records (500x375 JPEGs -> {DEFAULT_IMAGE_SIZE} px shorter side, "
        f"fh + grid + saliency + background) in {time.perf_counter() - t:.0f} s: {out}")
  return out


def imagenet_config(module: str, change, records: str, batch_size: int):
  import importlib
  c = importlib.import_module(f"configs.{module}").get_config("imagenet")
  if change:
    change(c)
  c.batch_size = batch_size
  c.data.records_dir = records
  return c


def cpu_per_example(batches, examples: int, batch_size: int, warmup: int = 2):
  """(CPU ms/example, wall examples/s) of an iterator after `warmup` batches (tracing).

  Process CPU time counts every thread of the pipeline; the consumer takes each batch
  as soon as it is ready, so the buffers stay near empty and the window holds the
  work of its own batches."""
  for _ in range(warmup):
    next(batches)
  steps = max(1, -(-examples // batch_size))
  c, t = time.process_time(), time.perf_counter()
  for _ in range(steps):
    next(batches)
  n = steps * batch_size
  return 1e3 * (time.process_time() - c) / n, n / (time.perf_counter() - t)


def jpeg_rows(records: str, examples: int, batch_size: int, rows=tuple(JPEG_ROWS)):
  """[(label, number of views, CPU ms/example, wall examples/s)] for JPEG_ROWS."""
  import gc
  from detcon_jax.train import loop
  out = []
  for label in rows:
    module, change = JPEG_ROWS[label]
    config = imagenet_config(module, change, records, batch_size)
    it = loop.records_batches(config, 0, 0, 1)
    views = sum(1 for k in next(it) if k.startswith(("view", "small")) and "/" not in k)
    ms, wall = cpu_per_example(it, examples, batch_size, warmup=1)
    out.append((label, views, ms, wall))
    del it
    gc.collect()
  return out


def print_jpeg_table(a):
  from data_pipelines.decode import DEFAULT_IMAGE_SIZE
  records = jpeg_records(a.cache, a.jpeg_images)
  rows = jpeg_rows(records, a.examples, a.batch_size,
                  [r for r in JPEG_ROWS if not a.rows or any(w.lower() in r.lower()
                                                            for w in a.rows.split(","))])
  print(f"\nviews of each imagenet preset from {a.jpeg_images} JPEG records ({DEFAULT_IMAGE_SIZE} "
        f"px shorter side), batch {a.batch_size}, {a.examples} examples a row after 2 warm-up "
        f"batches; process CPU time, not wall (the machine is shared)\n")
  print("| views (imagenet preset) | views | CPU ms/example | images/s/core | wall ex/s |")
  print("|---|---:|---:|---:|---:|")
  for label, views, ms, wall in rows:
    print(f"| {label} | {views} | {ms:.1f} | {1e3 / ms:.0f} | {wall:.0f} |")
  return rows


def parse_rows(text: str) -> dict:
  """{label: CPU ms/example} from print_jpeg_table's markdown rows."""
  out = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 5 and cells[0] in JPEG_ROWS:
      out[cells[0]] = float(cells[2])
  return out


def baseline_tree(ref: str, cache: str) -> str:
  """The library at git ref `ref` of this repository, exported once under cache."""
  import subprocess
  sha = subprocess.run(["git", "-C", ROOT, "rev-parse", ref], check=True, capture_output=True,
                       text=True).stdout.strip()
  out = os.path.join(cache, f"tree_{sha[:12]}")
  if not os.path.isdir(out):
    tmp = tempfile.mkdtemp(dir=cache)
    subprocess.run(f"git -C {ROOT} archive {sha} | tar -x -C {tmp}", shell=True, check=True)
    os.rename(tmp, out)
  return out


def print_baseline(a, argv):
  """Before/after: this script's jpeg rows on the library at --baseline and on this tree,
  in alternating processes (rounds), so both see the same machine load; ratios of the
  medians."""
  import subprocess
  os.makedirs(a.cache, exist_ok=True)
  jpeg_records(a.cache, a.jpeg_images)
  trees = {"before": baseline_tree(a.baseline, a.cache), "after": ROOT}
  args = [x for x in argv if not x.startswith(("--baseline", "--rounds"))]
  ms = {t: {} for t in trees}
  for _ in range(a.rounds):
    for t, tree in trees.items():
      env = dict(os.environ, DETCON_BENCH_ROOT=tree, PYTHONPATH=tree)
      run = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, env=env,
                           capture_output=True, text=True)
      if run.returncode:
        sys.exit(f"error: the {t} run failed:\n{run.stderr[-2000:]}")
      for label, v in parse_rows(run.stdout).items():
        ms[t].setdefault(label, []).append(v)
  print(f"\nbefore = library at {a.baseline}, after = this tree; CPU ms/example, median of "
        f"{a.rounds} alternating rounds (load {os.getloadavg()[0]:.1f})\n")
  print("| views (imagenet preset) | before ms | after ms | before/after | after images/s/core |")
  print("|---|---:|---:|---:|---:|")
  for label in ms["after"]:
    b, f = np.median(ms["before"][label]), np.median(ms["after"][label])
    print(f"| {label} | {b:.1f} | {f:.1f} | x{b / f:.2f} | {1e3 / f:.0f} |")
  return ms


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--source", default="demo", choices=("demo", "jpeg"),
                 help="demo: two views from demo records + FH rates; jpeg: every method's "
                 "views at 224 px from JPEG records (issue 23)")
  p.add_argument("--examples", type=int, default=256, help="--source=jpeg: examples a row")
  p.add_argument("--jpeg_images", type=int, default=256,
                 help="--source=jpeg: JPEGs in the cached records")
  p.add_argument("--rows", default="", help="--source=jpeg: only rows whose label holds one "
                 "of these comma-separated words, e.g. DetCon,upper")
  p.add_argument("--baseline", default=None,
                 help="--source=jpeg: a git ref; print before (the library at that ref) / "
                 "after (this tree) ratios, measured in alternating processes")
  p.add_argument("--rounds", type=int, default=2, help="--baseline: alternations")
  p.add_argument("--cache", default=DEFAULT_CACHE, help="--source=jpeg: where the records live")
  p.add_argument("--records", default=None, help="demo records dir (built if missing)")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=None, help="default 64 (jpeg: 32)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--fh_images", type=int, default=40)
  p.add_argument("--fh_only", action="store_true", help="only the FH precompute figures")
  a = p.parse_args(argv)
  cores = os.cpu_count() or 1
  print(f"# input pipeline benchmark ({cores} cores, load {os.getloadavg()[0]:.1f})")
  if a.source == "jpeg":
    if a.baseline:
      print_baseline(a, sys.argv[1:] if argv is None else list(argv))
      return
    a.batch_size = a.batch_size or 32
    print_jpeg_table(a)
    return
  a.batch_size = a.batch_size or 64
  if not a.fh_only:
    records = a.records or os.path.join(tempfile.gettempdir(), "detcon_demo_records")
    build.ensure_demo_records(records)
    print_input_rates(records, a)
  print_fh_rates(a, cores)


def print_input_rates(records, a):
  wall, cpu = input_rates(records, a.batch_size, a.image_size, a.steps)
  print(f"two-view augmentation @{a.image_size}px, batch {a.batch_size} (median of 2 rounds):\n"
        f"  with masks    {wall[True]:.0f} ex/s wall, {cpu[True]:.2f} CPU ms/example\n"
        f"  without masks {wall[False]:.0f} ex/s wall, {cpu[False]:.2f} CPU ms/example\n"
        f"  cost of carrying masks: CPU ratio with/without {cpu[True] / cpu[False]:.2f}, "
        f"wall ratio {wall[False] / wall[True]:.2f}")


def print_fh_rates(a, cores):
  if fh._kernel() is not None:
    for images, scales, label in (
        (_images(a.fh_images, 96), fh.scales_for(96), "demo scenes 96px"),
        (_images(a.fh_images, 224), fh.PAPER_SCALES, "demo scenes 224px"),
        (photos_224(a.fh_images), fh.PAPER_SCALES, "real photos 224px")):
      k, r, same = kernel_vs_skimage(images, scales)
      print(f"FH kernel vs scikit-image, {label}, scales {scales}, 1 core: {k:.1f} vs "
            f"{r:.1f} images/s = x{k / r:.2f}; maps identical: {same}")
  else:
    print("FH kernel: numba not installed; the build uses scikit-image per scale")
  backends = list(fh.BACKENDS)
  for size, scales, label in ((96, fh.scales_for(96), "demo 96px, scales"),
                              (224, fh.PAPER_SCALES, "224px, paper scales")):
    imgs = _images(a.fh_images, size)
    rates = {b: fh_rate(imgs, scales, b) for b in backends}
    txt = ", ".join(f"{b} {r:.1f}" for b, r in rates.items())
    ratio = f"; opencv/skimage(kernel) {rates['opencv'] / rates['skimage']:.1f}x"
    print(f"FH precompute, {label} {scales} (3 maps/image), 1 core: {txt} images/s{ratio}")
    for s, ari, ab, ns, no, same in agreement(imgs[:20], scales):
      print(f"  opencv vs skimage, scale {s}: ARI {ari:.3f}, ABO {ab:.3f}, segments "
            f"{ns:.1f} vs {no:.1f}, identical maps {same:.0%}")

  imgs = _images(a.fh_images * cores, 96)
  chunks = [imgs[i::cores * 4] for i in range(cores * 4)]
  ctx = multiprocessing.get_context("spawn")
  with cf.ProcessPoolExecutor(cores, mp_context=ctx) as pool:
    list(pool.map(_fh_chunk, [chunks[0][:1]] * cores))          # start workers, import skimage
    t = time.perf_counter()
    list(pool.map(_fh_chunk, chunks))
    all_cores = len(imgs) / (time.perf_counter() - t)
  print(f"FH precompute, demo 96px, build's FH, all {cores} cores (process pool): "
        f"{all_cores:.1f} images/s = {all_cores / cores:.1f} images/s/core")

if __name__ == "__main__":
  main()
