"""Config checks at the boundary: impossible settings -> one ConfigError naming the key
and the fix, before anything is built; the records and host memory a config needs.

The trainer calls validate() with the device and host counts it sees; the CLIs call
it on the loaded config. The method's own sections are checked by its Objective's
validate(), the background settings by data_pipelines/background_augment.validate.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from data_pipelines import background_augment
from data_pipelines import batch as B
from data_pipelines.views import AUGMENT_PAIRS
from detcon_jax.core.optimizer import LR_SCHEDULES, OPTIMIZERS, warmup_steps
from detcon_jax.errors import ConfigError
from detcon_jax.models.resnet import DEPTHS, EXPANSION, output_stride
from detcon_jax.objectives import registry

DTYPES = ("float32", "bfloat16")


def _fail(key: str, value, fix: str):
  raise ConfigError(f"config.{key}={value!r}: {fix}")


# Sizes and counts that must be > 0 (key -> an example value): 0 or less would stall the
# input (a shuffle window of no records) or fail deep inside a library. The others
# (batch_size, image_size, num_masks, ...) have their own checks in validate().
POSITIVE = {"data.shuffle_buffer": 1024, "head.hidden_dim": 2048, "head.output_dim": 128}


def _get(c, key: str):
  """c['a.b'] for a dotted key, None where the config lacks it."""
  for part in key.split("."):
    if c is None or part not in c:
      return None
    c = c[part]
  return c


def known_methods() -> list[str]:
  return sorted(registry.OBJECTIVES)


def validate(config, *, device_count: int | None = None, process_count: int | None = None,
             objective=None) -> ml_collections.ConfigDict:
  """Raise ConfigError for impossible settings; return config unchanged.

  device_count / process_count: the run's jax.device_count() and
  jax.process_count(), given by the trainer (skipped when None). objective:
  the method's Objective (default: the registry's entry for config.method),
  whose own validate() checks its config sections.
  """
  c = config
  if objective is None:
    methods = known_methods()
    if c.method not in methods:
      _fail("method", c.method, f"unknown method; choose one of {methods} "
            "(--config=configs/<method>.py:<preset>).")
    objective = registry.get_objective(c.method)
  _check_schedule(c)
  stride = _check_model(c)
  _check_views(c, stride)
  _check_data_and_bookkeeping(c)
  _check_devices(c, device_count, process_count)
  background_augment.validate(c)
  check_background(c, objective)
  check_online_masks(c, objective)
  objective.validate(c)
  return config


def _check_schedule(c) -> None:
  """Length, optimiser, schedule and batch."""
  if c.steps <= 0:
    _fail("steps", c.steps, "must be > 0 (e.g. --config.steps=300).")
  warmup_key = ("warmup_steps" if c.optimizer.warmup_steps is not None else "warmup_fraction")
  if warmup_key == "warmup_steps" and not 0 <= c.optimizer.warmup_steps < c.steps:
    _fail("optimizer.warmup_steps", c.optimizer.warmup_steps,
          f"must be in [0, steps={c.steps}); lower it or raise --config.steps.")
  if warmup_key == "warmup_fraction" and not 0 <= c.optimizer.warmup_fraction < 1:
    _fail("optimizer.warmup_fraction", c.optimizer.warmup_fraction,
          "must be in [0, 1) (a fraction of config.steps).")
  if c.optimizer.get("name", "lars") not in OPTIMIZERS:
    _fail("optimizer.name", c.optimizer.name, f"choose one of {list(OPTIMIZERS)}.")
  if c.optimizer.schedule not in LR_SCHEDULES:
    _fail("optimizer.schedule", c.optimizer.schedule, f"choose one of {list(LR_SCHEDULES)}.")
  if c.optimizer.schedule == "piecewise" and warmup_steps(c.optimizer, c.steps) > 0.96 * c.steps:
    _fail(f"optimizer.{warmup_key}", c.optimizer[warmup_key],
          "the piecewise schedule drops the rate at 96% of steps; warmup must end before.")
  if c.batch_size <= 0:
    _fail("batch_size", c.batch_size, "must be > 0 (global batch over all devices).")
  for key, example in POSITIVE.items():
    value = _get(c, key)
    if value is not None and not value > 0:
      _fail(key, value, f"must be > 0 (e.g. --config.{key}={example}).")


def _check_model(c) -> int:
  """Network and loss sizes; returns the network's output stride."""
  if c.model.depth not in DEPTHS:
    _fail("model.depth", c.model.depth, f"choose one of {sorted(DEPTHS)}.")
  stride = output_stride(bool(c.model.get("stem_pool", True)))
  if c.image_size <= 0 or c.image_size % stride:
    _fail("image_size", c.image_size,
          f"must be a positive multiple of the network stride {stride} "
          f"(e.g. {max(stride, round(c.image_size / stride) * stride)}).")
  if c.model.dtype not in DTYPES:
    _fail("model.dtype", c.model.dtype, f"choose one of {list(DTYPES)}.")
  if c.model.width <= 0:
    _fail("model.width", c.model.width, "must be > 0 (1.0 = standard ResNet).")
  if not isinstance(c.model.get("remat", False), bool):
    _fail("model.remat", c.model.remat, "must be True or False (True: recompute each ResNet "
          "block in the backward pass, for memory).")
  if c.loss.num_masks <= 0:
    _fail("loss.num_masks", c.loss.num_masks, "must be > 0 (the paper samples 16).")
  if c.loss.temperature <= 0:
    _fail("loss.temperature", c.loss.temperature, "must be > 0 (the paper uses 0.1).")
  return stride


def _check_views(c, stride: int) -> None:
  """Crop areas, multi-crop sizes and the crop constraints."""
  views = c.get("views", None)
  if views is not None:
    if int(views.small_crops) < 0:
      _fail("views.small_crops", views.small_crops, "must be >= 0 (0: no multi-crop).")
    if int(views.small_crops) and (int(views.small_size) <= 0 or int(views.small_size) % stride):
      _fail("views.small_size", views.small_size,
            f"must be a positive multiple of the network stride {stride}.")
    if not 0.0 <= float(views.get("min_salient_cover", 0.0)) < 1.0:
      _fail("views.min_salient_cover", views.min_salient_cover,
            "must be in [0, 1) (CAST: 0.2; 0: unconstrained crops).")
    if views.get("constrained", False):
      if not int(views.small_crops):
        _fail("views.constrained", True, "constrains small crops; set "
              "--config.views.small_crops=N (N > 0), or constrained=False.")
      if views.constraint_rule not in ("paper", "reference"):
        _fail("views.constraint_rule", views.constraint_rule,
              "choose 'paper' (20% of the small crop) or 'reference' (the released code).")
      overlap = views.constraint_overlap
      if overlap is not None and not 0.0 <= overlap <= 1.0:
        _fail("views.constraint_overlap", overlap, "must be in [0, 1] (None: the rule's).")
      if int(views.constraint_tries) < 1:
        _fail("views.constraint_tries", views.constraint_tries, "must be >= 1 (paper code: 10).")
    for key in ("global_area", "small_area"):
      lo, hi = views[key]
      if not 0.0 < lo <= hi <= 1.0:
        _fail(f"views.{key}", tuple(views[key]), "must satisfy 0 < low <= high <= 1.")


def _check_data_and_bookkeeping(c) -> None:
  """Input settings, evaluation, checkpoints and logging."""
  if c.data.augment not in AUGMENT_PAIRS:
    _fail("data.augment", c.data.augment, f"choose one of {list(AUGMENT_PAIRS)}.")
  if not 0.0 <= c.data.get("foreground_threshold", 0.5) <= 1.0:
    _fail("data.foreground_threshold", c.data.foreground_threshold,
          "must be in [0, 1] (saliency maps are stored in [0, 1]; 0.5 is the default).")
  if c.data.timeout_s <= 0:
    _fail("data.timeout_s", c.data.timeout_s, "must be > 0 seconds (e.g. 300).")
  if not 0 <= c.data.max_corrupt_fraction < 1:
    _fail("data.max_corrupt_fraction", c.data.max_corrupt_fraction,
          "must be in [0, 1) (0.01: stop when over 1% of the records read are unreadable).")
  if c.eval.get("every_steps", 0) < 0:
    _fail("eval.every_steps", c.eval.every_steps, "must be >= 0 (0: only at the end).")
  if c.checkpoint.every_steps < 0:
    _fail("checkpoint.every_steps", c.checkpoint.every_steps, "must be >= 0 (0: only at the end).")
  if c.checkpoint.keep < 1:
    _fail("checkpoint.keep", c.checkpoint.keep, "must be >= 1.")
  if c.log_every_steps <= 0:
    _fail("log_every_steps", c.log_every_steps, "must be > 0.")
  at_steps = tuple(c.eval.get("at_steps", ()))
  if not all(isinstance(s, int) and 1 <= s <= c.steps for s in at_steps):
    _fail("eval.at_steps", at_steps, f"must be steps in [1, steps={c.steps}] "
          "(e.g. --config.eval.at_steps=100,200,400).")


def _check_devices(c, device_count, process_count) -> None:
  """The global batch splits evenly over hosts and devices."""
  if process_count is not None and c.batch_size % process_count:
    _fail("batch_size", c.batch_size,
          f"must be divisible by the host count {process_count}; use a multiple of it.")
  if device_count is not None and c.batch_size % device_count:
    up = -(-c.batch_size // device_count) * device_count
    _fail("batch_size", c.batch_size,
          f"must be divisible by the device count {device_count}; "
          f"use e.g. --config.batch_size={up}.")


def check_background(config, objective) -> None:
  """A background augmentation mode the method does not declare (Objective.backgrounds)
  -> one ConfigError naming the methods that take it."""
  bg = config.get("background", None)
  if bg is None or bg.mode == "none" or bg.mode in objective.backgrounds:
    return
  works = [name for name, o in sorted(registry.OBJECTIVES.items()) if bg.mode in o.backgrounds]
  why = (" (BG Swaps needs a method with explicit negatives and a hook in its loss for the "
         "background-matched one)" if bg.mode == "swaps" else "")
  raise ConfigError(f"config.background.mode={bg.mode!r} does not compose with "
                    f"config.method={config.method!r}{why}; it works with {', '.join(works)}.")


def check_online_masks(config, objective) -> None:
  """config.data.mask_source='online' on a method without Objective.online_masks -> one
  ConfigError naming the methods that take it."""
  if config.data.get("mask_source", None) != "online" or objective.online_masks:
    return
  works = [name for name, o in sorted(registry.OBJECTIVES.items()) if o.online_masks]
  raise ConfigError(f"config.data.mask_source='online' does not work with config.method="
                    f"{config.method!r}: online masks cluster an EMA target network's feature "
                    f"maps for DetCon's mask pooling; they work with {', '.join(works)}. Use "
                    "a stored mask source (fh, grid, mcg, learned...) or one of those methods.")


def validate_records(config, manifest: dict, records_dir: str = "") -> None:
  """Raise ConfigError when the records cannot serve config: views larger than the
  stored images (only upsampled, at any memory cost) or a global batch larger than
  the train split (a batch would hold the same image twice: identical negatives)."""
  c, where = config, f" in {records_dir}" if records_dir else ""
  stored = manifest.get("image_size")
  meaning = manifest.get("image_size_meaning", "shorter side")
  sizes = [("image_size", c.image_size)]
  views = c.get("views", None)
  if views is not None and int(views.get("small_crops", 0)):
    sizes.append(("views.small_size", views.small_size))
  for key, size in sizes:
    if stored and size > stored:
      _fail(key, size, f"larger than the records' images{where} ({meaning} {stored} px): "
            "views would only be upsampled. Lower it, or rebuild the records with "
            f"python -m data_pipelines.build --image_size={size} ...")
  count = manifest.get("splits", {}).get("train", {}).get("count")
  if count is not None and c.batch_size > count:
    _fail("batch_size", c.batch_size, f"larger than the {count} train images of the "
          f"records{where}: a batch would hold the same image twice. Lower it.")


# Host batches alive at once: tf.data's prefetch (2, data_pipelines/input.py), the
# HostBatches queue (1) and the batches ahead of the step on the mesh (2, loop._on_mesh).
BATCHES_IN_FLIGHT = 5
# Tensors the backward pass keeps per convolution: its output, the batch norm's, the ReLU's.
TENSORS_PER_CONV = 3


def activation_floats(image_size: int, depth: int, width: float, stem_pool: bool) -> int:
  """Floats of one image's encoder activations kept for the backward pass (rough):
  TENSORS_PER_CONV x the output size (H x W x C) of every conv of the ResNet (stem, every
  block's convs, at its stage's output resolution; downsample convs not counted)."""
  kind, blocks = DEPTHS[depth]
  side = image_size / 2                                     # stem conv: stride 2
  total = side * side * 64 * width
  side /= 2 if stem_pool else 1
  for stage, n in enumerate(blocks):
    side /= 2 if stage else 1
    planes = 64 * 2 ** stage * width
    convs = ([planes, planes * EXPANSION[kind]] if kind == "basic"
             else [planes, planes, planes * EXPANSION[kind]])
    total += n * side * side * sum(convs)
  return int(TENSORS_PER_CONV * total)


def memory_estimate(config, specs, *, process_count: int = 1) -> dict:
  """A rough, low estimate of the memory one training step needs, in bytes per host.

  input: the host batch (data_pipelines/batch.py train_batch_shapes: every view's
  image, mask ids, saliency... at its own size) x BATCHES_IN_FLIGHT.
  activations: activation_floats() per example and view, x the host batch, in
  config.model.dtype (where the devices are: host RAM on CPU).
  Not counted: parameters and optimizer state, the heads, a target network's
  forward pass, XLA's temporaries, tf.data's decode buffers -- the true peak is
  higher, so a config this refuses cannot fit; one it passes may still not.
  """
  host_batch = config.batch_size // max(process_count, 1)
  shapes = B.train_batch_shapes(host_batch, num_masks=config.loss.num_masks, specs=specs)
  batch_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                    for shape, dtype in shapes.values())
  per_example = sum(activation_floats(s.size, config.model.depth, config.model.width,
                                      bool(config.model.get("stem_pool", True)))
                    for s in specs) * (2 if config.model.dtype == "bfloat16" else 4)
  return dict(input=BATCHES_IN_FLIGHT * batch_bytes, activations=per_example * host_batch)


def available_memory() -> int | None:
  """Bytes of RAM this process may still take: psutil's available memory (else
  /proc/meminfo's MemAvailable, else os.sysconf's free pages), lowered to a cgroup's
  limit minus its usage where a container caps memory; None if nothing says."""
  free = None
  try:
    import psutil
    free = int(psutil.virtual_memory().available)
  except ImportError:
    try:
      with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f
                    if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
      try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
      except (OSError, ValueError, AttributeError):
        pass
  for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                        "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit) as f, open(usage) as g:
        cap = int(f.read()) - int(g.read())   # 'max' (no limit) fails int()
    except (OSError, ValueError):
      continue
    if cap < 2 ** 60:                          # cgroup v1 writes 'no limit' as a huge number
      free = cap if free is None else min(free, cap)
  return free


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:.1f} GiB"


def check_memory(config, specs, *, platform: str = "cpu", process_count: int = 1,
                 available: int | None = None) -> None:
  """Refuse (ConfigError naming image_size and batch_size) a config whose memory_estimate
  exceeds the host memory available (available_memory(), or `available`), before anything
  is allocated: the input batches, plus the activations on CPU, where the devices' memory
  is host memory. (An accelerator that runs out fails with XLA's own error, on the device;
  the host is not at risk, so the activations are not judged there.)"""
  est = memory_estimate(config, specs, process_count=process_count)
  available = available_memory() if available is None else available
  need = est["input"] + (est["activations"] if platform == "cpu" else 0)
  if available and need > available:
    views = ", ".join(f"{s.name} {s.size} px" for s in specs)
    raise ConfigError(
        f"config.image_size={config.image_size}, config.batch_size={config.batch_size}: "
        f"a training step needs about {_gib(need)} of host memory by a rough, low estimate "
        f"(input batches {_gib(est['input'])}"
        + (f", activations {_gib(est['activations'])}" if platform == "cpu" else "")
        + f" for views {views}; detcon_jax/core/validation.py memory_estimate), more than the "
        f"{_gib(available)} available. Lower --config.image_size or --config.batch_size.")
