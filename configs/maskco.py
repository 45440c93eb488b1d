"""MaskCo / MaskCo(+in) (Zhao et al. 2021). Presets: demo (CPU minutes), bench (demo x 5),
imagenet[-EPOCHS], coco[-EPOCHS]. MaskCo(+in): --config.loss.intra_negatives=True.

Paper settings (section 3.3, appendix A.2): ResNet-50, 224 px, MoCo v2's
augmentations (crops of 20-100%) with overlapping crops, 17 key boxes of
32-128 px (IoU < 0.2 with the positive), MPH of 3 bottleneck blocks, MoCo v2's
MLP head (2048-128, no BN), temperature 0.2, key momentum 0.999, negatives
from the other images on the same GPU (32 per GPU, 8 GPUs: batch 256), SGD
lr 0.03, momentum 0.9, weight decay 0.001 (the paper's value; MoCo v2 uses
1e-4), cosine schedule. ImageNet: 100 epochs (most experiments; Table 3
uses 200); other datasets "the same iterations", so coco defaults to the
steps of 100 ImageNet epochs (about 500k) and coco-EPOCHS counts COCO epochs.
"""
from configs import common

BATCH = 256
IMAGENET_EPOCHS = 100
SGD = dict(name="sgd", base_lr=0.03, weight_decay=1e-3, momentum=0.9, exclude_1d=False,
           schedule="cosine", warmup_steps=0)


@common.with_bench
def get_config(arg: str | None = None):
  name, epochs = common.parse_preset("maskco", arg)
  if name == "demo":
    c = common.demo_config("maskco", "moco_v2")
    # MoCo v2's demo optimiser (lr 0.3 x 32/256 as the COCO runs of Van Gansbeke
    # et al.) with MoCo's 1e-4 decay; the 32 images form one negative group, as
    # one of the paper's GPUs (16 x 31 negatives), on any device count. 64 px
    # views: boxes of 9-37 px.
    c.optimizer.update(SGD, base_lr=0.3, weight_decay=1e-4)
    c.loss.update(local_negatives=True, intra_negatives=False, num_shards=1)
    return c
  if name == "coco" and epochs is None:
    epochs = IMAGENET_EPOCHS * common.IMAGENET_TRAIN_IMAGES / common.COCO_TRAIN_IMAGES
  c = common.paper_config("maskco", "moco_v2", name, epochs or IMAGENET_EPOCHS, batch_size=BATCH)
  c.optimizer.update(SGD)
  # Negatives within groups of 32 images (the paper's per-GPU batch), on any device count.
  c.loss.update(local_negatives=True, intra_negatives=False, num_shards=BATCH // 32)
  return c
