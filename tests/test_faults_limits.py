"""A user's mistake must not cost the machine (issue 20, part 4): sizes and counts are
validated before anything is allocated -- every size/count key > 0, the image size and
batch against the records, and a rough memory estimate against the memory there is.
Each refusal names the key in one `error:` line (exit status 1, no traceback)."""
import sys

import pytest

from detcon_jax.core import validation
from data_pipelines import records
from detcon_jax.errors import ConfigError
from detcon_jax.train import loop
from harness import TinyObjective, run_build, image_folder, refused, tiny_config

TRAIN = [sys.executable, "-m", "detcon_jax.train", "--config=configs/detcon_b.py:demo"]


# --- memory ----------------------------------------------------------------------------

def test_a_huge_image_size_is_refused_before_anything_is_allocated(tmp_path):
  """Was: 165 s later the OOM killer at 22 GB RSS, exit 137, a stale lock."""
  line = refused(TRAIN + [f"--workdir={tmp_path / 'run'}", "--config.image_size=16384"],
                 "config.image_size=16384")
  assert "GiB of host memory" in line and "more than the" in line and "available" in line
  assert not (tmp_path / "run").exists()      # no lock, no workdir, no demo build


def test_the_activation_estimate_counts_every_conv_output():
  # ResNet-50 at 224 px: stem 112^2*64 + stages 56^2*3*384 + 28^2*4*768 + 14^2*6*1536
  # + 7^2*3*3072 = 9,081,856 conv outputs, x3 (conv, batch norm, ReLU).
  assert validation.activation_floats(224, 50, 1.0, True) == 3 * 9_081_856
  # No stem pool: stages at twice the side; width scales channels.
  assert validation.activation_floats(64, 18, 0.5, False) == 3 * int(
      32 * 32 * 32 + 2 * 32 * 32 * 64 + 2 * 16 * 16 * 128 + 2 * 8 * 8 * 256 + 2 * 4 * 4 * 512)


def test_check_memory_compares_the_estimate_with_the_limit():
  config = tiny_config(**{"image_size": 64, "batch_size": 32})
  specs = TinyObjective().views(config)
  est = validation.memory_estimate(config, specs)
  images = 2 * 32 * 64 * 64 * 3 * 4                         # two float32 views
  assert est["input"] >= validation.BATCHES_IN_FLIGHT * images
  assert est["activations"] == 32 * 2 * 4 * validation.activation_floats(64, 18, 0.25, False)
  total = est["input"] + est["activations"]
  validation.check_memory(config, specs, available=total + 1)   # fits
  with pytest.raises(ConfigError, match=r"config.image_size=64, config.batch_size=32: .*"
                     r"more than the [0-9.]+ GiB available"):
    validation.check_memory(config, specs, available=total - 1)
  # On an accelerator the activations are on the device (XLA's own error there): the
  # host holds the input batches only.
  validation.check_memory(config, specs, platform="gpu", available=est["input"] + 1)
  with pytest.raises(ConfigError, match=r"input batches"):
    validation.check_memory(config, specs, platform="gpu", available=est["input"] - 1)
  avail = validation.available_memory()
  assert avail is None or avail > 0


# --- sizes and counts --------------------------------------------------------------------

@pytest.mark.slow   # the CLI form of the data.shuffle_buffer cases below (~20 s start-up)
def test_a_shuffle_buffer_of_minus_one_is_refused_not_stalled(tmp_path):
  """Was: the input stalled until the 300 s data timeout."""
  line = refused(TRAIN + [f"--workdir={tmp_path / 'run'}", "--config.data.shuffle_buffer=-1"],
                 "config.data.shuffle_buffer=-1")
  assert "must be > 0" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value", [
    ("data.shuffle_buffer", 0), ("data.shuffle_buffer", -1), ("head.hidden_dim", 0),
    ("head.output_dim", -8), ("model.depth", 20), ("eval.every_steps", -1),
    ("batch_size", 0), ("image_size", 0), ("steps", 0), ("loss.num_masks", 0),
    ("checkpoint.keep", 0), ("log_every_steps", 0), ("data.timeout_s", -1.0),
    ("views.small_size", 0)])
def test_every_size_and_count_key_must_be_positive(key, value):
  overrides = {key: value}
  if key == "views.small_size":
    overrides["views.small_crops"] = 2
  config = tiny_config(**overrides)
  with pytest.raises(ConfigError, match=rf"^config\.{key}={value}: "):
    validation.validate(config, objective=TinyObjective())


# --- against the records -------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_records(tmp_path_factory):
  """3 train images stored at shorter side 32 px (a folder source)."""
  tmp = tmp_path_factory.mktemp("limits")
  run_build(image_folder(tmp / "photos"), tmp / "rec")
  return tmp / "rec"


def test_views_larger_than_the_stored_images_are_refused(small_records, tmp_path):
  config = tiny_config(**{"image_size": 64, "batch_size": 2,
                          "data.records_dir": str(small_records),
                          "data.mask_source": "grid"})
  with pytest.raises(ConfigError, match=r"^config.image_size=64: larger than the records' "
                     r"images in .* \(shorter side 32 px\)"):
    loop.train(config, str(tmp_path / "run"), objective=TinyObjective())
  assert not (tmp_path / "run" / "config.json").exists()
  manifest = records.read_manifest(str(small_records))
  validation.validate_records(tiny_config(batch_size=2), manifest)   # 32 px views fit
  small = tiny_config(**{"batch_size": 2, "views.small_crops": 2, "views.small_size": 48})
  with pytest.raises(ConfigError, match=r"^config.views.small_size=48"):
    validation.validate_records(small, manifest)


def test_a_batch_larger_than_the_train_split_is_refused(small_records, tmp_path):
  config = tiny_config(**{"batch_size": 8, "data.records_dir": str(small_records),
                          "data.mask_source": "grid"})
  with pytest.raises(ConfigError, match=r"^config.batch_size=8: larger than the 3 train images"):
    loop.train(config, str(tmp_path / "run"), objective=TinyObjective())
  assert not (tmp_path / "run" / "config.json").exists()
