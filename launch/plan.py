"""Will a training config fit the device, and what does a step cost? Planned on this CPU.

  python -m launch.plan --config=configs/detcon_b.py:imagenet --tpu=v4-32
  python -m launch.plan --config=configs/byol.py:imagenet --gpu=h100 --config.model.remat=True
  python -m launch.plan --config=configs/detcon_b.py:imagenet --config=configs/byol.py:imagenet \
      --tpu=v4-32 --tpu=v5e-8 --gpu=h100          # one table row per config and device

For each config and device (a TPU slice as launch.tpu names it, or N GPUs: h100 = one
host of 8, h100-16 = 16), from abstract shapes only (no batch is ever allocated):
- per-device batch: config.batch_size / the devices (the trainer's data sharding);
- FLOPs: XLA's count of the whole train step (loss, grads, optimiser, EMA, queue...)
  lowered at the global batch, the count benchmarks/train_step.py prints (the same
  code); per image, per step and per device, and the step time at 100% of the
  device's peak bf16 rate (a floor: MFU 1);
- peak memory per device: XLA's memory analysis (arguments + outputs - donated +
  temporaries) of the per-device program that jit partitions for the devices
  (simulated CPU devices, the batch sharded as the trainer shards it, so batch norm
  and negatives span the global batch). Memory is nearly linear in the per-device
  batch (DetCon-B RN50 on 16 devices: 193.3 MB per image between batches 8 and 16,
  197.7 between 16 and 64, so the line through 8 and 16 reads 1.6% low at 64), and a
  CPU compile grows with the batch (93, 66, 183 s there on 2 loaded cores), so by
  default two small per-device batches (--probe_batches) are compiled and the line
  through them is read at the real batch; --exact compiles the real batch and every
  candidate of the search instead;
- whether that fits the device's memory (the DEVICES table) and the largest power-of-
  two per-device batch that does; with config.model.remat=True also the same config
  without it, so the rematerialisation's FLOPs cost and memory saving show side by side.

What this is not: the TPU's or GPU's own figure. XLA for CPU lays out, fuses and
schedules the step differently from XLA for TPU/GPU (tiled and padded layouts,
other fusions), so the device's peak differs, by an amount no device has measured
yet; benchmarks/accelerator.sh prints the device-compiled peak beside this estimate.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time

GiB = 2 ** 30


# --- Devices -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip: memory, dense bf16 peak, chips per host; `kinds`: jax device_kind strings."""
  name: str
  hbm_bytes: int              # per chip
  peak_bf16: float            # dense FLOP/s per chip
  chips_per_host: int
  kinds: tuple[str, ...]
  usable_fraction: float = 1.0   # of hbm_bytes that XLA may take by default


# Sources. TPUs: Cloud TPU system architecture pages, per chip (cloud.google.com/tpu/docs/
# v2, /v3, /v4, /v5e, /v5p, /v6e: HBM, peak bf16 TFLOP/s; hosts as launch.tpu.GENERATIONS).
# v2/v3 chips are two JAX devices (TensorCores), so a device gets half of each.
# GPUs: NVIDIA datasheets (A100 80GB SXM, H100 SXM, H200 SXM), dense bf16 tensor-core
# rate (the sparse figure is twice that), 8 GPUs per HGX/DGX host; HBM as sold (GB =
# 1e9 bytes). On GPUs JAX preallocates 75% of the memory by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION), which is what a step may use.
DEVICES = {
    "v2": Accelerator("TPU v2", 16 * GiB, 45e12, 4, ("TPU v2",)),
    "v3": Accelerator("TPU v3", 32 * GiB, 123e12, 4, ("TPU v3",)),
    "v4": Accelerator("TPU v4", 32 * GiB, 275e12, 4, ("TPU v4",)),
    "v5e": Accelerator("TPU v5e", 16 * GiB, 197e12, 8, ("TPU v5 lite", "TPU v5e")),
    "v5p": Accelerator("TPU v5p", 95 * GiB, 459e12, 4, ("TPU v5p", "TPU v5")),
    "v6e": Accelerator("TPU v6e", 32 * GiB, 918e12, 8, ("TPU v6 lite", "TPU v6e")),
    "a100": Accelerator("NVIDIA A100 80GB", 80 * 10 ** 9, 312e12, 8, ("A100",), 0.75),
    "h100": Accelerator("NVIDIA H100 SXM", 80 * 10 ** 9, 989e12, 8, ("H100",), 0.75),
    "h200": Accelerator("NVIDIA H200 SXM", 141 * 10 ** 9, 989e12, 8, ("H200",), 0.75),
}
GPUS = ("a100", "h100", "h200")


@dataclasses.dataclass(frozen=True)
class Target:
  """The devices a job runs on: what one JAX device has, how many there are."""
  name: str                   # v4-32, h100-8
  accelerator: Accelerator
  devices: int                # jax.device_count()
  hosts: int
  devices_per_chip: int = 1

  @property
  def memory(self) -> float:
    """Bytes one JAX device may use."""
    a = self.accelerator
    return a.hbm_bytes * a.usable_fraction / self.devices_per_chip

  @property
  def peak(self) -> float:
    return self.accelerator.peak_bf16 / self.devices_per_chip


def tpu_target(name: str) -> Target:
  from launch import tpu
  s = tpu.parse_slice(name)
  return Target(name, DEVICES[s.generation.name], s.devices, s.hosts,
                s.generation.devices_per_chip)


def gpu_target(name: str) -> Target:
  """'h100' (one host of 8) or 'h100-16' (16 GPUs)."""
  from launch.tpu import LaunchError
  kind, _, count = name.strip().lower().partition("-")
  if kind not in GPUS or (count and not count.isdigit()) or count == "0":
    raise LaunchError(f"--gpu={name!r}: use one of {', '.join(GPUS)}, optionally with a "
                      "GPU count (h100 = 8 GPUs on one host, h100-16 = 16).")
  acc = DEVICES[kind]
  n = int(count) if count else acc.chips_per_host
  return Target(f"{kind}-{n}", acc, n, math.ceil(n / acc.chips_per_host))


def accelerator_of(device_kind: str) -> str | None:
  """The DEVICES key of a jax device_kind ('TPU v4', 'NVIDIA H100 80GB HBM3'), if any;
  the longest matching name wins ('TPU v5 lite' before 'TPU v5')."""
  hits = [(len(k), key) for key, a in DEVICES.items() for k in a.kinds
          if k.lower() in device_kind.lower()]
  return max(hits)[1] if hits else None


def device_peak(device) -> float | None:
  """Peak bf16 FLOP/s of one JAX device (a v2/v3 TensorCore: half its chip's); None on
  CPU or for a kind DEVICES lacks."""
  from launch.tpu import GENERATIONS
  key = accelerator_of(device.device_kind) if device.platform != "cpu" else None
  if key is None:
    return None
  return DEVICES[key].peak_bf16 / (GENERATIONS[key].devices_per_chip if key in GENERATIONS
                                    else 1)


# --- The compiled step (shared with benchmarks/train_step.py) --------------------------------
def jit_step(objective, config, mesh, rng):
  """(init, step): the trainer's jitted init and train step for `mesh` (loop._run's)."""
  import jax
  from detcon_jax.core import sharding
  from detcon_jax.train import loop
  from detcon_jax.core import state as state_lib
  tx, schedule = state_lib.make_optimizer(objective, config)
  replicated = sharding.replicated(mesh)
  init = jax.jit(lambda r, b: loop.init_train_state(objective, tx, config, r, b),
                 out_shardings=replicated)
  step = jax.jit(loop.make_train_step(objective, tx, schedule, config, rng),
                 in_shardings=(replicated, sharding.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  return init, step


def xla_flops(cost) -> float:
  """XLA's FLOP count from a cost_analysis() (a dict, or a list of one on older jax)."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def lower(config, mesh, rng=None):
  """The train step lowered for the global batch config.batch_size on `mesh`, from shapes."""
  import jax
  from detcon_jax.objectives import registry
  from detcon_jax.core import sharding
  from detcon_jax.train import loop
  rng = jax.random.PRNGKey(0) if rng is None else rng
  objective = registry.get_objective(config.method)
  spec = sharding.batch_sharded(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec)
           for k, v in loop.abstract_batch(objective, config).items()}
  init, step = jit_step(objective, config, mesh, rng)
  return step.lower(jax.eval_shape(init, rng, batch), batch)


def peak_bytes(stats) -> int:
  """Peak device memory of a compiled program from its memory_analysis(): what it is
  given and returns, less what it reuses in place (donated state), plus temporaries."""
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _at(config, per_device: int, devices: int):
  c = copy.deepcopy(config)
  c.batch_size = per_device * devices
  return c


def compiled_peak(config, mesh, per_device: int) -> int:
  """Per-device peak bytes of the step compiled (for this host's CPU) at a per-device batch."""
  lowered = lower(_at(config, per_device, mesh.size), mesh)
  return peak_bytes(lowered.compile().memory_analysis())


@dataclasses.dataclass
class Memory:
  """Peak bytes per device as fixed + per_image x per-device batch, from measured points."""
  fixed: float
  per_image: float
  points: dict                # per-device batch -> compiled peak bytes

  def at(self, per_device: int) -> float:
    return self.points.get(per_device, self.fixed + self.per_image * per_device)

  @classmethod
  def probe(cls, config, mesh, batches=(8, 16)) -> "Memory":
    points = {b: compiled_peak(config, mesh, b) for b in sorted(set(batches))}
    (b0, m0), (b1, m1) = list(points.items())[0], list(points.items())[-1]
    slope = (m1 - m0) / (b1 - b0)
    return cls(m0 - slope * b0, slope, points)


def largest_fit(memory_at, budget: float, start: int, limit: int = 2 ** 16) -> int:
  """The largest power-of-two per-device batch b with memory_at(b) <= budget (0: none);
  a doubling / halving search from `start` (memory grows with the batch)."""
  b = 2 ** max(0, int(math.log2(max(start, 1))))
  if memory_at(b) <= budget:
    while 2 * b <= limit and memory_at(2 * b) <= budget:
      b *= 2
    return b
  while b > 1:
    b //= 2
    if memory_at(b) <= budget:
      return b
  return 0


def kept_bytes(config, devices: int, per_device: int) -> float:
  """Bytes per device the forward pass keeps for the backward pass (JAX's residuals of the
  loss's vjp, from shapes: what config.model.remat changes), the global batch's / devices."""
  import jax
  import numpy as np
  from detcon_jax.objectives import registry
  from detcon_jax.train import loop
  c = _at(config, per_device, devices)
  objective = registry.get_objective(c.method)
  batch = loop.abstract_batch(objective, c)
  rng = jax.random.PRNGKey(0)
  params, state = jax.eval_shape(lambda r, b: objective.init(r, c, b), rng, batch)
  vjp = jax.eval_shape(lambda p, s, b: jax.vjp(
      lambda p: objective.loss(p, s, b, rng, 0, c), p, has_aux=True)[1], params, state, batch)
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(vjp)) / devices


class CpuPeak:
  """per-device batch -> XLA's CPU-compiled peak bytes of `config`'s step on `mesh`: the
  line through probe_batches (`line`, compiled once, on first use), or with exact=True
  the step compiled at each batch asked."""

  def __init__(self, config, mesh, probe_batches=(8, 16), exact: bool = False):
    self.config, self.mesh, self.probes, self.exact = config, mesh, probe_batches, exact
    self._line, self._compiled = None, {}

  @property
  def line(self) -> Memory:
    if self._line is None:
      self._line = Memory.probe(self.config, self.mesh, self.probes)
    return self._line

  @property
  def how(self) -> str:
    return ("compiled at each batch" if self.exact else
            "linear through per-device batches " + " and ".join(map(str, sorted(self.probes))))

  def at(self, b: int) -> float:
    if not self.exact:
      return self.line.at(b)
    if b not in self._compiled:
      self._compiled[b] = compiled_peak(self.config, self.mesh, b)
    return self._compiled[b]


def plan(config, target: Target, *, probe_batches=(8, 16), exact: bool = False,
         devices=None, cpu: CpuPeak | None = None) -> dict:
  """One row of the plan (see the module docstring). `devices`: the JAX devices to
  compile for (default: the first target.devices of this process). `cpu`: the CpuPeak of
  this config without remat on these devices, when there is one already.

  Remat: XLA:CPU's compiled peak does not drop with it (measured: the same or higher; the
  recomputation is kept, the saving is not), so a remat row takes the CPU line without
  remat and scales its per-image part by how much less the forward keeps for the backward
  (JAX's residuals, per image, with remat / without), from shapes."""
  import jax
  from detcon_jax.core.validation import validate
  from detcon_jax.core import sharding
  validate(config, device_count=target.devices, process_count=target.hosts)
  devices = jax.devices()[:target.devices] if devices is None else devices
  if len(devices) != target.devices:
    raise RuntimeError(f"{target.name} needs {target.devices} devices to compile for; this "
                       f"process has {jax.device_count()}: run python -m launch.plan, which "
                       "makes that many CPU devices.")
  mesh = sharding.make_mesh(devices)
  n = target.devices
  per_device = config.batch_size // n
  t = time.perf_counter()
  flops = xla_flops(lower(config, mesh).cost_analysis())
  remat = bool(config.model.get("remat", False))
  base = copy.deepcopy(config)
  base.model.remat = False
  cpu = cpu or CpuPeak(base, mesh, probe_batches, exact)
  memory_at, how = cpu.at, cpu.how
  line = None if exact else (cpu.line.fixed, cpu.line.per_image)
  if remat:
    b1, b2 = sorted(cpu.line.points)
    factor = ((kept_bytes(config, n, b2) - kept_bytes(config, n, b1))
              / (kept_bytes(base, n, b2) - kept_bytes(base, n, b1)))
    line = (cpu.line.fixed, factor * cpu.line.per_image)
    memory_at = lambda b: line[0] + line[1] * b  # noqa: E731
    how = (f"linear through per-device batches {b1} and {b2} without remat, its per-image "
           f"part x{factor:.2f} (kept activations with / without remat)")
  peak = memory_at(per_device)
  largest = largest_fit(memory_at, target.memory, per_device)
  return dict(config=config, target=target, per_device=per_device, flops=flops,
              flops_per_image=flops / config.batch_size, peak=peak,
              kept=kept_bytes(config, n, per_device), fits=peak <= target.memory,
              largest=largest, memory_how=how, seconds=time.perf_counter() - t, remat=remat,
              cpu=cpu, line=line)


# --- Output ---------------------------------------------------------------------------------
CPU_NOTE = ("Peak memory is XLA's CPU-compiled estimate of the per-device program, not the "
            "TPU/GPU figure: XLA for those devices lays out, fuses and schedules the step "
            "differently (no device has been measured against it yet; "
            "benchmarks/accelerator.sh prints both).")


def _gib(n: float) -> str:
  return f"{n / GiB:.2f}" if n < 10 * GiB else f"{n / GiB:.1f}"


def summary(row: dict, label: str = "") -> str:
  """The one-line summary (launch.tpu's dry run prints it)."""
  t = row["target"]
  c = row["config"]
  fit = "fits" if row["fits"] else "does NOT fit"
  line = (f": {row['line'][0] / GiB:.2f} GiB + {row['line'][1] / 2 ** 20:.1f} MiB per image"
          if row.get("line") else "")
  return (f"{label or c.method}{' remat' if row['remat'] else ''} on {t.name}: "
          f"{row['per_device']}/device (global {c.batch_size}), "
          f"{row['flops_per_image'] / 1e9:.1f} GFLOP/image, "
          f"peak ~{_gib(row['peak'])} GiB/device (CPU-compiled estimate{line}) of "
          f"{_gib(t.memory)} GiB: {fit}; largest power-of-two batch that fits: "
          f"{row['largest']}/device")


HEADER = (f"{'config':<24}{'device':<9}{'batch/dev':>10}{'GFLOP/img':>10}{'TFLOP/step':>11}"
          f"{'ms@peak':>9}{'kept GiB':>9}{'peak GiB/dev':>13}{'of GiB':>8}{'fits':>6}"
          f"{'largest/dev':>12}")


def table_row(row: dict, label: str) -> str:
  t = row["target"]
  ms = 1e3 * row["flops"] / t.devices / t.peak
  name = label + (" remat" if row["remat"] else "")
  return (f"{name:<24}{t.name:<9}{row['per_device']:>10}{row['flops_per_image'] / 1e9:>10.1f}"
          f"{row['flops'] / 1e12:>11.1f}{ms:>9.1f}{_gib(row['kept']):>9}{_gib(row['peak']):>13}"
          f"{_gib(t.memory):>8}"
          f"{'yes' if row['fits'] else 'NO':>6}{row['largest']:>12}")


def remat_line(base: dict, remat: dict) -> str:
  flops = 100 * (remat["flops"] / base["flops"] - 1)
  return (f"  remat on {remat['target'].name}: FLOPs {flops:+.1f}%,"
          f" peak memory {100 * (remat['peak'] / base['peak'] - 1):+.1f}% "
          f"({_gib(base['peak'])} -> {_gib(remat['peak'])} GiB/device)")


# --- Command line ---------------------------------------------------------------------------
def _parser():
  p = argparse.ArgumentParser(prog="python -m launch.plan", description=__doc__.split("\n\n")[0],
                              epilog="Any --config.KEY=VALUE applies to every --config.")
  p.add_argument("--config", action="append", required=True,
                 help="configs/<method>.py:<preset> (repeat for a table)")
  p.add_argument("--tpu", action="append", default=[], help="slice: v4-32, v5e-8, ... (repeat)")
  p.add_argument("--gpu", action="append", default=[],
                 help=f"GPUs: {', '.join(GPUS)} (8, one host) or e.g. h100-16 (repeat)")
  p.add_argument("--probe_batches", default="8,16",
                 help="two per-device batches compiled for the memory line (default 8,16)")
  p.add_argument("--exact", action="store_true",
                 help="compile the real batch and every searched batch (slow at RN50)")
  p.add_argument("--summary", action="store_true", help="print only the one-line summaries")
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides = [x for x in argv if x.startswith("--config.")]
  a = _parser().parse_args([x for x in argv if not x.startswith("--config.")])
  from launch.tpu import LaunchError, _load_config
  try:
    targets = [tpu_target(n) for n in a.tpu] + [gpu_target(n) for n in a.gpu]
    if not targets:
      raise LaunchError("name the devices: --tpu=v4-32 (a slice) or --gpu=h100 (repeatable).")
    probes = tuple(int(b) for b in a.probe_batches.split(","))
    if len(set(probes)) != 2 or min(probes) < 1:
      raise LaunchError(f"--probe_batches={a.probe_batches}: two different batches >= 1.")
    # Before any backend starts: CPU, with as many devices as the largest target, and XLA:CPU's
    # memory-minimising scheduler (its default trades memory for concurrency: a ResNet-50 x0.25
    # backward at 128 px measured 2.1x the peak), as device compilers schedule for memory.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_concurrency_optimized_scheduler=false")
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", max(t.devices for t in targets))
    configs = [(spec, _load_config(spec, overrides)) for spec in a.config]
  except (LaunchError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from detcon_jax.core.validation import validate
  from detcon_jax.errors import ConfigError
  for spec, config in configs:                  # every mistake before anything compiles
    for target in targets:
      try:
        validate(config, device_count=target.devices, process_count=target.hosts)
      except ConfigError as e:
        print(f"error: {spec} on {target.name}: {e}", file=sys.stderr)
        return 2
  if not a.summary:
    print(HEADER)
  t0 = time.perf_counter()
  for spec, config in configs:
    label = os.path.basename(spec).replace(".py", "")
    variants = [config]
    if config.model.get("remat", False):       # its cost and saving: the same without it
      base = copy.deepcopy(config)
      base.model.remat = False
      variants = [base, config]
    for target in targets:
      rows = [plan(variants[0], target, probe_batches=probes, exact=a.exact)]
      if len(variants) == 2:                   # the same CPU compiles serve the remat row
        rows.append(plan(variants[1], target, cpu=rows[0]["cpu"]))
      if a.summary:                            # the config as given
        print(summary(rows[-1], label), flush=True)
        continue
      for row in rows:
        print(table_row(row, label), flush=True)
      if len(rows) == 2:
        print(remat_line(*rows) + f"; memory: {rows[1]['memory_how']}")
      elif not rows[-1]["fits"]:
        print(f"  {label} does not fit {target.name}: try --config.model.remat=True, a "
              f"per-device batch of {rows[-1]['largest']} or more devices.")
  if not a.summary:
    how = ("compiled at each batch" if a.exact else
           "linear through per-device batches " + " and ".join(map(str, probes)))
    print(f"FLOPs: XLA's count of the train step at the global batch (benchmarks/train_step.py's). "
          f"ms@peak: that step at 100% of the device's peak bf16 rate (MFU 1), a floor. "
          f"kept: activations the forward keeps for the backward (JAX's residuals, from "
          f"shapes; what remat lowers). peak: {how}. {len(configs)} config(s) x "
          f"{len(targets)} device(s) in {time.perf_counter() - t0:.0f} s.")
    print(CPU_NOTE)
  return 0


if __name__ == "__main__":
  sys.exit(main())
