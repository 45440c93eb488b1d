"""Shared config defaults, paper dataset sizes and the presets.

Every method config starts from `base_config()` and overrides what differs.
Configs sit above the library: nothing in detcon_jax/, data_pipelines/ or
launch/ imports them. Their checks (`validate`, the memory estimate) live in
detcon_jax/core/validation.py, which the trainer calls with the device and host
counts it sees.
"""
from __future__ import annotations

import functools

import ml_collections

from detcon_jax.errors import ConfigError  # noqa: F401  (configs.common.ConfigError, as before)

# Dataset sizes used to turn epochs into steps (documented in the presets).
IMAGENET_TRAIN_IMAGES = 1_281_167   # ILSVRC-2012 train
COCO_TRAIN_IMAGES = 118_287         # COCO train2017


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
  # num_masks: mask ids sampled per view with masks (DetCon's K; the paper samples 16).
  c.loss = ml_collections.ConfigDict(dict(temperature=0.1, local_negatives=False,
                                          num_masks=16))
  # Warmup: warmup_fraction of config.steps, so that any --config.steps works; an
  # explicit warmup_steps overrides it (optimizer.warmup_steps(): the resolved value).
  c.optimizer = ml_collections.ConfigDict(dict(
      name="lars", base_lr=0.3, weight_decay=1e-6, momentum=0.9, eta=1e-3,
      warmup_steps=ml_collections.config_dict.placeholder(int), warmup_fraction=0.1,
      schedule="cosine", exclude_1d=True))  # exclude_1d: no decay on biases and BN
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
  # Background augmentations (data_pipelines/background_augment.py; Ryali et al. 2021): mode
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
  # crop (counted: TensorBoard data/crop_fallbacks).
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
  raise ConfigError(f"Unknown preset {arg!r} for {method}; use demo, bench, imagenet, coco, "
                    f"or imagenet-EPOCHS / coco-EPOCHS (e.g. configs/{method}.py:imagenet-300).")


# The bench preset (issue 19): the demo trained 5x longer (2000 steps = 25 passes over
# the demo's 2500 train images) so that every method's pretext loss falls clearly below
# chance, in about 10-20 minutes on 2 cores. Everything in a demo preset that depends on
# the run's length is a fraction of config.steps (warmup, kNN-MoCo's start, SwAV's
# prototype freeze, BYOL's tau schedule), so it scales with it, here and under any
# --config.steps. Key momenta stay per-step constants, as in the papers (configs/moco_v2.py).
BENCH_STEPS = 2000


def with_bench(get_config):
  """Adds the 'bench' preset (and 'bench+MODIFIERS') to a config's get_config: its demo
  preset with config.steps = BENCH_STEPS."""

  @functools.wraps(get_config)
  def get(arg: str | None = None):
    base, plus, modifiers = (arg or "demo").partition("+")
    if base != "bench":
      return get_config(arg)
    c = get_config("demo" + plus + modifiers)
    c.steps = BENCH_STEPS
    c.checkpoint.every_steps = BENCH_STEPS // 4
    return c

  return get


def get_preset(method: str, family: str, arg: str | None) -> ml_collections.ConfigDict:
  """'demo' | 'imagenet' | 'coco', optionally '-EPOCHS' (e.g. 'imagenet-300')."""
  name, epochs = parse_preset(method, arg)
  if name == "demo":
    return demo_config(method, family)
  return paper_config(method, family, name, epochs)
