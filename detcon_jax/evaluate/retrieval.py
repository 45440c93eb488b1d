"""Semantic segment retrieval (Revisiting Contrastive Learning, appendix A.7).

Per image, K-means (K = 15) groups the spatial features into regions; a
region's descriptor is the mean feature of its pixels. Each test region takes
the label of its nearest train region (cosine, plain 1-NN as in the paper),
where a train region's label is the majority ground-truth semantic class of its
pixels. Painting the test regions with their labels gives a segmentation whose
mIoU against the ground truth (background counted as a class) measures how
well the features group pixels by meaning, without any training.

Resolution: features are L2-normalised per pixel and clustered at the
resolution they are given, optionally after bilinear upsampling to
`resolution` x `resolution` (the paper's dilated ResNet gives 64 x 64 at input
512; an undilated ResNet at demo size gives 3 x 3, too few points for 15
clusters). Region maps are brought to the ground-truth resolution by
nearest-neighbour upsampling, and region labels and mIoU are computed there.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

K = 15
KMEANS_ITERS = 20


def _kmeans_one(points: jax.Array, key: jax.Array, k: int, iters: int) -> jax.Array:
  """Cluster ids [P] of points [P, C]: k-means++ seeding, then Lloyd iterations."""
  num_points = points.shape[0]

  def sq_dist(centers):  # [P, k]
    return jnp.maximum(jnp.sum(points**2, -1)[:, None] - 2 * points @ centers.T
                       + jnp.sum(centers**2, -1)[None, :], 0.0)

  def seed_step(i, carry):
    centers, nearest, key = carry
    key, sub = jax.random.split(key)
    # Sample proportional to squared distance; where every point is already a
    # centre (fewer distinct points than k) fall back to uniform.
    logits = jnp.where(nearest.sum() > 0, jnp.log(nearest), jnp.zeros_like(nearest))
    idx = jax.random.categorical(sub, logits)
    centers = centers.at[i].set(points[idx])
    nearest = jnp.minimum(nearest, jnp.sum((points - points[idx])**2, -1))
    return centers, nearest, key

  key, sub = jax.random.split(key)
  first = jax.random.randint(sub, (), 0, num_points)
  centers = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(points[first])
  nearest = jnp.sum((points - points[first])**2, -1)
  centers, _, _ = jax.lax.fori_loop(1, k, seed_step, (centers, nearest, key))

  def lloyd_step(_, centers):
    assign = jnp.argmin(sq_dist(centers), -1)
    one_hot = jax.nn.one_hot(assign, k, dtype=points.dtype)       # [P, k]
    counts = one_hot.sum(0)
    means = one_hot.T @ points / jnp.maximum(counts, 1)[:, None]
    return jnp.where(counts[:, None] > 0, means, centers)          # empty clusters keep their centre

  centers = jax.lax.fori_loop(0, iters, lloyd_step, centers)
  return jnp.argmin(sq_dist(centers), -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "resolution", "iters"))
def image_regions(spatial: jax.Array, key: jax.Array, *, k: int = K,
                  resolution: int | None = None, iters: int = KMEANS_ITERS):
  """K-means regions of each image's feature map.

  spatial [B, h, w, C] -> (descriptors [B, k, C] mean L2-normalised feature per
  region, valid [B, k] region is non-empty, assignment [B, r, r'] region id per
  position at the clustering resolution).
  """
  b, h, w, c = spatial.shape
  x = spatial.astype(jnp.float32)
  if resolution is not None and (h, w) != (resolution, resolution):
    x = jax.image.resize(x, (b, resolution, resolution, c), method="bilinear")
  rh, rw = x.shape[1:3]
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  points = x.reshape(b, rh * rw, c)
  assign = jax.vmap(_kmeans_one, in_axes=(0, 0, None, None))(
      points, jax.random.split(key, b), k, iters)
  one_hot = jax.nn.one_hot(assign, k, dtype=jnp.float32)          # [B, P, k]
  counts = one_hot.sum(1)
  descriptors = jnp.einsum("bpk,bpc->bkc", one_hot, points) / jnp.maximum(counts, 1)[..., None]
  return descriptors, counts > 0, assign.reshape(b, rh, rw)


def upsample_nearest(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[B, h, w] integer map -> [B, *size] by nearest neighbour (pixel centres)."""
  h, w = ids.shape[1:3]
  rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64)
  cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64)
  return ids[:, rows][:, :, cols]


def region_labels(assignment: np.ndarray, semantic: np.ndarray, k: int,
                  num_semantic: int) -> np.ndarray:
  """Majority semantic class [B, k] of each region (assignment at GT resolution)."""
  b = assignment.shape[0]
  code = (np.arange(b)[:, None, None] * k + assignment) * num_semantic + semantic
  votes = np.bincount(code.ravel(), minlength=b * k * num_semantic)
  return votes.reshape(b, k, num_semantic).argmax(-1)


def nearest_region(query: np.ndarray, memory: np.ndarray, chunk: int = 2048) -> np.ndarray:
  """Index into memory [N, C] of each query's [M, C] cosine nearest neighbour."""
  norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  query, memory = norm(np.asarray(query, np.float32)), norm(np.asarray(memory, np.float32))
  return np.concatenate([np.argmax(query[i:i + chunk] @ memory.T, axis=1)
                         for i in range(0, len(query), chunk)] or [np.zeros(0, np.int64)])


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_semantic: int) -> np.ndarray:
  """[num_semantic, num_semantic] pixel counts, rows = ground truth."""
  return np.bincount((gt.astype(np.int64) * num_semantic + pred).ravel(),
                     minlength=num_semantic**2).reshape(num_semantic, num_semantic)


def iou_from_confusion(conf: np.ndarray) -> np.ndarray:
  """Per-class IoU; NaN for classes neither present nor predicted (left out of the mean)."""
  inter = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, inter / union, np.nan)


def _regions_in_batches(spatial, key, k, resolution, batch_size):
  out = [image_regions(jnp.asarray(spatial[i:i + batch_size]), jax.random.fold_in(key, i),
                       k=k, resolution=resolution)
         for i in range(0, len(spatial), batch_size)]
  return tuple(np.concatenate([np.asarray(o[j]) for o in out]) for j in range(3))


def segment_retrieval(train_spatial, train_semantic, test_spatial, test_semantic, *,
                      num_classes: int, k: int = K, resolution: int | None = None,
                      seed: int = 0, batch_size: int = 64) -> dict:
  """mIoU of retrieved test segmentations, per-class IoU and the predicted maps.

  `*_spatial` [N, h, w, C] feature maps; `*_semantic` [N, S, S'] with 0 =
  background and class c as c + 1, so there are num_classes + 1 semantic classes.
  """
  num_semantic = num_classes + 1
  for name, sem in (("train", train_semantic), ("test", test_semantic)):
    if sem.min() < 0 or sem.max() >= num_semantic:
      raise ValueError(f"{name} semantic maps hold ids outside [0, {num_semantic}) for "
                       f"num_classes={num_classes}.")
  key = jax.random.PRNGKey(seed)
  size = train_semantic.shape[1:3]
  train_desc, train_valid, train_assign = _regions_in_batches(
      train_spatial, jax.random.fold_in(key, 0), k, resolution, batch_size)
  train_labels = region_labels(upsample_nearest(train_assign, size), train_semantic, k, num_semantic)
  memory, memory_labels = train_desc[train_valid], train_labels[train_valid]

  test_desc, test_valid, test_assign = _regions_in_batches(
      test_spatial, jax.random.fold_in(key, 1), k, resolution, batch_size)
  test_labels = np.zeros(test_valid.shape, np.int64)
  test_labels[test_valid] = memory_labels[nearest_region(test_desc[test_valid], memory)]
  test_assign = upsample_nearest(test_assign, test_semantic.shape[1:3])
  predictions = np.take_along_axis(test_labels, test_assign.reshape(len(test_assign), -1), 1)
  predictions = predictions.reshape(test_assign.shape).astype(np.int32)

  iou = iou_from_confusion(confusion_matrix(test_semantic, predictions, num_semantic))
  h, w = test_spatial.shape[1:3]
  clustered = (f"{h}x{w} features upsampled to {resolution}x{resolution}"
               if resolution and (h, w) != (resolution, resolution) else f"{h}x{w} features")
  return {"miou": float(np.nanmean(iou)), "per_class_iou": iou.tolist(),
          "predictions": predictions, "resolution": f"K-means (K={k}) on {clustered}"}
