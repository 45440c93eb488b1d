"""CAST (Selvaraju et al. 2021) on MoCo v2. Presets: demo (CPU minutes), bench (demo x 5),
imagenet[-EPOCHS], coco[-EPOCHS].

MoCo v2's settings (configs/moco_v2.py: MLP head without BN, temperature 0.2,
queue 65536, momentum 0.999, SGD with a cosine schedule, crops of 20-100%) plus
CAST's: both crops cover at least phi = 0.2 of the salient area, attention-loss
weight lambda = 3 (paper, Table 2a/2b). The released code's command differs in
its MoCo base: a linear head, temperature 0.07, lr 0.5 at batch 256 (its Table
2c shows the MLP head, used here, matching or beating it), and it clips the
gradient norm at 2.
"""
from configs import common
from configs import moco_v2

PHI = 0.2          # min_salient_cover: each crop covers >= 20% of the salient area
LAMBDA = 3.0       # attention-loss weight


@common.with_bench
def get_config(arg: str | None = None):
  name, _ = common.parse_preset("cast", arg)
  c = moco_v2.get_config(arg)            # MoCo v2's preset, plus CAST's section and settings
  c.method = "cast"
  c.cast = common.method_config("cast").cast
  c.views.min_salient_cover = PHI
  c.cast.attention_weight = LAMBDA
  if name == "demo":
    # Demo images are 96 px and views 64 px at stride 16: Grad-CAM on a 4x4 grid.
    c.eval.evals = ("knn", "linear", "seg_linear", "multilabel", "gradcam")
  return c
