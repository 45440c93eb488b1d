"""What the objectives share: the Objective record, the network layout, the N-view forward pass.

Layout (plain dict pytrees, so EMA, optimiser labels and checkpoints are tree maps):
  params = {'encoder', 'projector'[, 'predictor'][, 'prototypes']}
  state  = {'batch_stats': {same keys as the networks}[, 'target': {'encoder', 'projector'}]
            [, method-specific entries such as 'queue']}
'target' (EMA-target and momentum-encoder methods) holds the moving average of
params['encoder'] and params['projector']. The target runs in training mode,
so its batch norm uses the current batch's statistics (as the BYOL and MoCo
reference code) and needs no running averages of its own.

Views (data_pipelines/views.py) of one size go through one network call,
stacked per image ([B, V, ...] -> [B*V, ...]) so that each device's slice of a
sharded batch holds every view of its own images and no data moves between
devices; batch norm statistics span those views of the global batch. Views of
different sizes (multi-crop) run as separate encoder calls, one per size, as
the SwAV reference does; the heads then run once over every view.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from detcon_jax.errors import ConfigError
from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.models import heads
from detcon_jax.models.resnet import compute_dtype, encoder_from_config, normalize_images

ENCODER, PROJECTOR, PREDICTOR, TARGET, BATCH_STATS = (
    "encoder", "projector", "predictor", "target", "batch_stats")


def no_update(params, state, step, config):
  """after_update for methods with nothing to do after the optimiser step."""
  del step, config
  return params, state


def default_labels(params, config):
  """Optimiser labels: every leaf 'default' (see core/optimizer.py for the labels)."""
  del config
  return jax.tree.map(lambda _: "default", params)


def no_config():
  return {}


def two_views(config):
  return V.standard_views(config, masks=False)


def masked_views(config):
  return V.standard_views(config, masks=True)


def no_checks(config):
  del config


class Objective(NamedTuple):
  """A pretraining method as the trainer sees it (see registry.py for the contract)."""
  name: str
  init: Callable                       # (rng, config, batch) -> (params, state)
  loss: Callable                       # (params, state, batch, rng, step, config)
                                       #   -> (loss, (metrics, new_state))
  after_update: Callable = no_update   # (params, state, step, config) -> (params, state)
  param_labels: Callable = default_labels   # (params, config) -> pytree of label strings
  views: Callable = two_views          # (config) -> tuple[ViewSpec, ...]
  default_config: Callable = no_config  # () -> {section: {key: default}} the method adds
  validate: Callable = no_checks       # (config) -> None, raises ConfigError
  backgrounds: tuple = ()              # config.background.mode values it composes with
  online_masks: bool = False           # takes config.data.mask_source='online'
                                       #   (objectives/online_masks.py)


# Background augmentations a method can take (data_pipelines/background_augment.py): any method
# whose views come from the input pipeline takes the view-only modes; 'swaps' also needs
# a hook in the loss for its background-matched negative (explicit negatives).
BACKGROUND_VIEW_MODES = ("rm", "random")
BACKGROUND_ALL_MODES = BACKGROUND_VIEW_MODES + ("swaps",)


# --- Networks ------------------------------------------------------------------

class Networks(NamedTuple):
  encoder: object
  projector: object
  predictor: object | None


def build_networks(config, with_predictor: bool) -> Networks:
  """Encoder from config.model; projector/predictor MLPs from config.head.

  config.head.batch_norm (default True) puts BN in the MLPs' hidden layer
  (SimCLR, BYOL, SwAV); MoCo v2's head has none.
  """
  dtype = compute_dtype(config.model.get("dtype", "float32"))
  bn = bool(config.head.get("batch_norm", True))
  mlp = lambda: heads.MLP(int(config.head.hidden_dim), int(config.head.output_dim),
                          dtype=dtype, batch_norm=bn)
  return Networks(encoder_from_config(config), mlp(), mlp() if with_predictor else None)


def init_networks(nets: Networks, rng, images):
  """Params and batch stats of every network, traced on the first image of `images`."""
  keys = jax.random.split(rng, 3)
  variables = {ENCODER: nets.encoder.init(keys[0], normalize_images(images[:1]), train=False)}
  out = jax.eval_shape(lambda v: nets.encoder.apply(v, images[:1], train=False),
                       variables[ENCODER])["stage4"]
  latent = jnp.zeros((1, out.shape[-1]), jnp.float32)
  variables[PROJECTOR] = nets.projector.init(keys[1], latent, train=False)
  if nets.predictor is not None:
    proj = jnp.zeros((1, nets.projector.output_dim), jnp.float32)
    variables[PREDICTOR] = nets.predictor.init(keys[2], proj, train=False)
  params = {k: v["params"] for k, v in variables.items()}
  batch_stats = {k: v.get(BATCH_STATS, {}) for k, v in variables.items()}
  return params, batch_stats


def _apply(module, params, batch_stats, x):
  out, updates = module.apply({"params": params, BATCH_STATS: batch_stats}, x, train=True,
                              mutable=[BATCH_STATS])
  return out, updates.get(BATCH_STATS, {})


# --- Pooling of the final feature map ---------------------------------------------

def global_pool(maps, batch, names):
  """One global mask per view: [B*V, h, w, C] -> [B*V, C]."""
  del batch, names
  return heads.global_pool(maps)


def masks_pool(maps, batch, names):
  """DetCon's mask pooling: [B*V, h, w, C] -> [B*V, K, C] under each view's sampled masks."""
  ids = stack_views(batch, [B.key(n, "masks") for n in names])
  sampled = stack_views(batch, [B.key(n, "mask_ids") for n in names])
  pooled, _ = heads.mask_pool(maps, ids, sampled)
  return pooled


class Forward(NamedTuple):
  """Per-view outputs of one forward pass, each a dict view name -> array."""
  z: dict           # projections [B, D] (global pool) or [B, K, D] (mask pool), float32
  p: dict | None    # predictions, when the network has a predictor
  maps: dict        # final feature maps [B, h, w, C] (Grad-CAM, RoI align, dense losses)
  batch_stats: dict  # updated running averages


def stack_views(batch, names):
  """[B, ...] per name -> [B*V, ...], the V views of each image adjacent."""
  x = jnp.stack([batch[n] for n in names], axis=1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unstack_views(x, names):
  """Inverse of stack_views: [B*V, ...] -> {name: [B, ...]}."""
  x = x.reshape((x.shape[0] // len(names), len(names)) + x.shape[1:])
  return {n: x[:, i] for i, n in enumerate(names)}


def _size_groups(specs):
  """View names grouped by size, in order of first appearance (one encoder call each)."""
  sizes = list(dict.fromkeys(s.size for s in specs))
  return [[s.name for s in specs if s.size == size] for size in sizes]


def encode(nets: Networks, params, batch_stats, batch, specs):
  """The encoder part of `forward`: ({view: final feature map [B, h, w, C]}, the
  encoder's updated batch stats). A caller that needs the maps before pooling (online
  masks: objectives/online_masks.py) passes the result to forward(encoded=...)."""
  stats = batch_stats[ENCODER]
  maps = {}
  for names in _size_groups(specs):
    out, stats = _apply(nets.encoder, params[ENCODER], stats,
                        normalize_images(stack_views(batch, names)))
    maps.update(unstack_views(out["stage4"], names))
  return maps, stats


def forward(nets: Networks, params, batch_stats, batch, specs, pool=global_pool,
            encoded=None) -> Forward:
  """Every view in `specs` through encoder, `pool`, projector (and predictor).

  One encoder call per distinct view size (in order of first appearance);
  the pooled latents of all views then go through the heads in one call, so
  head batch norm spans every view. Runs in training mode; the predictor
  runs when `params` has one. encoded: encode()'s result for these params, so
  the encoder does not run again.
  """
  maps, stats = encoded if encoded is not None else encode(nets, params, batch_stats, batch,
                                                           specs)
  pooled = {}
  for names in _size_groups(specs):
    pooled.update(unstack_views(pool(stack_views(maps, names), batch, names), names))
  order = [s.name for s in specs]
  new_stats = {ENCODER: stats}
  latents = jnp.stack([pooled[n] for n in order], axis=1)              # [B, V, (K,) C]
  z, new_stats[PROJECTOR] = _apply(nets.projector, params[PROJECTOR], batch_stats[PROJECTOR],
                                   latents)
  p = None
  if PREDICTOR in params:
    p, new_stats[PREDICTOR] = _apply(nets.predictor, params[PREDICTOR], batch_stats[PREDICTOR],
                                     z)
    p = {n: p[:, i].astype(jnp.float32) for i, n in enumerate(order)}
  z = {n: z[:, i].astype(jnp.float32) for i, n in enumerate(order)}
  return Forward(z, p, maps, new_stats)


# --- Shared pieces of the frameworks ------------------------------------------------

def ema(target, online, decay):
  """target <- decay * target + (1 - decay) * online, leaf by leaf (BYOL's xi, MoCo's m)."""
  return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target, online)


def ema_decay(step, tau0: float, steps: int):
  """BYOL target decay: tau0 at step 0, annealed to 1 at `steps` by a cosine.

  Applied by ema() above through each framework's after_update.
  """
  cos = jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / steps)
  return 1.0 - (1.0 - tau0) * (cos + 1.0) / 2.0


def copy_of(params, keys=(ENCODER, PROJECTOR)):
  """A copy (not an alias: the trainer may donate params and state separately)."""
  return jax.tree.map(jnp.array, {k: params[k] for k in keys})


def negative_shards(config) -> int:
  """Blocks the negatives are restricted to: 1 (global) or the device count.

  config.loss.local_negatives=True restricts negatives to each device's slice
  of the global batch (DetCon Table 5); config.loss.num_shards overrides the
  device count (e.g. to emulate a pod slice on one host).
  """
  if not config.loss.get("local_negatives", False):
    return 1
  return int(config.loss.get("num_shards", None) or jax.device_count())


def check_views(batch, specs, config=None):
  """Validate the batch at init: every view of `specs` present, masks the size of their view."""
  keys = []
  for s in specs:
    keys.append(s.name)
    if V.MASKS in s.fields:
      keys += [B.key(s.name, "masks"), B.key(s.name, "mask_ids")]
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"The batch lacks {missing} (has {sorted(batch)}); the input pipeline "
                     "must produce the views the objective asks for (objective.views), and "
                     "mask-based methods need records built with masks.")
  for s in specs:
    if V.MASKS not in s.fields:
      continue
    masks, ids = B.key(s.name, "masks"), B.key(s.name, "mask_ids")
    if tuple(batch[masks].shape) != tuple(batch[s.name].shape[:3]):
      raise ValueError(f"batch['{masks}'] has shape {tuple(batch[masks].shape)}; it must be "
                       f"the size of batch['{s.name}'] {tuple(batch[s.name].shape[:3])}.")
    want = config.loss.get("num_masks", None) if config is not None else None
    if want is not None and batch[ids].shape[-1] != int(want):
      raise ValueError(f"batch['{ids}'] has {batch[ids].shape[-1]} masks per image but "
                       f"config.loss.num_masks={want}; make them agree.")


def require(config, section: str, keys, method: str):
  """ConfigError unless config.<section> has every key (a --config.method override
  onto another method's config lacks them)."""
  node = config.get(section, None)
  missing = [k for k in keys if node is None or k not in node]
  if missing:
    raise ConfigError(f"config.method={method!r} needs config.{section}.{{{', '.join(missing)}}}; "
                      f"start from configs/{method}.py (--config=configs/{method}.py:demo).")


def no_multi_crop(config, method: str):
  """ConfigError for config.views.small_crops > 0 on a method without multi-crop."""
  if int(config.views.get("small_crops", 0)):
    raise ConfigError(f"config.views.small_crops={config.views.small_crops}: {method} has no "
                      "multi-crop loss; set it to 0 (multi-crop: moco_v2, swav).")
