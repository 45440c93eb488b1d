"""View specs: what views an objective asks the input pipeline for.

An objective declares its views (objectives' `views(config)`); the input
pipeline (data_pipelines/input.py) builds exactly those, any number, each at
its own size, and the batch carries them under the names of batch.py:
  batch[spec.name]                      [B, size, size, 3] float32 in [0, 1]
  batch[batch.key(spec.name, 'masks')]  [B, size, size] int32 mask-id map
  batch[batch.key(spec.name, 'mask_ids')] [B, K] int32 sampled ids
(the last two only when 'masks' is in spec.fields), and with 'saliency' /
'foreground' in spec.fields
  batch[batch.key(spec.name, 'saliency')]   [B, size, size] float32 in [0, 1]
  batch[batch.key(spec.name, 'foreground')] [B, size, size] float32 in {0, 1}
(the stored saliency map, resampled bilinearly with the view; foreground is it
thresholded at config.data.foreground_threshold); with 'background'
  batch[batch.key(spec.name, 'background')] [B, size, size, 3] float32 in [0, 1]
(the stored tiled background, moved with the view, no colour ops); with spec.boxes (a BoxSpec,
MaskCo) batch[batch.key(spec.name, 'boxes')] [B, N, 4] float32 and 'boxes_valid'
[B, N] bool. Every geometric op moves the image, every dense field and the boxes
of the view together.

Multi-crop (SwAV, Caron et al. 2020; constrained multi-crop, Van Gansbeke et
al. 2021) is a view option any objective can request: `standard_views(config)`
adds config.views.small_crops small crops after the two global views.
"""
from __future__ import annotations

import dataclasses

MASKS = "masks"          # dense field: the mask-id map (+ its sampled ids)
SALIENCY = "saliency"    # dense field: the stored saliency map (records need it)
FOREGROUND = "foreground"  # the view's saliency > config.data.foreground_threshold
BACKGROUND = "background"  # dense field: the stored tiled background (masks/tiled_background.py)
FIELDS = (MASKS, SALIENCY, FOREGROUND, BACKGROUND)
# Defaults of the constrained multi-crop rules (augment.OVERLAP_RULES): the paper's 20% of
# the small crop inside the anchor; the released code's 10% of its target area.
RULE_OVERLAP = {"paper": 0.2, "reference": 0.1}
# ViewSpec.salient_rule: how augment.salient_crop_box meets min_salient_cover. 'adaptive':
# CAST's reference (phi lowered when even a smallest crop cannot reach it; the whole image
# when no draw qualifies); 'fg_min': the background-augmentation paper's FGmin (Ryali et al.
# 2021, A.1 and C.6: the fraction as given; a CenterCrop when no draw qualifies).
SALIENT_RULES = ("adaptive", "fg_min")
BOX_ROLES = ("key", "query")  # BoxSpec.role (data_pipelines/boxes.py)


@dataclasses.dataclass(frozen=True)
class BoxSpec:
  """Boxes a view carries (MaskCo, data_pipelines/boxes.py), the same on both views of a pair.

  role 'key': `count` boxes drawn in this view, side lengths in `size`
  (pixels at 224 px, scaled by the view's size / 224), the first the positive,
  the others with IoU < max_iou with it. role 'query': the positive projected
  into this view, whose pixels are zeroed after every other augmentation; its
  crop is constrained to overlap the key view's enough to hold the box.
  Batch: '<view>/boxes' [B, N, 4] float32 (y0, x0, y1, x1) view pixels and
  '<view>/boxes_valid' [B, N] bool (N = count for the key, 1 for the query).
  """
  role: str
  count: int = 17
  size: tuple[float, float] = (32.0, 128.0)
  max_iou: float = 0.2

  def __post_init__(self):
    if self.role not in BOX_ROLES:
      raise ValueError(f"BoxSpec role {self.role!r}: choose one of {BOX_ROLES}.")
    lo, hi = self.size
    if self.count < 1 or not 0 < lo <= hi <= 224 or not 0 < self.max_iou <= 1:
      raise ValueError(f"BoxSpec {self}: needs count >= 1, 0 < size low <= high <= 224 "
                       "and 0 < max_iou <= 1.")

  def num_boxes(self) -> int:
    return self.count if self.role == "key" else 1


@dataclasses.dataclass(frozen=True)
class Constraint:
  """Constrained multi-crop: this view's crop must overlap the `anchor` view's crop
  (augment.constrained_crop_box: rule, min_overlap, bounded tries; a fallback is counted
  by the input with the salient ones: ViewSpec.constrained_crop)."""
  anchor: str
  rule: str = "paper"
  min_overlap: float = 0.2
  tries: int = 10

  def __post_init__(self):
    if self.rule not in RULE_OVERLAP:
      raise ValueError(f"Constraint rule {self.rule!r}: choose one of {sorted(RULE_OVERLAP)}.")
    if not 0.0 <= self.min_overlap <= 1.0 or self.tries < 1:
      raise ValueError(f"Constraint {self}: min_overlap must be in [0, 1] and tries >= 1.")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view: its batch name, output size, crop scale range and augmentation table.

  augment names a table in data_pipelines.augment.TABLES (colour, blur,
  solarize, flip probabilities); crop_area is the random-resized-crop area
  fraction range; fields are the dense fields that travel with the view.
  min_salient_cover (CAST's phi) > 0 makes the crop cover at least that
  fraction of the image's salient area (augment.salient_crop_box; needs
  records with saliency maps), by salient_rule (SALIENT_RULES).
  """
  name: str
  size: int
  crop_area: tuple[float, float] = (0.08, 1.0)
  augment: str = "byol1"
  fields: tuple[str, ...] = ()
  small: bool = False           # a multi-crop small crop (never a key; see objectives)
  min_salient_cover: float = 0.0
  boxes: BoxSpec | None = None  # boxes that travel with the view (MaskCo)
  constraint: Constraint | None = None   # constrained multi-crop (anchored to another view)
  salient_rule: str = "adaptive"  # how min_salient_cover is met (SALIENT_RULES)

  def __post_init__(self):
    unknown = [f for f in self.fields if f not in FIELDS]
    if unknown:
      raise ValueError(f"View {self.name!r}: unknown dense fields {unknown}; known: {FIELDS}.")
    lo, hi = self.crop_area
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"View {self.name!r}: crop_area {self.crop_area} must satisfy "
                       "0 < low <= high <= 1.")
    if not 0.0 <= self.min_salient_cover < 1.0:
      raise ValueError(f"View {self.name!r}: min_salient_cover {self.min_salient_cover} must "
                       "lie in [0, 1) (CAST: 0.2).")
    if self.salient_rule not in SALIENT_RULES:
      raise ValueError(f"View {self.name!r}: salient_rule {self.salient_rule!r}: choose one "
                       f"of {SALIENT_RULES}.")
    if self.size < 8:
      raise ValueError(f"View {self.name!r}: size {self.size} must be >= 8.")

  @property
  def constrained_crop(self) -> bool:
    """Whether the crop is drawn under a constraint that can fall back (anchor overlap or
    salient cover); the input counts such crops and their fallbacks (Batches.stats)."""
    return self.constraint is not None or self.min_salient_cover > 0


def names(specs) -> list[str]:
  return [s.name for s in specs]


def global_views(specs):
  return [s for s in specs if not s.small]


def small_views(specs):
  return [s for s in specs if s.small]


# Augmentation tables (data_pipelines.augment.TABLES) of the two global views, per
# config.data.augment family; small crops use the first view's table.
AUGMENT_PAIRS = {
    "simclr": ("simclr1", "simclr2"),     # DetCon A.1, SimCLR column (T, T')
    "byol": ("byol1", "byol2"),           # DetCon A.1, BYOL column (T, T')
    "moco_v2": ("moco_v2", "moco_v2"),    # MoCo v2 (Chen et al. 2020): one table, both views
    "swav": ("swav", "swav"),             # SwAV: one table for every crop
    # A+ (Van Gansbeke et al. 2021): the positives (view1 and the small crops) take
    # AutoAugment with p = 0.5; the anchor (view2, MoCo's key) keeps the standard table.
    "moco_v2_aplus": ("moco_v2_aplus", "moco_v2"),
    "supervised": ("supervised", "supervised"),   # crop + flip (configs/supervised.py)
}


def standard_views(config, masks: bool = False) -> tuple[ViewSpec, ...]:
  """Two global views ('view1', 'view2') at config.image_size, then
  config.views.small_crops small crops ('small1', ...) at config.views.small_size.

  Reads config.data.augment (a family of AUGMENT_PAIRS) and config.views
  {global_area, small_crops, small_size, small_area[, min_salient_cover]}.
  masks=True: every view carries its mask-id map. min_salient_cover (default 0)
  constrains the two global crops to the saliency (CAST's phi), for any method.
  config.views.constrained=True anchors every small crop to view2 (the anchor:
  MoCo's key view, the released code's last large crop) with
  config.views.{constraint_rule, constraint_overlap (None: the rule's default),
  constraint_tries}.
  """
  family = config.data.augment
  if family not in AUGMENT_PAIRS:
    raise ValueError(f"config.data.augment={family!r}: choose one of {sorted(AUGMENT_PAIRS)}.")
  t1, t2 = AUGMENT_PAIRS[family]
  v = config.views
  fields = (MASKS,) if masks else ()
  area = tuple(float(a) for a in v.global_area)
  cover = float(v.get("min_salient_cover", 0.0))
  specs = [ViewSpec("view1", int(config.image_size), area, t1, fields, min_salient_cover=cover),
           ViewSpec("view2", int(config.image_size), area, t2, fields, min_salient_cover=cover)]
  small_area = tuple(float(a) for a in v.small_area)
  specs += [ViewSpec(f"small{i + 1}", int(v.small_size), small_area, t1, fields, small=True,
                     constraint=constraint(v))
            for i in range(int(v.small_crops))]
  return tuple(specs)


def constraint(views_config) -> Constraint | None:
  """The small crops' Constraint from config.views (None unless constrained=True)."""
  v = views_config
  if not v.get("constrained", False):
    return None
  rule = v.get("constraint_rule", "paper")
  overlap = v.get("constraint_overlap", None)
  return Constraint("view2", rule, RULE_OVERLAP.get(rule, 0.0) if overlap is None
                    else float(overlap), int(v.get("constraint_tries", 10)))


def two_views(image_size: int, masks: bool = True, augment: str = "byol") -> tuple[ViewSpec, ...]:
  """The classic pair without a config (tests, benchmarks)."""
  t1, t2 = AUGMENT_PAIRS[augment]
  fields = (MASKS,) if masks else ()
  return (ViewSpec("view1", image_size, augment=t1, fields=fields),
          ViewSpec("view2", image_size, augment=t2, fields=fields))
