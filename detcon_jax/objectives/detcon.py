"""DetCon-S and DetCon-B (Henaff et al. 2021, section 3.1).

DetCon-S is the SimCLR framework, DetCon-B the BYOL framework, each with the
final feature map mask-pooled under the K sampled masks of each view and the
contrastive detection loss (contrastive.detcon_nce). DetCon-B uses the NCE
loss between online predictions and target projections, as the reference
implementation does, not BYOL's regression.

BG Swaps (data_pipelines/background.py) composes with DetCon-S: its
background-matched negative image, pooled under view 1's masks, gives each
view-1 mask anchor one extra negative (contrastive.detcon_nce's `extra`).
"""
from __future__ import annotations

from data_pipelines import batch as B
from detcon_jax.objectives import common
from detcon_jax.objectives.byol import bootstrap
from detcon_jax.objectives.contrastive import detcon_nce
from detcon_jax.objectives.simclr import siamese


def detcon_criterion(online1, online2, target1, target2, batch, config, extra=None):
  """Reads loss.detcon_form ("reference", the public code, by default; or "dedup")
  and loss.detcon_same_image_negatives (True by default, as the reference);
  extra [B, K, D]: BG Swaps' negative, pooled under view 1's masks."""
  return detcon_nce(online1, online2, target1, target2, batch[B.MASK_IDS1], batch[B.MASK_IDS2],
                    temperature=float(config.loss.temperature),
                    num_shards=common.negative_shards(config),
                    form=config.loss.get("detcon_form", "reference"),
                    same_image_negatives=bool(
                        config.loss.get("detcon_same_image_negatives", True)), extra=extra)


DETCON_S = siamese("detcon_s", common.masks_pool, detcon_criterion, views=common.masked_views)
DETCON_B = bootstrap("detcon_b", common.masks_pool, detcon_criterion, views=common.masked_views)
