"""The supervised baseline (DetCon Fig. 4, red): the same ResNet trained on image labels.

One augmented view (config.data.augment 'supervised': random-resized crop +
flip) through the encoder, global average pooling, a linear classifier.
supervised.multilabel=False: softmax cross-entropy on batch['label'] (images
labelled -1 are left out); True: sigmoid cross-entropy on batch['labels'], the
multi-hot classes of the image's GT instances (config.data.multi_hot_labels;
the demo's scenes hold several objects, so its single 'largest object' label
is ill-posed). Same trainer, checkpoints and evaluations as every method; the
classifier is not part of the exported encoder.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.errors import ConfigError
from detcon_jax.models.resnet import encoder_from_config, normalize_images
from detcon_jax.objectives import common

CLASSIFIER = "classifier"


def one_view(config):
  return V.standard_views(config, masks=False)[:1]


def _classifier(config):
  return nn.Dense(int(config.supervised.num_classes), dtype=jnp.float32)


def init(rng, config, batch):
  encoder = encoder_from_config(config)
  k1, k2 = jax.random.split(rng)
  images = normalize_images(batch[B.VIEW1][:1])
  enc = encoder.init(k1, images, train=False)
  width = jax.eval_shape(lambda v: encoder.apply(v, images, train=False), enc)["stage4"].shape[-1]
  cls = _classifier(config).init(k2, jnp.zeros((1, width), jnp.float32))
  params = {common.ENCODER: enc["params"], CLASSIFIER: cls["params"]}
  return params, {common.BATCH_STATS: {common.ENCODER: enc["batch_stats"], CLASSIFIER: {}}}


def loss(params, state, batch, rng, step, config):
  del rng, step
  encoder = encoder_from_config(config)
  maps, updates = encoder.apply(
      {"params": params[common.ENCODER], "batch_stats": state[common.BATCH_STATS][common.ENCODER]},
      normalize_images(batch[B.VIEW1]), train=True, mutable=["batch_stats"])
  pooled = maps["stage4"].astype(jnp.float32).mean(axis=(1, 2))
  logits = _classifier(config).apply({"params": params[CLASSIFIER]}, pooled)
  if config.supervised.multilabel:
    targets = batch[B.LABELS].astype(jnp.float32)
    value = optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    metrics = {"exact_match": jnp.mean(jnp.all((logits > 0) == (targets > 0.5), -1))}
  else:
    labels = batch[B.LABEL]
    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    value = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
    metrics = {"top1": jnp.sum((jnp.argmax(logits, -1) == labels) * valid)
                       / jnp.maximum(valid.sum(), 1)}
  new_state = {common.BATCH_STATS: {common.ENCODER: updates["batch_stats"], CLASSIFIER: {}}}
  return value, (dict(metrics, loss=value), new_state)


def default_config():
  # num_classes: the records' classes (demo 12, ImageNet 1000); multilabel: sigmoid
  # cross-entropy on multi-hot 'labels' (needs config.data.multi_hot_labels=True).
  return {"supervised": {"num_classes": 1000, "multilabel": False}}


def validate(config):
  if int(config.supervised.num_classes) < 2:
    raise ConfigError(f"config.supervised.num_classes={config.supervised.num_classes}: the "
                      "classifier needs the records' class count (>= 2).")
  if config.supervised.multilabel and not config.data.get("multi_hot_labels", False):
    raise ConfigError("config.supervised.multilabel=True trains on multi-hot labels; set "
                      "--config.data.multi_hot_labels=True (records with GT instances).")
  common.no_multi_crop(config, "supervised")


OBJECTIVE = common.Objective("supervised", init, loss, views=one_view,
                             default_config=default_config, validate=validate)
