"""SwAV (Caron et al. 2020). Presets: demo (CPU minutes), imagenet[-EPOCHS], coco[-EPOCHS].

Paper settings (800-epoch ImageNet model): ResNet-50, batch 4096, multi-crop
2 x 224 px (14-100% of the image) + 6 x 96 px (5-14%), 3000 prototypes frozen
for the first epoch, Sinkhorn-Knopp with 3 iterations and epsilon 0.05,
temperature 0.1, LARS (lr 4.8 = 0.3 x 4096/256, weight decay 1e-6), 10
warmup epochs and a cosine schedule, no feature queue at this batch size.
"""
from configs import common

EPOCHS = {"imagenet": 800, "coco": common.DATASETS["coco"]["epochs"]}


def get_config(arg: str | None = None):
  name, epochs = common.parse_preset("swav", arg)
  if name == "demo":
    c = common.demo_config("swav", "swav")
    # Multi-crop scaled to the 64 px views: 2 x 64 px + 4 x 32 px (a multiple of
    # the stride 16). 300 prototypes: more than the 64 embedding dimensions, as
    # the paper's 3000 exceed its 128. With fewer prototypes than dimensions an
    # embedding orthogonal to all of them scores every prototype 0, a uniform
    # fixed point (loss = log P) that the demo fell into within 15 steps at 30
    # prototypes (codes_entropy 0.79 -> 1.00); at 300 and 3000 it did not (0.94
    # after 80 steps), though at 300 the codes still drift towards uniform over
    # a few hundred steps (0.93 at step 80, 0.99 at 170; also at peak lr 0.6).
    # 300 is about the batch plus queue (32 + 256) that Sinkhorn spreads over
    # them, as 3000 is for the paper's 4096. Frozen for
    # the first epoch (2500 / 32 = 78 steps); a queue of 8 batches once the
    # first epoch is over, as SwAV does for small batches.
    c.views.update(small_crops=4, small_size=32)
    c.swav.update(num_prototypes=300, freeze_prototypes_steps=78, queue_size=256,
                  queue_start_step=78)
    return c
  c = common.paper_config("swav", "swav", name, epochs or EPOCHS[name])
  images = common.DATASETS[name]["images"]
  c.swav.freeze_prototypes_steps = common.steps_for_epochs(1, images, c.batch_size)
  return c
