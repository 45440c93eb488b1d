"""Saliency detectors and MCG-role grouping vs FH: quality on the demo's ground truth and speed.

  python benchmarks/masks_saliency.py [--images=40] [--size=224] [--photos]

Prints, for demo scenes rendered at --size px (their ground-truth foreground
and instances are known):
  * per saliency detector (masks/saliency.py): MAE, max F-beta (beta^2 = 0.3)
    and AUC against the foreground, and images/s/core (CPU time of this
    process, one image at a time; the goal for the default is >= 30 at 224 px);
  * FH (the build's scales for that size) vs the MCG-role hierarchy
    (masks/mcg.py): ABO per stored map and over all maps of the kind,
    segments/image, and images/s/core for all maps of the kind per image;
  * with --photos, detector speed on the bundled real photographs as well.
The first image of each method is a warm-up (numba compiles) and is not timed.
On a shared machine absolute speeds move with the load; CPU time is steadier.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import demo  # noqa: E402
from data_pipelines import masks as masks_lib  # noqa: E402
from data_pipelines.masks import fh, mcg, saliency  # noqa: E402
from detcon_jax.evaluate import mask_quality as Q  # noqa: E402


def timed(fn, images):
  """(outputs, images/s/core): CPU seconds of this process, warm-up excluded."""
  fn(images[0])
  t = time.process_time()
  out = [fn(im) for im in images]
  return out, len(images) / max(time.process_time() - t, 1e-9)


def saliency_table(images, foreground):
  rows = {}
  for name in saliency.REGISTRY:
    maps, speed = timed(lambda im, n=name: saliency.compute(im, n), images)
    rows[name] = dict(Q.summarize_saliency(Q.saliency_quality(np.stack(maps), foreground)),
                      speed=speed)
  return rows


def grouping_table(images, instances, size):
  rows = {}
  kinds = {"fh": masks_lib.expand("fh", fh_scales=fh.scales_for(size) if size != 224
                                  else fh.PAPER_SCALES),
           "mcg": masks_lib.expand("mcg")}
  for kind, specs in kinds.items():
    maps, speed = timed(lambda im, s=specs: masks_lib.compute_all(im, s), images)
    per_name = {n: np.stack([m[n] for m in maps]) for n in specs}
    for n, seg in per_name.items():
      rows[n] = dict(Q.average_best_overlap(instances, seg), speed=None)
    best = Q.best_overlaps_any(instances, list(per_name.values()))
    rows[f"{kind} (all maps)"] = dict(abo=float(best.mean()), speed=speed,
                                        mean_segments=sum(rows[n]["mean_segments"]
                                                          for n in specs))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=40)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--photos", action="store_true")
  a = p.parse_args(argv)
  try:
    import cv2
    cv2.setNumThreads(1)                 # one core: the build runs one image per process
  except ImportError:
    pass
  exs = [demo.example("test", i, size=a.size) for i in range(a.images)]
  images = [e["image"] for e in exs]
  instances = np.stack([e["instances"] for e in exs]).astype(np.int64)
  print(f"{a.images} demo test scenes at {a.size} px; speeds are images per CPU-second "
        "of this process (one image at a time)")
  print("saliency detector      MAE   max F (b2=0.3)     AUC   images/s/core")
  for name, r in saliency_table(images, instances > 0).items():
    mark = " (default)" if name == saliency.DEFAULT else ""
    print(f"{name + mark:20s} {r['mae']:6.3f} {r['max_f']:16.3f} {r['auc']:7.3f} "
          f"{r['speed']:15.1f}")
  print("grouping            ABO   segments/image   images/s/core (all maps of the kind)")
  for name, r in grouping_table(images, instances, a.size).items():
    speed = f"{r['speed']:15.1f}" if r["speed"] else "".rjust(15)
    print(f"{name:18s} {r['abo']:5.3f} {r['mean_segments']:16.1f} {speed}")
  if a.photos:
    rng = np.random.default_rng(0)
    crops = [demo._crop(rng, ph, a.size) for _, ph in demo.photos()]
    for name in saliency.REGISTRY:
      _, speed = timed(lambda im, n=name: saliency.compute(im, n), crops)
      print(f"photos ({len(crops)}) {name}: {speed:.1f} images/s/core")


if __name__ == "__main__":
  main()
