"""MoCo v2 (Chen et al. 2020). Presets: demo (CPU minutes), imagenet[-EPOCHS], coco[-EPOCHS].

Paper settings: ResNet-50, batch 256, 224 px, SGD (momentum 0.9, weight decay
1e-4 on every parameter, as PyTorch's SGD), cosine schedule without warmup,
queue 65536, key momentum 0.999, temperature 0.2, MLP head 2048-128 without BN.
ImageNet: 200 epochs at lr 0.03 x batch/256 (MoCo v2). COCO: 200 epochs at
lr 0.3 (Van Gansbeke et al. 2021, section 4 and appendix).
"""
from configs import common

BATCH = 256
EPOCHS = {"imagenet": 200, "coco": 200}
BASE_LR = {"imagenet": 0.03, "coco": 0.3}
SGD = dict(name="sgd", weight_decay=1e-4, momentum=0.9, exclude_1d=False, schedule="cosine")


def get_config(arg: str | None = None):
  name, epochs = common.parse_preset("moco_v2", arg)
  if name == "demo":
    c = common.demo_config("moco_v2", "moco_v2")
    # Same optimiser as the paper; a shorter key-network horizon (momentum 0.99,
    # ~100 steps) and a queue of ~1/3 epoch, so that 400 steps of the 2500-image
    # demo see a moving key network and fresh negatives.
    c.optimizer.update(SGD, base_lr=0.3, warmup_steps=0)
    c.moco.update(momentum=0.99, queue_size=1024)
    return c
  c = common.paper_config("moco_v2", "moco_v2", name, epochs or EPOCHS[name], batch_size=BATCH)
  c.optimizer.update(SGD, base_lr=BASE_LR[name], warmup_steps=0)
  return c
