"""The supervised baseline: presets, the loss's known answers, multi-hot labels from the
records, and a few steps through the real trainer with its encoder loading back."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon_jax.core import validation
from configs import common, supervised as supervised_config
from data_pipelines import batch as B
from data_pipelines import build
from data_pipelines import input as data_input
from detcon_jax.objectives import registry, supervised
from detcon_jax.core import checkpointing
from detcon_jax.train import loop
from harness import small_config


def test_presets():
  demo = supervised_config.get_config("demo")
  assert demo.method == "supervised" and demo.supervised.multilabel
  assert demo.supervised.num_classes == 12 and demo.data.multi_hot_labels
  assert demo.data.augment == "supervised" and demo.optimizer.name == "sgd"
  validation.validate(demo)
  imagenet = supervised_config.get_config("imagenet")
  assert imagenet.supervised.num_classes == 1000 and not imagenet.supervised.multilabel
  assert imagenet.model.depth == 50 and imagenet.image_size == 224
  validation.validate(imagenet)
  with pytest.raises(common.ConfigError, match="supervised"):
    supervised_config.get_config("coco")
  demo.data.multi_hot_labels = False
  with pytest.raises(common.ConfigError, match="multi_hot_labels"):
    validation.validate(demo)


def _batch(config, multilabel):
  b = B.synthetic_train_batch(4, config.image_size, specs=supervised.one_view(config))
  b[B.LABELS] = np.eye(12, dtype=np.float32)[[0, 1, 2, 3]] + np.eye(12, dtype=np.float32)[5]
  b[B.LABEL] = np.array([0, 1, -1, 3], np.int32)
  return b


@pytest.mark.parametrize("multilabel", [True, False])
def test_loss_known_answer_with_zero_classifier(multilabel):
  """Zero classifier weights: logits 0, so sigmoid CE = log 2 and softmax CE = log 12."""
  config = small_config("supervised")
  config.supervised.multilabel = multilabel
  batch = _batch(config, multilabel)
  params, state = jax.jit(lambda r, b: supervised.init(r, config, b))(jax.random.PRNGKey(0),
                                                                      batch)
  assert params[supervised.CLASSIFIER]["kernel"].shape[-1] == 12
  params[supervised.CLASSIFIER] = jax.tree.map(jnp.zeros_like, params[supervised.CLASSIFIER])
  value, (metrics, new_state) = jax.jit(
      lambda p, s, b: supervised.loss(p, s, b, None, 0, config))(params, state, batch)
  assert float(value) == pytest.approx(np.log(2) if multilabel else np.log(12), rel=1e-5)
  assert metrics["loss"] == value and set(new_state) == {"batch_stats"}


def test_trains_through_the_trainer_and_encoder_loads_back(tmp_path):
  config = small_config("supervised")

  def batches(config, start_step, host_index, host_count):
    step = start_step
    while True:
      yield _batch(config, True) | B.synthetic_train_batch(
          4, config.image_size, seed=step, specs=supervised.one_view(config))
      step += 1

  config.batch_size = 4
  summary = loop.train(config, str(tmp_path), batches=batches)
  assert summary["status"] == "done"
  assert all(np.isfinite(v) for v in summary["losses"].values())
  loaded, model, variables = checkpointing.load_encoder(str(tmp_path))
  assert loaded.method == "supervised" and set(variables) == {"params", "batch_stats"}
  assert model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False)["stage4"].ndim == 4
  assert "supervised" in registry.OBJECTIVES


def test_train_iterator_multi_hot_labels(tmp_path):
  rng = np.random.default_rng(0)
  examples = []
  for classes in ([0, 2], [1], [2, 2]):
    inst = np.zeros((32, 32), np.int32)
    for k in range(len(classes)):
      inst[k * 8:(k + 1) * 8] = k + 1
    examples.append(dict(image=rng.integers(0, 255, (32, 32, 3), np.uint8), label=classes[0],
                         instances=inst, classes=classes, masks={"gt": inst}))
  build.write_records(str(tmp_path), {"train": examples}, num_classes=3,
                      class_names=["a", "b", "c"])
  config = supervised_config.get_config("demo")
  config.image_size = 32
  it = data_input.train_iterator(str(tmp_path), batch_size=3, views=supervised.one_view(config),
                                 shuffle_window=1, multi_hot=True)
  batch = next(iter(it))
  by_index = dict(zip(batch[B.INDEX].tolist(), batch[B.LABELS].tolist()))
  assert by_index == {0: [1, 0, 1], 1: [0, 1, 0], 2: [0, 0, 1]}
