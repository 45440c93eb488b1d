"""Frozen backbone features for evaluation: pooled and spatial stage-4 outputs.

The backbone runs in inference mode (batch norm uses its running statistics),
jit-compiled, with each batch split over a Mesh of this host's devices and the
parameters replicated. Batches are padded to a fixed multiple of the device
count, so there is one compilation and every device gets an equal share; the
padding is dropped afterwards. Every host evaluates the whole (small) eval set
itself, so evaluation needs no cross-host gathering.

Several variable sets (the checkpoint and the random-init baseline) are run on
the same batches in one pass over the data, which is read once. Features are
kept in host memory: pooled N x C, and spatial N x h x w x C when retrieval
asks for it (demo: 3000 x 3 x 3 x 128 floats; a ResNet-50 at 224 px needs 400 kB
per image, so run retrieval on evaluation sets of thousands, not millions).
"""
from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import batch as B
from detcon_jax.models.resnet import normalize_images
from detcon_jax.core import sharding

FEATURE_STAGE = "stage4"
POOLED, SPATIAL = "pooled", "spatial"


def random_init_variables(model, image_size: int, seed: int = 0) -> dict:
  """Variables of `model` at a seed-fixed random initialisation: the baseline row."""
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda rng: model.init(rng, x, train=False))(jax.random.PRNGKey(seed))
  return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def make_feature_fn(model, mesh, spatial: bool = True, dense_model=None):
  """jit(variables, images [B, H, W, 3] in [0, 1]) -> {pooled [B, C], spatial [B, h, w, C]}.

  dense_model (e.g. model.clone(dilate_last=True), same variables) gives the
  spatial maps instead of `model`; pooled features always come from `model`.
  """
  def features(variables, images):
    x = normalize_images(images)
    out = model.apply(variables, x, train=False)[FEATURE_STAGE].astype(jnp.float32)
    result = {POOLED: out.mean(axis=(1, 2))}
    if spatial and dense_model is not None:
      result[SPATIAL] = dense_model.apply(variables, x, train=False)[FEATURE_STAGE].astype(
          jnp.float32)
    elif spatial:
      result[SPATIAL] = out
    return result

  return jax.jit(features, in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
                 out_shardings=sharding.batch_sharded(mesh))


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
  if len(x) == size:
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def extract_features(model, variables_by_name: dict[str, dict], batches: Iterable[dict], *,
                     spatial: bool = True, keep: Iterable[str] = (B.LABEL,),
                     mesh=None, dense_model=None) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
  """Run every variable set over the batches once.

  Returns ({name: {pooled, spatial}}, {key: concatenated batch[key] for key in
  keep}) as numpy arrays in input order. `keep` selects batch arrays to carry
  along (labels, ground-truth maps, ...); a missing key raises.
  """
  mesh = sharding.make_mesh(jax.local_devices()) if mesh is None else mesh
  num_devices = mesh.devices.size
  feature_fn = make_feature_fn(model, mesh, spatial, dense_model)
  variables_by_name = {name: jax.device_put(v, sharding.replicated(mesh))
                       for name, v in variables_by_name.items()}
  keep = tuple(keep)
  feats = {name: [] for name in variables_by_name}
  kept = {k: [] for k in keep}
  padded_size = None
  for batch in batches:
    images = np.asarray(batch[B.IMAGE], np.float32)
    n = len(images)
    if padded_size is None or n > padded_size:  # fixed shape: one compilation
      padded_size = -(-n // num_devices) * num_devices
    images = jax.device_put(_pad_to(images, padded_size), sharding.batch_sharded(mesh))
    for name, variables in variables_by_name.items():
      out = jax.device_get(feature_fn(variables, images))
      feats[name].append({k: v[:n] for k, v in out.items()})
    for k in keep:
      if k not in batch:
        raise KeyError(f"Evaluation needs batch key {k!r}; the eval reader gave {sorted(batch)}.")
      kept[k].append(np.asarray(batch[k]))
  if padded_size is None:
    raise ValueError("The evaluation split is empty: no batch to extract features from.")
  features = {name: {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
              for name, outs in feats.items()}
  return features, {k: np.concatenate(v) for k, v in kept.items()}
