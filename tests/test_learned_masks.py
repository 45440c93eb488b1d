"""Learned masks (detcon_jax/evaluate/learned_masks.py): K-means segments of dense
features, and the offline round that adds them to records as the `learned` field."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import demo
from data_pipelines import input as input_lib
from data_pipelines import records
from data_pipelines import views as views_lib
from detcon_jax.evaluate import learned_masks as LM
from detcon_jax.evaluate import mask_quality
from harness import ROOT

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def test_relabel_and_nearest_upsampling():
  ids = jnp.asarray([[[0, 5], [5, 9]], [[3, 3], [3, 3]]])
  np.testing.assert_array_equal(np.asarray(LM.relabel(ids, 16)),
                                [[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
  # Four distinct features on a 2x2 grid -> four 4x4 quadrants of an 8x8 image, ids 0..3.
  features = jnp.eye(4).reshape(1, 2, 2, 4)
  masks = LM.learned_masks(lambda images: features, np.zeros((1, 8, 8, 3)),
                           jax.random.PRNGKey(0), k=4, position_weight=0.0)
  assert masks.dtype == jnp.int32 and masks.shape == (1, 8, 8)
  quadrants = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, 0), 4, 1)
  assert mask_quality.average_best_overlap(quadrants[None], np.asarray(masks))["abo"] == 1.0
  assert sorted(np.unique(masks).tolist()) == [0, 1, 2, 3]


def test_colour_term_separates_what_features_do_not():
  """Equal features everywhere; the colour term alone splits a red from a blue half."""
  images = np.zeros((1, 8, 8, 3), np.float32)
  images[0, :, :4, 0], images[0, :, 4:, 2] = 1.0, 1.0
  flat = lambda x: jnp.ones((1, 4, 4, 8))
  halves = (np.arange(8)[None, :] >= 4).repeat(8, 0)[None].astype(np.int32)
  plain = LM.learned_masks(flat, images, jax.random.PRNGKey(0), k=2, position_weight=0.0)
  assert len(np.unique(plain)) == 1
  coloured = LM.learned_masks(flat, images, jax.random.PRNGKey(0), k=2, position_weight=0.0,
                              colour_weight=1.0)
  assert mask_quality.average_best_overlap(halves + 1, np.asarray(coloured))["abo"] == 1.0


def test_one_hot_gt_features_give_gt_masks():
  """A stand-in encoder whose dense features are a one-hot copy of the GT instance map
  (background included) gives masks with ABO > 0.95 with K=16 and no position term:
  the K-means clusters are the instances (extra centroids stay empty)."""
  scenes = [demo.example("train", i, size=48) for i in range(8)]
  images = np.stack([s["image"] for s in scenes]).astype(np.float32) / 255
  instances = np.stack([s["instances"] for s in scenes])
  stand_in = lambda x: jax.nn.one_hot(jnp.asarray(instances), int(instances.max()) + 1)
  masks = np.asarray(LM.learned_masks(stand_in, images, jax.random.PRNGKey(0), k=LM.K,
                                      position_weight=0.0))
  quality = mask_quality.average_best_overlap(instances, masks)
  assert quality["num_instances"] >= 8 and quality["abo"] > 0.95, quality
  # With the position term every cluster is used: K segments per image, compact ones.
  spread = np.asarray(LM.learned_masks(stand_in, images, jax.random.PRNGKey(0), k=LM.K))
  assert all(len(np.unique(m)) == LM.K for m in spread)
