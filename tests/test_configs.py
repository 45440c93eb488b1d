"""Every preset loads and validates; impossible settings fail naming key and fix."""
import importlib

import pytest

from detcon_jax.core import validation
from configs import common
from detcon_jax.core.optimizer import warmup_steps

METHODS = ("simclr", "byol", "detcon_s", "detcon_b")
PRESETS = ("demo", "imagenet", "imagenet-300", "coco", "coco-324")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_validates(method, preset):
  config = importlib.import_module(f"configs.{method}").get_config(preset)
  validation.validate(config)
  assert config.method == method
  if preset != "demo":   # paper settings
    validation.validate(config, device_count=128, process_count=32)   # 128 TPU v3 workers
    assert (config.batch_size, config.image_size, config.model.depth) == (4096, 224, 50)


def test_paper_numbers():
  b = importlib.import_module("configs.detcon_b")
  long_run, short_run = b.get_config("imagenet"), b.get_config("imagenet-300")
  assert long_run.steps == 1000 * 1_281_167 // 4096 == 312_784
  assert warmup_steps(long_run.optimizer, long_run.steps) == 3127
  assert (long_run.optimizer.base_lr, long_run.optimizer.weight_decay, long_run.ema.tau0) == (
      0.2, 1.5e-6, 0.996)
  assert short_run.steps == 93_835
  assert warmup_steps(short_run.optimizer, short_run.steps) == 3127
  assert (short_run.optimizer.base_lr, short_run.optimizer.weight_decay, short_run.ema.tau0) == (
      0.3, 1e-6, 0.99)
  assert (long_run.head.hidden_dim, long_run.head.output_dim) == (4096, 256)
  s = importlib.import_module("configs.detcon_s").get_config("coco")
  assert s.optimizer.schedule == "piecewise" and s.steps == 1296 * 118_287 // 4096 == 37_426
  assert (s.optimizer.base_lr, s.optimizer.weight_decay) == (0.3, 1e-6)
  assert (s.head.hidden_dim, s.head.output_dim, s.loss.temperature) == (2048, 128, 0.1)
  assert s.data.augment == "simclr" and long_run.data.augment == "byol"


@pytest.mark.parametrize("method", METHODS + ("moco_v2", "swav"))
def test_overriding_steps_alone_keeps_every_preset_valid(method):
  """Warmups are fractions of the run: --config.steps=N works for any N >= 1, and the
  presets' own warmups are what 10 epochs (demo: 40 of 400 steps) always gave."""
  module = importlib.import_module(f"configs.{method}")
  for preset in PRESETS:
    config = module.get_config(preset)
    if method != "moco_v2":        # MoCo v2 has no warmup
      want = 40 if preset == "demo" else common.steps_for_epochs(
          common.WARMUP_EPOCHS, common.DATASETS[preset.partition("-")[0]]["images"],
          config.batch_size)
      assert warmup_steps(config.optimizer, config.steps) == want, preset
    for steps in (1, 2, 12, 39):
      config.steps = steps
      validation.validate(config)
      assert 0 <= warmup_steps(config.optimizer, steps) < steps
  config = module.get_config("demo")
  config.steps, config.optimizer.warmup_steps = 12, 12      # explicit: still an error
  with pytest.raises(common.ConfigError, match="config.optimizer.warmup_steps=12"):
    validation.validate(config)


def test_unknown_preset_lists_the_choices():
  with pytest.raises(common.ConfigError, match="demo, bench, imagenet, coco"):
    importlib.import_module("configs.simclr").get_config("cifar")


ALL_METHODS = METHODS + ("moco_v2", "swav", "maskco", "cast", "supervised")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bench_is_the_demo_trained_longer(method):
  module = importlib.import_module(f"configs.{method}")
  demo, bench = module.get_config("demo"), module.get_config("bench")
  validation.validate(bench)
  assert bench.steps == common.BENCH_STEPS == 5 * demo.steps
  d, b = demo.to_dict(), bench.to_dict()
  for c in (d, b):
    del c["steps"], c["checkpoint"]["every_steps"]
  assert b == d
  mc = importlib.import_module("configs.moco_v2").get_config("bench+cc+knn")
  assert mc.steps == common.BENCH_STEPS and mc.views.constrained and mc.loss.knn_weight == 0.4


def _run_length_constants(config):
  """Every quantity of a run that depends on its length, resolved as the trainer does."""
  from detcon_jax.objectives import byol, moco, swav
  out = {"warmup": warmup_steps(config.optimizer, config.steps)}
  if "knn_start_fraction" in config.loss:
    out["knn_start"] = moco.knn_start_step(config)
  if "swav" in config:
    out["prototype_freeze"] = swav.freeze_steps(config)
  if "ema" in config:
    out["tau"] = [round(float(byol.target_decay(f * config.steps, config)), 6) for f in (0.25, 0.5)]
  return out


@pytest.mark.parametrize("method", ALL_METHODS)
def test_run_length_constants_scale_with_steps(method):
  """The bench preset (5 x the demo's steps) and --config.steps=N scale every
  length-dependent constant with the run: warmup, kNN-MoCo's start, SwAV's freeze,
  BYOL's tau schedule (key momenta are per-step constants, as the papers')."""
  module = importlib.import_module(f"configs.{method}")
  demo = module.get_config("demo")
  want = {k: v if k == "tau" else 5 * v for k, v in _run_length_constants(demo).items()}
  longer = module.get_config("demo")
  longer.steps = 5 * demo.steps                   # --config.steps=2000 on the demo
  assert _run_length_constants(module.get_config("bench")) == _run_length_constants(longer) == want
  if method == "swav":
    assert _run_length_constants(demo)["prototype_freeze"] == demo.steps   # the whole run


def _demo():
  return importlib.import_module("configs.detcon_b").get_config("demo")


@pytest.mark.parametrize("key,value,words", [
    ("method", "moco", ["config.method", "detcon_b", "simclr"]),
    ("steps", 0, ["config.steps", "> 0"]),
    ("optimizer.warmup_steps", 400, ["config.optimizer.warmup_steps", "steps=400"]),
    ("image_size", 65, ["config.image_size", "multiple", "16", "64"]),   # demo: stride 16
    ("optimizer.schedule", "step", ["config.optimizer.schedule", "cosine"]),
    ("model.dtype", "float16", ["config.model.dtype", "bfloat16"]),
    ("data.augment", "autoaug", ["config.data.augment", "byol"]),
    ("ema.tau0", 1.5, ["config.ema.tau0"]),
    ("optimizer.warmup_fraction", 1.0, ["config.optimizer.warmup_fraction", "[0, 1)"]),
    ("data.timeout_s", 0, ["config.data.timeout_s"]),
    ("data.max_corrupt_fraction", 1.5, ["config.data.max_corrupt_fraction"]),
    ("data.foreground_threshold", 1.5, ["config.data.foreground_threshold", "[0, 1]"]),
    ("loss.num_masks", 0, ["config.loss.num_masks"]),
    ("loss.detcon_form", "paper", ["config.loss.detcon_form", "reference", "dedup"]),
])
def test_invalid_values_name_key_and_fix(key, value, words):
  config = _demo()
  config.steps = 400
  *path, leaf = key.split(".")
  node = config
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(common.ConfigError) as e:
    validation.validate(config)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_image_size_follows_the_model_stride():
  config = _demo()
  config.model.stem_pool, config.image_size = False, 48      # stride 16: 48 is fine
  validation.validate(config)
  config.model.stem_pool = True
  with pytest.raises(common.ConfigError, match="stride 32"):
    validation.validate(config)


def test_batch_must_split_over_devices_and_hosts():
  config = _demo()
  config.batch_size = 36
  with pytest.raises(common.ConfigError, match=r"device count 8.*batch_size=40"):
    validation.validate(config, device_count=8, process_count=1)
  with pytest.raises(common.ConfigError, match="host count 8"):
    validation.validate(config, device_count=32, process_count=8)
  config.batch_size = 32
  validation.validate(config, device_count=8, process_count=2)
