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
    # The paper's optimiser and key momentum (lr 0.3 x 32/256, as the COCO runs of
    # Van Gansbeke et al.) and a queue of 1024 keys (32 steps, 40% of the demo).
    # The loss starts low while the queue still holds MoCo's random initial keys
    # (the first 32 steps), rises as real keys fill it, then falls. Measured, 400
    # steps: 6.82 at step 30 -> 6.39 at 400. With momentum 0.99 it rose instead
    # (5.29 -> 6.25): stale queue keys from a fast-moving key network are easy
    # negatives while the learning rate is high, and the loss followed the schedule.
    c.optimizer.update(SGD, base_lr=0.3, warmup_steps=0)
    c.moco.update(queue_size=1024)
    return c
  c = common.paper_config("moco_v2", "moco_v2", name, epochs or EPOCHS[name], batch_size=BATCH)
  c.optimizer.update(SGD, base_lr=BASE_LR[name], warmup_steps=0)
  return c
