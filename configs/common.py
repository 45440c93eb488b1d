"""Shared config defaults, paper dataset sizes, and validation.

Every method config starts from `base_config()` and overrides what differs;
`validate(config)` checks it at the boundary and raises ConfigError naming the
key and the fix. The trainer calls validate again with the device and host
counts it sees.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from detcon_jax.errors import ConfigError  # noqa: F401  (configs.common.ConfigError, as before)

# Dataset sizes used to turn epochs into steps (documented in the presets).
IMAGENET_TRAIN_IMAGES = 1_281_167   # ILSVRC-2012 train
COCO_TRAIN_IMAGES = 118_287         # COCO train2017
DTYPES = ("float32", "bfloat16")
AUGMENTS = ("byol", "simclr", "moco_v2", "swav", "moco_v2_aplus",
            "supervised")  # views.AUGMENT_PAIRS
SCHEDULES = ("cosine", "piecewise")  # detcon_jax.train.optimizer.LR_SCHEDULES
OPTIMIZERS = ("lars", "sgd", "adamw")  # detcon_jax.train.optimizer.OPTIMIZERS
DETCON_FORMS = ("reference", "dedup")  # detcon_jax.objectives.contrastive.DETCON_FORMS


def steps_for_epochs(epochs: float, num_images: int, batch_size: int) -> int:
  """Training length in steps for `epochs` passes over `num_images`."""
  return max(1, int(epochs * num_images // batch_size))


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every method (overridden per method and preset)."""
  c = ml_collections.ConfigDict()
  c.method = ""
  c.seed = 0
  c.steps = 300
  c.batch_size = 32            # global, over all hosts and devices
  c.image_size = 64            # crop size of the training views

  # stem_pool=False: no stem max-pool, output stride 16 (small images; see models/resnet.py).
  # remat=True: recompute each ResNet block in the backward pass (less activation memory,
  # about one more forward pass of FLOPs; python -m launch.plan shows both).
  c.model = ml_collections.ConfigDict(dict(depth=18, width=1.0, dtype="float32",
                                          stem_pool=True, remat=False))
  c.head = ml_collections.ConfigDict(dict(hidden_dim=2048, output_dim=128, batch_norm=True))
  # detcon_form: "reference" (the public DetCon code) or "dedup" (duplicate masks
  # folded out); detcon_same_image_negatives=False drops same-image negatives.
  c.loss = ml_collections.ConfigDict(dict(temperature=0.1, local_negatives=False,
                                          num_masks=16, detcon_form="reference",
                                          detcon_same_image_negatives=True))
  # Warmup: warmup_fraction of config.steps, so that any --config.steps works; an
  # explicit warmup_steps overrides it (optimizer.warmup_steps(): the resolved value).
  c.optimizer = ml_collections.ConfigDict(dict(
      name="lars", base_lr=0.3, weight_decay=1e-6, momentum=0.9, eta=1e-3,
      warmup_steps=ml_collections.config_dict.placeholder(int), warmup_fraction=0.1,
      schedule="cosine", exclude_1d=True))  # exclude_1d: no decay on biases and BN
  c.ema = ml_collections.ConfigDict(dict(tau0=0.99))  # used by methods with a target net
  # build_demo: build the embedded demo records if missing. timeout_s: longest wait
  # for a batch before the run stops with an error. max_corrupt_fraction: the run
  # stops when more of the records read are unreadable. verify_checksums: check the
  # shards' sha256 against manifest.json at start-up (when the build stored them).
  # foreground_threshold: views with the 'foreground' field get the view's saliency
  # map (stored per image in [0, 1], min-max normalised) > this, as {0, 1}.
  c.data = ml_collections.ConfigDict(dict(
      records_dir="data/demo", augment="simclr", mask_source="fh", shuffle_buffer=1024,
      build_demo=False, timeout_s=300.0, max_corrupt_fraction=0.01, verify_checksums=True,
      foreground_threshold=0.5, multi_hot_labels=False))
  # multi_hot_labels: training batches carry 'labels', every class of the image's GT
  # instances as a multi-hot vector (records with GT; the supervised demo's targets).
  # demo_bg_correlation: the demo preset's records correlate class and background photo
  # on the train split with this probability (data_pipelines/demo.py; test stays uniform);
  # a records_dir built with another value is refused, so give each value its own directory.
  c.data.demo_bg_correlation = 0.0
  # Background augmentations (data_pipelines/background.py; Ryali et al. 2021): mode
  # none | rm | random | swaps, each global view with probability p_pos; swaps adds a
  # background-matched negative with probability p_neg (the paper's MoCo-v2: 0.2, 0.2).
  # fg_min: the global crops hold >= this fraction of the foreground (FGmin; None: 0.1
  # with swaps, as the paper's MoCo-v2, else 0; 0: unconstrained).
  c.background = ml_collections.ConfigDict(dict(
      mode="none", p_pos=0.2, p_neg=0.2,
      fg_min=ml_collections.config_dict.placeholder(float)))
  # Views (data_pipelines/views.py standard_views): two global crops of image_size px
  # with crop area in global_area, then small_crops multi-crop views of small_size px;
  # min_salient_cover > 0: the global crops cover that fraction of the salient area (CAST).
  # constrained=True: each small crop overlaps view2's crop (Van Gansbeke et al. 2021,
  # A.1): constraint_rule "paper" (>= 20% of the small crop inside it) or "reference"
  # (the released code: >= 10% of the small crop's target area); constraint_overlap
  # None = the rule's fraction; constraint_tries candidates, then an unconstrained
  # crop (counted: metric views/constraint_fallbacks).
  c.views = ml_collections.ConfigDict(dict(
      global_area=(0.08, 1.0), small_crops=0, small_size=96, small_area=(0.05, 0.14),
      min_salient_cover=0.0, constrained=False, constraint_rule="paper",
      constraint_overlap=ml_collections.config_dict.placeholder(float), constraint_tries=10))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
  c.log_every_steps = 10
  # evals: names in detcon_jax.evaluate.run.EVALUATIONS; every_steps 0 = only at the end.
  # at_steps: steps also evaluated (the efficiency curve), their checkpoints kept.
  c.eval = ml_collections.ConfigDict(dict(at_end=False, every_steps=0, at_steps=(),
                                          evals=("knn", "linear", "retrieval", "seg_linear",
                                                 "multilabel", "masks")))
  return c


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
  from detcon_jax.objectives import registry  # lazy: configs load without jax
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
    from detcon_jax.objectives import registry  # lazy: configs load without jax
    objective = registry.get_objective(c.method)
  if c.steps <= 0:
    _fail("steps", c.steps, "must be > 0 (e.g. --config.steps=300).")
  from detcon_jax.train.optimizer import warmup_steps  # lazy: configs load without jax
  warmup_key = ("warmup_steps" if c.optimizer.warmup_steps is not None else "warmup_fraction")
  if warmup_key == "warmup_steps" and not 0 <= c.optimizer.warmup_steps < c.steps:
    _fail("optimizer.warmup_steps", c.optimizer.warmup_steps,
          f"must be in [0, steps={c.steps}); lower it or raise --config.steps.")
  if warmup_key == "warmup_fraction" and not 0 <= c.optimizer.warmup_fraction < 1:
    _fail("optimizer.warmup_fraction", c.optimizer.warmup_fraction,
          "must be in [0, 1) (a fraction of config.steps).")
  if c.optimizer.get("name", "lars") not in OPTIMIZERS:
    _fail("optimizer.name", c.optimizer.name, f"choose one of {list(OPTIMIZERS)}.")
  if c.optimizer.schedule not in SCHEDULES:
    _fail("optimizer.schedule", c.optimizer.schedule, f"choose one of {list(SCHEDULES)}.")
  if c.optimizer.schedule == "piecewise" and warmup_steps(c.optimizer, c.steps) > 0.96 * c.steps:
    _fail(f"optimizer.{warmup_key}", c.optimizer[warmup_key],
          "the piecewise schedule drops the rate at 96% of steps; warmup must end before.")
  if c.batch_size <= 0:
    _fail("batch_size", c.batch_size, "must be > 0 (global batch over all devices).")
  for key, example in POSITIVE.items():
    value = _get(c, key)
    if value is not None and not value > 0:
      _fail(key, value, f"must be > 0 (e.g. --config.{key}={example}).")
  from detcon_jax.models.resnet import DEPTHS, output_stride  # lazy: configs load without jax
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
  if c.loss.get("detcon_form", "reference") not in DETCON_FORMS:
    _fail("loss.detcon_form", c.loss.detcon_form,
          f"choose one of {list(DETCON_FORMS)} (reference: the public DetCon code).")
  if not 0.0 <= c.ema.tau0 <= 1.0:
    _fail("ema.tau0", c.ema.tau0, "must be in [0, 1] (paper: 0.99 or 0.996).")
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
  if c.data.augment not in AUGMENTS:
    _fail("data.augment", c.data.augment, f"choose one of {list(AUGMENTS)}.")
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
  if process_count is not None and c.batch_size % process_count:
    _fail("batch_size", c.batch_size,
          f"must be divisible by the host count {process_count}; use a multiple of it.")
  if device_count is not None and c.batch_size % device_count:
    up = -(-c.batch_size // device_count) * device_count
    _fail("batch_size", c.batch_size,
          f"must be divisible by the device count {device_count}; "
          f"use e.g. --config.batch_size={up}.")
  from data_pipelines import background  # lazy, as the registry
  background.validate(c)
  objective.validate(c)
  return config


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
  from detcon_jax.models.resnet import DEPTHS, EXPANSION  # lazy: configs load without jax
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
  from data_pipelines import batch as B  # lazy: configs load without jax
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
  import os
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
        + f" for views {views}; configs/common.py memory_estimate), more than the "
        f"{_gib(available)} available. Lower --config.image_size or --config.batch_size.")


# --- Presets ---------------------------------------------------------------
# Two families share their paper settings (DetCon A.2, A.3):
#   'simclr': SimCLR and DetCon-S. Projector 2048/128, SimCLR augmentations,
#             LARS lr 0.3 x batch/256, wd 1e-6, no target network.
#   'byol':   BYOL and DetCon-B. Projector and predictor 4096/256, BYOL
#             augmentations, EMA target. 300 ImageNet epochs: lr 0.3, wd 1e-6,
#             tau0 0.99; 1000 epochs: lr 0.2, wd 1.5e-6, tau0 0.996.
# Both: LARS (eta 1e-3, momentum 0.9), batch 4096, 224 px, ResNet-50, 10 warmup
# epochs (as SimCLR and BYOL), temperature 0.1 for the contrastive losses.
PAPER_BATCH = 4096
WARMUP_EPOCHS = 10
FAMILY = {
    "simclr": dict(head=dict(hidden_dim=2048, output_dim=128), augment="simclr"),
    "byol": dict(head=dict(hidden_dim=4096, output_dim=256), augment="byol"),
    # MoCo v2: MLP head without BN, crops of 20-100% of the image, temperature 0.2.
    "moco_v2": dict(head=dict(hidden_dim=2048, output_dim=128, batch_norm=False),
                    augment="moco_v2", views=dict(global_area=(0.2, 1.0)),
                    loss=dict(temperature=0.2)),
    # SwAV: 2 x 224 px crops (14-100%) + 6 x 96 px crops (5-14%), temperature 0.1.
    "swav": dict(head=dict(hidden_dim=2048, output_dim=128), augment="swav",
                 views=dict(global_area=(0.14, 1.0), small_crops=6, small_size=96,
                            small_area=(0.05, 0.14)),
                 loss=dict(temperature=0.1)),
}
# BYOL-family optimisation by length, in ImageNet epochs of images seen:
# the 1000-epoch values for runs at least that long, else the 300-epoch values
# (the paper gives these two points; COCO runs are placed by images seen too).
BYOL_LONG = dict(min_imagenet_epochs=1000, base_lr=0.2, weight_decay=1.5e-6, tau0=0.996)
BYOL_SHORT = dict(base_lr=0.3, weight_decay=1e-6, tau0=0.99)
SIMCLR_OPT = dict(base_lr=0.3, weight_decay=1e-6)
# Default lengths. ImageNet: 1000 epochs = 312,784 steps at batch 4096 (warmup
# 3,127). COCO: the paper sweeps 324-5184 epochs; default 1296 = 37,426 steps
# (warmup 288), which is ~120 ImageNet epochs of images, so the BYOL family
# gets the short (300-epoch) values there.
DATASETS = {
    "imagenet": dict(images=IMAGENET_TRAIN_IMAGES, epochs=1000, schedule="cosine",
                     records_dir="data/imagenet"),
    "coco": dict(images=COCO_TRAIN_IMAGES, epochs=1296, schedule="piecewise",
                 records_dir="data/coco"),
}


def method_config(method: str) -> ml_collections.ConfigDict:
  """base_config() plus the sections the method's objective adds (its default_config());
  a section base_config() already has (e.g. 'loss') gains the method's keys."""
  from detcon_jax.objectives import registry  # lazy: jax loads only when a config is built
  c = base_config()
  c.method = method
  objective = registry.OBJECTIVES.get(method)   # tests train objectives of their own
  for section, values in (objective.default_config() if objective else {}).items():
    if section in c and isinstance(c[section], ml_collections.ConfigDict):
      c[section].update(values)
    else:
      c[section] = ml_collections.ConfigDict(values)
  return c


def _family_config(method: str, family: str) -> ml_collections.ConfigDict:
  c = method_config(method)
  f = FAMILY[family]
  c.head.update(f["head"])
  c.data.augment = f["augment"]
  c.views.update(f.get("views", {}))
  c.loss.update(f.get("loss", {}))
  return c


def paper_config(method: str, family: str, dataset: str, epochs: int | None = None,
                 batch_size: int = PAPER_BATCH):
  """RN50 / 224 px / batch 4096 settings of the paper for `dataset`."""
  d = DATASETS[dataset]
  epochs = d["epochs"] if epochs is None else epochs
  c = _family_config(method, family)
  c.batch_size = batch_size
  c.image_size = 224
  c.steps = steps_for_epochs(epochs, d["images"], batch_size)
  c.model.update(depth=50, width=1.0, dtype="bfloat16")
  # Warmup: 10 epochs, as a fraction of the run, so that an overridden config.steps
  # scales it (3127 of 312,784 steps at ImageNet 1000 epochs).
  warmup = steps_for_epochs(WARMUP_EPOCHS, d["images"], batch_size)
  c.optimizer.update(schedule=d["schedule"], warmup_fraction=warmup / c.steps)
  if family == "byol":
    imagenet_epochs = epochs * d["images"] / IMAGENET_TRAIN_IMAGES
    long_run = imagenet_epochs >= BYOL_LONG["min_imagenet_epochs"]
    opt = BYOL_LONG if long_run else BYOL_SHORT
    c.optimizer.update(base_lr=opt["base_lr"], weight_decay=opt["weight_decay"])
    c.ema.tau0 = opt["tau0"]
  else:
    c.optimizer.update(**SIMCLR_OPT)
  c.data.update(records_dir=d["records_dir"], shuffle_buffer=10_000)
  c.checkpoint.update(every_steps=5000, keep=3)
  c.log_every_steps = 100
  c.eval.at_end = False
  return c


# The demo keeps the paper's peak learning rate (0.3 x 4096/256 = 4.8) instead
# of scaling it down linearly to its small batch: LARS's trust ratio bounds each
# layer's step relative to its weights, and at lr 0.0375 (linear scaling to
# batch 32) the demo barely learns in a few hundred steps. Measured on the demo
# (DetCon-B, 120 steps): loss 13.26 -> 11.85 at lr 0.3, 12.83 -> 11.22 at 4.8.
DEMO_PEAK_LR = SIMCLR_OPT["base_lr"] * PAPER_BATCH / 256


def demo_config(method: str, family: str) -> ml_collections.ConfigDict:
  """Minutes on a 2-core CPU: narrow ResNet-18, 64 px crops of 96 px demo images.

  No stem max-pool (output stride 16): at stride 32 a 64 px view leaves a 2x2
  map, too coarse for mask pooling and for segment retrieval (3x3 at the 96 px
  evaluation size). Measured on the demo, DetCon-B 400 steps, same seed:
  step time 0.32 s at stride 32 vs 0.33-0.35 s at 16; linear probe over the
  random-init row +2.0 points at stride 32 vs +10.6 at 16; retrieval mIoU
  -0.004 vs +0.013. (Paper presets keep the standard stride 32.)
  """
  c = _family_config(method, family)
  c.steps = 400
  c.batch_size = 32
  c.image_size = 64
  c.model.update(depth=18, width=0.25, dtype="float32", stem_pool=False)
  c.head.update(hidden_dim=256, output_dim=64)
  c.optimizer.update(warmup_fraction=0.1, schedule="cosine", weight_decay=1e-6,
                     base_lr=DEMO_PEAK_LR * 256 / c.batch_size)
  c.ema.tau0 = 0.99
  c.data.update(records_dir="data/demo", shuffle_buffer=1024, build_demo=True)
  # Demo objects cover 34% of an image; the default MBD map > 0.2 matches them best
  # (IoU with the GT foreground on 150 train scenes: 0.72 at 0.2, 0.59 at 0.5).
  c.data.foreground_threshold = 0.2
  c.checkpoint.update(every_steps=100, keep=2)
  c.log_every_steps = 10
  c.eval.at_end = True
  return c


def parse_preset(method: str, arg: str | None) -> tuple[str, int | None]:
  """'demo' | 'imagenet' | 'coco', optionally '-EPOCHS' -> (name, epochs or None)."""
  name, _, epochs = (arg or "demo").partition("-")
  if (name == "demo" and not epochs) or (name in DATASETS and (not epochs or epochs.isdigit())):
    return name, int(epochs) if epochs else None
  raise ConfigError(f"Unknown preset {arg!r} for {method}; use demo, imagenet, coco, "
                    f"or imagenet-EPOCHS / coco-EPOCHS (e.g. configs/{method}.py:imagenet-300).")


def get_preset(method: str, family: str, arg: str | None) -> ml_collections.ConfigDict:
  """'demo' | 'imagenet' | 'coco', optionally '-EPOCHS' (e.g. 'imagenet-300')."""
  name, epochs = parse_preset(method, arg)
  if name == "demo":
    return demo_config(method, family)
  return paper_config(method, family, name, epochs)
