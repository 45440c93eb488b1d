"""Online masks (config.data.mask_source='online'): DetCon-B's masks from its own target.

Odin's idea (Henaff et al. 2022) on DetCon-B, the step after DetCon's "virtuous
crescendo" (its closing section): at every step, inside the jitted loss, the
stop-gradient EMA target network's final feature maps of both views (the target
forward DetCon-B runs anyway) are clustered per image, and the cluster ids replace
the records' masks for mask pooling and the DetCon loss. No FH/MCG precompute is
needed once training starts (the input pipeline reads no mask field unless
warm_start_steps > 0).

Correspondence: K-means (models/kmeans.py, a fixed number of Lloyd iterations,
static shapes) clusters the unit feature vectors of VIEW 1 per image; VIEW 2's
feature vectors are assigned to view 1's centroids, so the same centroid is the same
mask id in both views. This needs no crop-geometry bookkeeping and works with any
augmentation (crops, flips, colour, background swaps), since the match is made in
feature space. The alternative, clustering the unaugmented image and mapping the ids
through the keyed crop ops, needs a third encoder pass and the crop parameters in
the step; it is left. With position_weight > 0 the cells' (row, col) in the view
join the clustering of view 1 (compact segments), but view 2 is assigned on the
feature part of the centroids only: its positions are in another crop's frame.

Masks absent from a view are handled as the input pipeline handles FH masks
(data_pipelines/input.py sample_mask_ids): config.loss.num_masks ids are drawn
uniformly with replacement among the clusters present in BOTH views (the same draw
for both), or, for an image whose views share none, each view draws among its own;
detcon_nce treats duplicates as it does FH's.

Everything is per image (vmap), so under the device Mesh the K-means of a batch
sharded on 'data' needs no communication; the random keys come from the step's rng
(one per image of the global batch), so 1 and 8 devices give the same ids.

config.online_masks (defaults: a first choice, not tuned):
  k                  clusters per image (8: half the cells of the demo's 4x4 map of
                     a 64 px view at stride 16; the paper presets' 7x7 map may take more)
  iterations         Lloyd iterations per step (10, as the offline learned masks)
  position_weight    weight of the (row, col) in [0, 1] appended to view 1's unit
                     features (0: appearance only)
  init               K-means seeding: 'kmeans++' or 'farthest' (kmeans.INITS)
  warm_start_steps   N > 0: the records' masks (warm_start_source, 'fh') for steps < N,
                     online after (both computed, a jnp.where on the step)
preview(config, specs): the online ids of a batch under a train state's target, for the
trainer's TensorBoard panel (train/loop.py: at every checkpoint, on the first batch).
Metrics: online_masks/segments_per_view (clusters non-empty in a view, mean over
images and both views) and online_masks/shared_segments (present in both views).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.errors import ConfigError
from detcon_jax.models import kmeans
from detcon_jax.objectives import common

ONLINE = "online"                    # the config.data.mask_source value
CONFIG = {"online_masks": {"k": 8, "iterations": kmeans.ITERATIONS, "position_weight": 0.0,
                           "init": "kmeans++", "warm_start_steps": 0,
                           "warm_start_source": "fh"}}


def enabled(config) -> bool:
  return config.data.get("mask_source", "fh") == ONLINE


def records_mask_source(config) -> str:
  """The mask source the input pipeline reads: config.data.mask_source, or with online
  masks the warm start's (read only when warm_start_steps > 0: masked_views)."""
  if enabled(config):
    return config.online_masks.get("warm_start_source", "fh")
  return config.data.mask_source


def records_mask_key(config) -> str:
  """The config key that sets records_mask_source (named when the records lack it)."""
  return ("config.online_masks.warm_start_source" if enabled(config)
          else "config.data.mask_source")


def masked_views(config):
  """DetCon's views: masks from the records, except online without a warm start."""
  warm = enabled(config) and int(config.online_masks.get("warm_start_steps", 0)) > 0
  return V.standard_views(config, masks=not enabled(config) or warm)


def check(config):
  """ConfigError for online_masks settings that cannot run."""
  if not enabled(config):
    return
  o = config.get("online_masks", None)
  if o is None:
    raise ConfigError("config.data.mask_source='online' needs config.online_masks; start "
                      "from configs/detcon_b.py (--config=configs/detcon_b.py:demo).")
  for key in ("k", "iterations", "warm_start_steps"):
    if int(o[key]) < (1 if key == "k" else 0):
      raise ConfigError(f"config.online_masks.{key}={o[key]!r}: must be "
                        + ("at least 1." if key == "k" else ">= 0."))
  if o.init not in kmeans.INITS:
    raise ConfigError(f"config.online_masks.init={o.init!r}: choose one of "
                      f"{sorted(kmeans.INITS)}.")
  if float(o.position_weight) < 0:
    raise ConfigError(f"config.online_masks.position_weight={o.position_weight!r}: must be "
                      ">= 0 (0: appearance only).")


def cluster_views(maps1, maps2, key, *, k: int, iterations: int = kmeans.ITERATIONS,
                  position_weight: float = 0.0, init: str = "kmeans++"):
  """Cluster ids int32 [B, h, w] of both views from their feature maps [B, h, w, C]:
  K-means on view 1 per image (one key each, split from `key`), view 2 assigned to view
  1's centroids (feature part). Ids are the cluster index in [0, k); a cluster may be
  empty in either view."""
  b, h, w, c = maps1.shape
  points1 = kmeans.feature_points(maps1, position_weight)
  points2 = kmeans.feature_points(maps2)[..., :c]
  keys = jax.random.split(key, b)
  ids1, centroids = jax.vmap(lambda kk, p: kmeans.kmeans(kk, p, k, iterations, init))(keys,
                                                                                    points1)
  ids2 = jax.vmap(kmeans.assign)(points2, centroids[..., :c])
  return ids1.reshape(b, h, w), ids2.reshape(maps2.shape[:3])


def present(ids, k: int):
  """bool [B, k]: cluster c has a cell in the image's id map [B, ...]."""
  flat = ids.reshape(ids.shape[0], -1)
  return jnp.zeros((flat.shape[0], k), bool).at[jnp.arange(flat.shape[0])[:, None], flat].set(
      True)


def sample_ids(key, present1, present2, num: int):
  """[B, num] ids per view, drawn as input.sample_mask_ids draws FH's: uniformly with
  replacement among the clusters present in both views (one draw for both), else per
  view among its own."""
  k1, k2, k3 = jax.random.split(key, 3)
  shared = present1 & present2
  draw = lambda kk, p: jax.random.categorical(kk, jnp.where(p, 0.0, -jnp.inf)[:, None, :],
                                              shape=(p.shape[0], num)).astype(jnp.int32)
  has = jnp.any(shared, axis=-1, keepdims=True)
  m1 = jnp.where(has, draw(k1, shared), draw(k2, present1))
  m2 = jnp.where(has, m1, draw(k3, present2))
  return m1, m2


def _full_size(ids, shape):
  """Nearest upsampling of [B, h, w] ids to [B, H, W] (H, W multiples of h, w)."""
  return jnp.repeat(jnp.repeat(ids, shape[1] // ids.shape[1], 1), shape[2] // ids.shape[2], 2)


def replace_masks(target_maps, batch, rng, step, config):
  """bootstrap's `masks` hook: (batch with online masks, metrics). target_maps: the
  stop-gradient target's {view: [B, h, w, C]}. Off (batch unchanged) unless
  config.data.mask_source == 'online'."""
  if not enabled(config):
    return batch, {}
  o = config.online_masks
  k = int(o.k)
  ids1, ids2 = cluster_views(jax.lax.stop_gradient(target_maps[B.VIEW1]),
                             jax.lax.stop_gradient(target_maps[B.VIEW2]),
                             jax.random.fold_in(rng, 0), k=k, iterations=int(o.iterations),
                             position_weight=float(o.position_weight), init=o.init)
  p1, p2 = present(ids1, k), present(ids2, k)
  m1, m2 = sample_ids(jax.random.fold_in(rng, 1), p1, p2, int(config.loss.num_masks))
  new = {B.MASKS1: ids1, B.MASKS2: ids2, B.MASK_IDS1: m1, B.MASK_IDS2: m2}
  warm = int(o.get("warm_start_steps", 0))
  if warm > 0:      # the records' masks before step `warm`: both computed, one kept
    new[B.MASKS1] = _full_size(ids1, batch[B.MASKS1].shape)
    new[B.MASKS2] = _full_size(ids2, batch[B.MASKS2].shape)
    new = {name: jnp.where(step < warm, batch[name], v) for name, v in new.items()}
  segments = (jnp.mean(jnp.sum(p1, -1)) + jnp.mean(jnp.sum(p2, -1))) / 2
  metrics = {"online_masks/segments_per_view": segments,
             "online_masks/shared_segments": jnp.mean(jnp.sum(p1 & p2, -1))}
  return dict(batch, **new), metrics


def preview(config, specs, images: int = 4):
  """None unless online masks; else a function (train state's `state`, global batch) ->
  {view1/masks, view2/masks} int32 [images, H, W] for jax.jit: the online ids of the
  batch's first images under that state's target (fixed K-means key), upsampled to the
  views."""
  if not enabled(config):
    return None
  nets = common.build_networks(config, True)

  def ids(state, batch):
    maps, _ = common.encode(nets, state[common.TARGET], state[common.BATCH_STATS], batch, specs)
    o = config.online_masks
    ids1, ids2 = cluster_views(maps[B.VIEW1], maps[B.VIEW2], jax.random.PRNGKey(0), k=int(o.k),
                               iterations=int(o.iterations),
                               position_weight=float(o.position_weight), init=o.init)
    return {B.MASKS1: _full_size(ids1[:images], batch[B.VIEW1][:images].shape[:3]),
            B.MASKS2: _full_size(ids2[:images], batch[B.VIEW2][:images].shape[:3])}

  return ids
