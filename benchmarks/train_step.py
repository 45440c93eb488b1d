"""Train-step cost of DetCon over its base (SimCLR vs DetCon-S, BYOL vs DetCon-B), and of
MoCo v2 and SwAV (2 global + 6 small crops) relative to SimCLR.

Each pair runs the trainer's own jit step (loss, grads, LARS, EMA) on the same
model, batch and parameters, side by side in one process: compile and warm-up
excluded, the pairs' timed blocks interleaved over several repeats, median
reported. Prints measured time overheads and XLA's FLOP counts for the step
next to the paper's FLOP overheads (DetCon A.2: +5.3% DetCon-S, +11.6%
DetCon-B over the ResNet-50 backbone at 224 px, forward).

  python benchmarks/train_step.py                      # CPU-sized: RN18 x0.5, 64 px, batch 16
  python benchmarks/train_step.py --preset rn50        # RN50, 224 px, paper heads, bf16
  python benchmarks/train_step.py --batch_size 256 --repeats 10
  python benchmarks/train_step.py --preset rn50 --batch_size 4096 --flops_only  # count only
  python benchmarks/train_step.py --preset imagenet --methods detcon_b,byol --batch_size 1024 \
      --markdown /tmp/steps.md     # the methods' imagenet presets (benchmarks/accelerator.sh)
  python benchmarks/train_step.py --online_masks   # DetCon-B: FH masks vs online masks only

A method name ending in '+online' (e.g. detcon_b+online, also in --methods) is that
method with config.data.mask_source='online' (objectives/online_masks.py: K-means over
the EMA target's feature maps in the step, config.online_masks defaults).

On a TPU or GPU the table adds MFU (XLA's FLOPs / step time / the peak bf16 rate of
launch/plan.py's DEVICES) and the peak memory per device of the device-compiled step.

At the CPU size the backbone is tiny, so head and loss costs weigh far more
than at RN50/224; only the rn50 preset is comparable with the paper.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_pipelines import batch as B  # noqa: E402
from detcon_jax.models.resnet import num_features, output_stride  # noqa: E402
from detcon_jax.objectives import registry  # noqa: E402
from detcon_jax.core import sharding  # noqa: E402
from launch import plan  # noqa: E402

PAIRS = (("simclr", "detcon_s", 5.3), ("byol", "detcon_b", 11.6))
# Further methods, each priced against SimCLR (one network, two global views):
# MoCo v2 adds a key network's forward and a queue; SwAV runs its multi-crop
# (2 global + 6 small crops, the paper's 2x224 + 6x96 at the rn50 preset).
OTHERS = (("moco_v2", "simclr"), ("swav", "simclr"))
PRESETS = {
    "cpu": dict(depth=18, width=0.5, image_size=64, small_size=32, batch_size=16,
                dtype="float32", paper_heads=False, stem_pool=False),  # the demo's stride 16
    "rn50": dict(depth=50, width=1.0, image_size=224, small_size=96, batch_size=64,
                 dtype="bfloat16", paper_heads=True, stem_pool=True),  # the paper's network
    # each method's own imagenet preset (its heads, views, queue), at this batch:
    "imagenet": dict(depth=50, width=1.0, image_size=224, small_size=96, batch_size=64,
                     dtype="bfloat16", paper_heads=True, stem_pool=True),
}


ONLINE = "+online"                  # method suffix: online masks (--online_masks)
ONLINE_PAIR = ("detcon_b", "detcon_b" + ONLINE)


def base_method(name: str) -> str:
  return name.removesuffix(ONLINE)


def make_config(name: str, args):
  method = base_method(name)
  config = importlib.import_module(f"configs.{method}").get_config(
      "imagenet" if args.preset == "imagenet" else "demo")
  if name.endswith(ONLINE):
    config.data.mask_source = "online"
  if args.paper_heads:   # DetCon A.2: 2048/128 (SimCLR family), 4096/256 (BYOL family)
    config.head.update(importlib.import_module(f"configs.{method}").get_config("imagenet").head)
  config.model.update(depth=args.depth, width=args.width, dtype=args.dtype,
                      stem_pool=args.stem_pool)
  config.update(batch_size=args.batch_size, image_size=args.image_size)
  config.loss.num_masks = args.num_masks
  config.loss.local_negatives = args.local_negatives
  if method == "swav" and args.preset != "imagenet":
    config.views.update(small_crops=6, small_size=args.small_size)
    config.swav.update(queue_size=0, num_prototypes=3000 if args.paper_heads else 30)
  if method == "moco_v2":
    config.moco.queue_size = 65536                      # the paper's queue
  config.optimizer.warmup_steps = 0
  return config


def compile_pair(pair, args, mesh, rng):
  """Both methods' compiled steps and train states, from the same initial params.

  With args.flops_only everything stays abstract (shapes only): the step is
  lowered, not compiled or run, and XLA's FLOP count comes from the HLO. That
  makes RN50 at 224 px and batch 4096 countable on a laptop.
  """
  objective = registry.get_objective(base_method(pair[-1]))
  host = B.synthetic_train_batch(args.batch_size, num_masks=args.num_masks, grid=4,
                                 specs=objective.views(make_config(pair[-1], args)))
  if args.flops_only:
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharded(mesh))
             for k, v in host.items()}
  else:
    batch = sharding.host_batch_to_global(host, mesh)
  out = {}
  shared = None
  for method in reversed(pair):                       # init the DetCon variant once, share it
    config = make_config(method, args)
    init, step = plan.jit_step(registry.get_objective(base_method(method)), config, mesh, rng)
    if shared is None:
      shared = jax.eval_shape(init, rng, batch) if args.flops_only else init(rng, batch)
    ts = shared if args.flops_only else jax.tree.map(jnp.copy, shared)  # steps donate state
    t = time.perf_counter()
    lowered = step.lower(ts, batch)
    if args.flops_only:
      out[method] = dict(flops=plan.xla_flops(lowered.cost_analysis()), compile_s=0.0, times=[])
      continue
    model_flops = plan.xla_flops(lowered.cost_analysis())   # the global step's, as the planner's
    compiled = lowered.compile()
    out[method] = dict(step=compiled, ts=ts, flops=plan.xla_flops(compiled.cost_analysis()),
                       compile_s=time.perf_counter() - t, batch=batch, times=[],
                       model_flops=model_flops,
                       peak=plan.peak_bytes(compiled.memory_analysis()))
  return out


def run_steps(entry, n: int) -> float:
  t = time.perf_counter()
  for _ in range(n):
    entry["ts"], metrics = entry["step"](entry["ts"], entry["batch"])
  jax.block_until_ready(metrics["loss"])
  return (time.perf_counter() - t) / n


def _present(pairs, entries):
  """The pairs whose methods were all run."""
  return [p for p in pairs if all(m in entries for m in p if isinstance(m, str))]


MARKDOWN_HEADER = ("| date | device | method | batch/dev | ms/step | images/s | images/s/dev | MFU "
                   "| peak GiB/dev (device-compiled) |\n|---|---|---|---|---|---|---|---|---|\n")


def write_markdown(path: str, rows, args, devices: int) -> None:
  """Append one row per method (the header first, into a new file)."""
  kind = f"{devices} x {jax.devices()[0].device_kind}"
  new = not os.path.exists(path) or not os.path.getsize(path)
  with open(path, "a") as f:
    if new:
      f.write(MARKDOWN_HEADER)
    for method, med, mfu, peak in rows:
      f.write(f"| {time.strftime('%Y-%m-%d')} | {kind} | {method} | {args.batch_size // devices} "
              f"| {1e3 * med:.1f} | {args.batch_size / med:.0f} "
              f"| {args.batch_size / med / devices:.0f} "
              f"| {format(mfu, '.1%') if mfu else 'n/a'} | {peak / 2 ** 30:.2f} |\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  for key, kind in (("depth", int), ("width", float), ("image_size", int), ("small_size", int),
                    ("batch_size", int), ("dtype", str)):
    parser.add_argument(f"--{key}", type=kind)
  parser.add_argument("--paper_heads", action=argparse.BooleanOptionalAction, default=None)
  parser.add_argument("--stem_pool", action=argparse.BooleanOptionalAction, default=None,
                      help="stem max-pool (output stride 32) or not (16)")
  parser.add_argument("--num_masks", type=int, default=16)
  parser.add_argument("--local_negatives", action="store_true")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=5, help="timed blocks per method")
  parser.add_argument("--flops_only", action="store_true",
                      help="count XLA FLOPs of the lowered steps; compile and run nothing")
  parser.add_argument("--methods", default=None,
                      help="comma-separated methods to time alone (default: the pairs and others)")
  parser.add_argument("--online_masks", action="store_true",
                      help="only DetCon-B with FH masks vs with online masks (ratio)")
  parser.add_argument("--markdown", default=None,
                      help="append one markdown table row per method to this file")
  args = parser.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)

  mesh = sharding.make_mesh()
  devices = jax.device_count()
  print(f"ResNet-{args.depth} x{args.width} (stride {output_stride(args.stem_pool)}) "
        f"{args.dtype}, {args.image_size} px, global batch "
        f"{args.batch_size}, {args.num_masks} masks, heads "
        f"{'paper' if args.paper_heads else 'demo'}, {devices} x {jax.devices()[0].device_kind}; "
        f"median of {args.repeats} blocks x {args.steps} steps after {args.warmup} warm-up")
  rng = jax.random.PRNGKey(0)
  entries = {}
  if args.online_masks:   # the FH variant last: its masked batch serves both
    entries.update(compile_pair(ONLINE_PAIR[::-1], args, mesh, rng))
  elif args.methods:
    for method in args.methods.split(","):
      entries.update(compile_pair((method,), args, mesh, rng))
  else:
    for pair, _ in ((p[:2], p[2]) for p in PAIRS):
      entries.update(compile_pair(pair, args, mesh, rng))
    for method, _ in OTHERS:
      entries.update(compile_pair((method,), args, mesh, rng))
  if args.flops_only:
    for method, e in entries.items():
      print(f"{method:<10}{e['flops'] / 1e9:>12.1f} GFLOP/step")
    _print_online(entries, args, timed=False)
    for base, detcon, paper in _present(PAIRS, entries):
      fb, fd = entries[base]["flops"], entries[detcon]["flops"]
      print(f"{detcon} / {base}: XLA flops {100 * (fd / fb - 1):+.1f}%  (paper {paper:+.1f}%)")
    for method, base in _present(OTHERS, entries):
      fb, fm = entries[base]["flops"], entries[method]["flops"]
      print(f"{method} / {base}: XLA flops x{fm / fb:.2f}")
    return
  for entry in entries.values():
    if args.warmup:
      run_steps(entry, args.warmup)
  for _ in range(args.repeats):                       # interleaved: drift hits all alike
    for entry in entries.values():
      entry["times"].append(run_steps(entry, args.steps))

  peak = plan.device_peak(jax.devices()[0])            # None on CPU and unknown devices
  print(f"{'method':<10}{'ms/step':>10}{'min':>9}{'img/s/dev':>11}{'GFLOP/step':>12}"
        f"{'compile s':>11}{'MFU':>7}{'peak GiB/dev':>13}")
  rows = []
  for method, e in entries.items():
    med = statistics.median(e["times"])
    mfu = e["model_flops"] / devices / med / peak if peak else None
    rows.append((method, med, mfu, e["peak"]))
    print(f"{method:<10}{1e3 * med:>10.1f}{1e3 * min(e['times']):>9.1f}"
          f"{args.batch_size / med / devices:>11.1f}{e['flops'] / 1e9:>12.2f}{e['compile_s']:>11.1f}"
          f"{format(mfu, '.1%') if mfu else 'n/a':>7}{e['peak'] / 2 ** 30:>13.2f}")
  if args.markdown:
    write_markdown(args.markdown, rows, args, devices)
  if _present(PAIRS, entries):
    print(f"{'overhead':<20}{'time':>8}{'XLA flops':>11}{'paper (flops)':>15}")
  for base, detcon, paper in _present(PAIRS, entries):
    tb, td = (statistics.median(entries[m]["times"]) for m in (base, detcon))
    fb, fd = entries[base]["flops"], entries[detcon]["flops"]
    flops = f"{100 * (fd / fb - 1):+.1f}%" if fb else "n/a"
    print(f"{detcon + ' / ' + base:<20}{100 * (td / tb - 1):>+7.1f}%{flops:>11}{paper:>+14.1f}%")
  if _present(OTHERS, entries):
    print(f"{'ratio':<20}{'time':>8}{'XLA flops':>11}")
  for method, base in _present(OTHERS, entries):
    tb, tm = (statistics.median(entries[m]["times"]) for m in (base, method))
    fb, fm = entries[base]["flops"], entries[method]["flops"]
    flops = f"x{fm / fb:.2f}" if fb else "n/a"
    print(f"{method + ' / ' + base:<20}{'x' + format(tm / tb, '.2f'):>8}{flops:>11}")
  _print_online(entries, args, timed=True)


def kmeans_flops(config) -> float:
  """FLOPs of one step's online-mask K-means, counted by hand with every loop iteration
  (XLA's cost analysis counts a loop body once): per image of the global batch, n cells
  of C channels, k clusters, i Lloyd iterations: the k-means++ seeding (k passes of
  3nC), i + 1 assignments of view 1 and one of view 2 (2nkC each), i centroid updates
  (2nkC)."""
  n = (config.image_size // output_stride(config.model.stem_pool)) ** 2
  c, k = num_features(config.model.depth, config.model.width), config.online_masks.k
  i = config.online_masks.iterations
  per_image = 3 * n * c * k + (i + 2) * 2 * n * k * c + i * 2 * n * k * c
  return float(config.batch_size * per_image)


def _print_online(entries, args, timed: bool) -> None:
  """DetCon-B's step with online masks over its step with the records' (FH) masks."""
  if not all(m in entries for m in ONLINE_PAIR):
    return
  fh, online = (entries[m] for m in ONLINE_PAIR)
  time_ratio = (f"time x{statistics.median(online['times']) / statistics.median(fh['times']):.3f}, "
                if timed else "")
  config = make_config(ONLINE_PAIR[1], args)
  kmeans = kmeans_flops(config)
  print(f"online / fh masks (DetCon-B): {time_ratio}XLA flops x{online['flops'] / fh['flops']:.4f}"
        f"; the K-means alone (k={config.online_masks.k}, {config.online_masks.iterations} "
        f"iterations, every iteration counted) {kmeans / 1e9:.3f} GFLOP/step = "
        f"{100 * kmeans / fh['flops']:.3f}% of the FH step")


if __name__ == "__main__":
  main()
