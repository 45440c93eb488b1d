"""K-means in JAX: Lloyd iterations with static shapes, jit-able and vmap-able.

Learned masks (evaluate/learned_masks.py) cluster every image's dense features
into K segments, on the accelerator beside the encoder; scikit-learn would move
the features to the host and loop over images. `lloyd` runs a fixed number of
iterations (no early stop: shapes and trip count stay static), which equals
scikit-learn's KMeans(init=centroids, n_init=1, algorithm='lloyd', max_iter=n,
tol=0): once the assignment stops changing, further iterations are a fixed
point, and the returned assignment is the one to the returned centroids (as
scikit-learn's final E-step).

One difference: an empty cluster keeps its previous centroid (scikit-learn
relocates it to a far point), so the number of non-empty clusters can fall
below K. Callers that need consecutive ids relabel (learned_masks.relabel).

Initial centroids come from the caller or from `init_centroids`: 'kmeans++'
(D^2 sampling, one candidate per step; scikit-learn's greedy variant tries
several) or 'farthest' (the first point drawn at random, then each next centroid
the point farthest from those chosen: deterministic given the key).
`batched_kmeans` vmaps both over images [B, N, D].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ITERATIONS = 10
HIGHEST = jax.lax.Precision.HIGHEST   # TPU matmuls default to bf16 passes: keep f32 distances


def grid_positions(h: int, w: int) -> np.ndarray:
  """[h, w, 2] cell centres (row, col) in [0, 1]."""
  rows, cols = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
  return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).astype(np.float32)


def feature_points(features: jax.Array, position_weight: float = 0.0) -> jax.Array:
  """Dense features [B, h, w, C] -> K-means points [B, h*w, C+2]: the unit feature vector
  of each cell ++ position_weight * its (row, col) in [0, 1] (learned and online masks)."""
  b, h, w, _ = features.shape
  x = features.astype(jnp.float32)
  unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  position = jnp.broadcast_to(position_weight * grid_positions(h, w), (b, h, w, 2))
  return jnp.concatenate([unit, position], -1).reshape(b, h * w, -1)


def sq_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """[N, K] squared Euclidean distances, as |x|^2 - 2 x.c + |c|^2 (one matmul)."""
  d = (jnp.sum(points ** 2, -1)[:, None] - 2 * jnp.matmul(points, centroids.T, precision=HIGHEST)
       + jnp.sum(centroids ** 2, -1)[None, :])
  return jnp.maximum(d, 0.0)


def assign(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index [N] of each point's nearest centroid (ties: the lowest index)."""
  return jnp.argmin(sq_distances(points, centroids), axis=-1).astype(jnp.int32)


def update(points: jax.Array, assignment: jax.Array, centroids: jax.Array) -> jax.Array:
  """Mean of each cluster's points; an empty cluster keeps its centroid."""
  one_hot = jax.nn.one_hot(assignment, centroids.shape[0], dtype=points.dtype)   # [N, K]
  sums = jnp.matmul(one_hot.T, points, precision=HIGHEST)
  counts = one_hot.sum(0)[:, None]
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), centroids)


@functools.partial(jax.jit, static_argnames=("iterations",))
def lloyd(points: jax.Array, centroids: jax.Array, iterations: int = ITERATIONS):
  """`iterations` Lloyd steps from `centroids` on points [N, D] -> (assignment [N] int32,
  centroids [K, D]); the assignment is to the returned centroids."""
  points = points.astype(jnp.float32)

  def step(_, c):
    return update(points, assign(points, c), c)

  centroids = jax.lax.fori_loop(0, iterations, step, centroids.astype(jnp.float32))
  return assign(points, centroids), centroids


def _kmeans_pp(key, points, k):
  """D^2 sampling: each next centroid a point drawn with probability ~ its squared distance
  to the nearest chosen one (k-means++, one candidate per step); uniform once every point
  is a centroid (fewer distinct points than k). The key use is retrieval's, unchanged."""
  key, sub = jax.random.split(key)
  first = jax.random.randint(sub, (), 0, points.shape[0])
  centroids = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(points[first])
  nearest = jnp.sum((points - points[first]) ** 2, -1)

  def step(i, carry):
    centroids, nearest, key = carry
    key, sub = jax.random.split(key)
    logits = jnp.where(nearest.sum() > 0, jnp.log(nearest), jnp.zeros_like(nearest))
    pick = jax.random.categorical(sub, logits)
    nearest = jnp.minimum(nearest, jnp.sum((points - points[pick]) ** 2, -1))
    return centroids.at[i].set(points[pick]), nearest, key

  centroids, _, _ = jax.lax.fori_loop(1, k, step, (centroids, nearest, key))
  return centroids


def _farthest(key, points, k):
  """Farthest-point: a random first point, then the point farthest from those chosen."""
  n = points.shape[0]
  idx = jnp.zeros((k,), jnp.int32).at[0].set(jax.random.randint(key, (), 0, n))
  nearest = jnp.sum((points - points[idx[0]]) ** 2, -1)

  def step(i, carry):
    idx, nearest = carry
    pick = jnp.argmax(nearest).astype(jnp.int32)
    nearest = jnp.minimum(nearest, jnp.sum((points - points[pick]) ** 2, -1))
    return idx.at[i].set(pick), nearest

  idx, _ = jax.lax.fori_loop(1, k, step, (idx, nearest))
  return points[idx]


INITS = {"kmeans++": _kmeans_pp, "farthest": _farthest}


@functools.partial(jax.jit, static_argnames=("k", "init"))
def init_centroids(key: jax.Array, points: jax.Array, k: int, init: str = "kmeans++"):
  """[k, D] initial centroids chosen among points [N, D] by INITS[init]."""
  if init not in INITS:
    raise ValueError(f"Unknown K-means init {init!r}; choose from {sorted(INITS)}.")
  return INITS[init](key, points.astype(jnp.float32), k)


@functools.partial(jax.jit, static_argnames=("k", "iterations", "init"))
def kmeans(key: jax.Array, points: jax.Array, k: int, iterations: int = ITERATIONS,
           init: str = "kmeans++"):
  """init_centroids + lloyd on points [N, D] -> (assignment [N], centroids [k, D])."""
  return lloyd(points, init_centroids(key, points, k, init), iterations)


@functools.partial(jax.jit, static_argnames=("k", "iterations", "init"))
def batched_kmeans(key: jax.Array, points: jax.Array, k: int, iterations: int = ITERATIONS,
                   init: str = "kmeans++"):
  """kmeans per image of points [B, N, D], one key each (split from `key`) ->
  (assignment [B, N], centroids [B, k, D])."""
  keys = jax.random.split(key, points.shape[0])
  return jax.vmap(lambda kk, p: kmeans(kk, p, k, iterations, init))(keys, points)
