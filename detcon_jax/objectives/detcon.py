"""DetCon-S and DetCon-B (Henaff et al. 2021, section 3.1).

DetCon-S is the SimCLR framework, DetCon-B the BYOL framework, each with the
final feature map mask-pooled under the K sampled masks of each view and the
contrastive detection loss (contrastive.detcon_nce). DetCon-B uses the NCE
loss between online predictions and target projections, as the reference
implementation does, not BYOL's regression.

BG Swaps (data_pipelines/background_augment.py) composes with DetCon-S: its
background-matched negative image, pooled under view 1's masks, gives each
view-1 mask anchor one extra negative (contrastive.detcon_nce's `extra`).
"""
from __future__ import annotations

from data_pipelines import batch as B
from detcon_jax.errors import ConfigError
from detcon_jax.objectives import common, online_masks
from detcon_jax.objectives.byol import bootstrap
from detcon_jax.objectives.contrastive import DETCON_FORMS, detcon_nce, uniform
from detcon_jax.objectives.simclr import siamese

# detcon_form: "reference" (the public DetCon code) or "dedup" (duplicate masks folded
# out); detcon_same_image_negatives=False drops same-image negatives.
CONFIG = {"loss": {"detcon_form": "reference", "detcon_same_image_negatives": True}}


def check(config):
  if config.loss.get("detcon_form", "reference") not in DETCON_FORMS:
    raise ConfigError(f"config.loss.detcon_form={config.loss.detcon_form!r}: choose one of "
                      f"{list(DETCON_FORMS)} (reference: the public DetCon code).")


def detcon_criterion(online1, online2, target1, target2, batch, config, extra=None):
  """Reads loss.detcon_form ("reference", the public code, by default; or "dedup")
  and loss.detcon_same_image_negatives (True by default, as the reference);
  extra [B, K, D]: BG Swaps' negative, pooled under view 1's masks."""
  loss = lambda o1, o2, t1, t2, e, tau: detcon_nce(
      o1, o2, t1, t2, batch[B.MASK_IDS1], batch[B.MASK_IDS2], temperature=tau,
      num_shards=common.negative_shards(config), form=config.loss.get("detcon_form", "reference"),
      same_image_negatives=bool(config.loss.get("detcon_same_image_negatives", True)), extra=e)
  value, metrics = loss(online1, online2, target1, target2, extra, float(config.loss.temperature))
  u = uniform   # chance: log(candidates per mask anchor), averaged as the loss (about 2 log 2BK)
  chance, _ = loss(u(online1), u(online2), u(target1), u(target2), u(extra), 1.0)
  return value, dict(metrics, chance=chance)


DETCON_S = siamese("detcon_s", common.masks_pool, detcon_criterion, views=common.masked_views,
                   config=CONFIG, validate=check)
def check_b(config):
  check(config)
  online_masks.check(config)


# DetCon-B also takes config.data.mask_source='online' (objectives/online_masks.py): masks
# from K-means over its EMA target's feature maps. DetCon-S has no target network (Odin
# clusters the slowly moving EMA target, so masks change smoothly from step to step); it
# refuses online masks with a ConfigError (core/validation.py, from Objective.online_masks).
DETCON_B = bootstrap("detcon_b", common.masks_pool, detcon_criterion,
                     views=online_masks.masked_views, config={**CONFIG, **online_masks.CONFIG},
                     validate=check_b, masks=online_masks.replace_masks)
