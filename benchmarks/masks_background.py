"""Time the tiled-background fills (data_pipelines/masks/tiled_background.py) on demo scenes,
and show them: image | hole | each method's fill, as a TensorBoard picture.

  python benchmarks/masks_background.py [--n=100] [--tb_dir=DIR] [--show=6]

Per method: ms per image (the build's saliency map given; per scene the best of
--repeats runs, methods interleaved, so a shared CPU's load swings cancel), the ratio
to the build's default, and the mean |fill - hidden photo| in the hole on scenes whose true
background is known (the scene's objects pasted onto a crop of another demo photo).
That error favours smooth fills, so the picture is what decides; with --tb_dir the
picture (one row per scene) and the timings go to DIR (`tensorboard --logdir DIR`).
"""
import argparse
import time

import numpy as np

from data_pipelines import demo
from data_pipelines.masks import tiled_background, saliency


def pasted(scene, index):
  """(image, true background): the scene's objects over a crop of a demo photo."""
  photo = demo.photos()[index % len(demo.photos())][1]
  s = scene["image"].shape[0]
  y, x = (index * 37) % (photo.shape[0] - s), (index * 53) % (photo.shape[1] - s)
  truth = photo[y:y + s, x:x + s]
  return np.where(scene["instances"][..., None] > 0, scene["image"], truth), truth


def picture(image, sal, fills):
  """uint8 [H, W * (2 + len(fills)) + gaps, 3]: image | hole (white) | each fill."""
  from detcon_jax.evaluate.visualize import side_by_side
  hole = np.where(tiled_background.hole(sal)[..., None] > 0, 255, image // 2).astype(np.uint8)
  return side_by_side(*(p[None] for p in [image, hole] + fills))[0]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=100)
  p.add_argument("--tb_dir", default=None, help="write the picture and timings here")
  p.add_argument("--show", type=int, default=6, help="scenes in the picture")
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  scenes = [demo.example("train", i) for i in range(a.n)]
  sals = [saliency.compute(s["image"]) for s in scenes]
  known = [pasted(s, i) for i, s in enumerate(scenes)]
  methods = [tiled_background.DEFAULT] + [m for m in tiled_background.METHODS if m != tiled_background.DEFAULT]
  seconds = {k: 0.0 for k in methods}
  for s, m in zip(scenes, sals):
    for k in methods:
      best = []
      for _ in range(a.repeats):
        t0 = time.perf_counter()
        tiled_background.tiled(s["image"], m, k)
        best.append(time.perf_counter() - t0)
      seconds[k] += min(best)
  ms = {k: t / a.n * 1e3 for k, t in seconds.items()}
  fills = {k: [tiled_background.tiled(s["image"], m, k) for s, m in zip(scenes, sals)]
           for k in methods}
  for method in methods:
    err = np.mean([np.abs(tiled_background.tiled(img, s["saliency"], method).astype(float) - truth)[
        tiled_background.hole(s["saliency"]) > 0].mean() for (img, truth), s in zip(known, scenes)])
    print(f"{method}: {ms[method]:.2f} ms / image ({scenes[0]['image'].shape[0]} px), "
          f"x{ms[method] / ms[tiled_background.DEFAULT]:.2f} the default; |fill - hidden photo| "
          f"in the hole {err:.1f}/255")
  t0 = time.perf_counter()
  for s in scenes:
    saliency.compute(s["image"])
  print(f"(saliency mbd: {(time.perf_counter() - t0) / a.n * 1e3:.2f} ms / image)")
  if a.tb_dir:
    import tensorflow as tf
    rows = np.stack([picture(s["image"], m, [fills[k][i] for k in methods])
                     for i, (s, m) in enumerate(zip(scenes[:a.show], sals))])
    with tf.summary.create_file_writer(a.tb_dir).as_default(step=0):
      tf.summary.image("tiled backgrounds: image | hole | " + " | ".join(methods), rows,
                       max_outputs=len(rows))
      for k in methods:
        tf.summary.scalar(f"ms_per_image/{k}", ms[k])
    print(f"TensorBoard picture and timings in {a.tb_dir}")


if __name__ == "__main__":
  main()
