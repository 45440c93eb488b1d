"""Time the tiled-background fills (data_pipelines/masks/background.py) on demo scenes.

  python benchmarks/masks_background.py [--n=100]
"""
import argparse
import time

import numpy as np

from data_pipelines import demo
from data_pipelines.masks import background, saliency


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=100)
  a = p.parse_args()
  scenes = [demo.example("train", i) for i in range(a.n)]
  sals = [saliency.compute(s["image"]) for s in scenes]
  for method in background.METHODS:
    t0 = time.perf_counter()
    bgs = [background.tiled(s["image"], m, method) for s, m in zip(scenes, sals)]
    ms = (time.perf_counter() - t0) / a.n * 1e3
    # object colour left in the fill: mean |fill - image| outside the GT objects must be 0
    kept = np.mean([np.abs(b.astype(float) - s["image"])[background.hole(m) == 0].mean()
                    for b, s, m in zip(bgs, scenes, sals) if (background.hole(m) == 0).any()])
    print(f"{method}: {ms:.2f} ms / image ({scenes[0]['image'].shape[0]} px); "
          f"background outside the hole changed by {kept:.2f}/255")
  t0 = time.perf_counter()
  for s in scenes:
    saliency.compute(s["image"])
  print(f"(saliency mbd: {(time.perf_counter() - t0) / a.n * 1e3:.2f} ms / image)")


if __name__ == "__main__":
  main()
