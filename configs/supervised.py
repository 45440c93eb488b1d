"""The supervised baseline (DetCon Fig. 4, red). Presets: demo (CPU minutes), bench (demo x 5),
imagenet[-EPOCHS].

The same ResNet as the self-supervised presets, trained with cross-entropy on
the records' image labels through the same trainer (detcon_jax/objectives/
supervised.py). demo: the demo's 12 classes as multi-label targets (every class
present in the scene; sigmoid cross-entropy), one crop + flip view, SGD
momentum 0.9 with a cosine schedule; imagenet: softmax cross-entropy on the
1000 classes, 90 epochs of batch 1024 SGD (lr 0.1 x batch/256, wd 1e-4,
5 warmup epochs: Goyal et al. 2017 with a cosine decay), ResNet-50 at 224 px.
"""
from configs import common

DEMO_LR = 0.4          # per 256 images: 0.05 at the demo's batch of 32
IMAGENET_EPOCHS = 90
IMAGENET_BATCH = 1024


@common.with_bench
def get_config(arg: str | None = None):
  name, epochs = common.parse_preset("supervised", arg)
  if name == "demo":
    c = common.demo_config("supervised", "simclr")
    c.supervised.update(num_classes=12, multilabel=True)
    c.data.multi_hot_labels = True
    c.optimizer.update(name="sgd", base_lr=DEMO_LR, weight_decay=1e-4)
  elif name == "imagenet":
    c = common.paper_config("supervised", "simclr", "imagenet", epochs or IMAGENET_EPOCHS,
                            batch_size=IMAGENET_BATCH)
    c.supervised.update(num_classes=1000, multilabel=False)
    warmup = common.steps_for_epochs(5, common.IMAGENET_TRAIN_IMAGES, IMAGENET_BATCH)
    c.optimizer.update(name="sgd", base_lr=0.1, weight_decay=1e-4, schedule="cosine",
                       warmup_fraction=warmup / c.steps)
  else:
    raise common.ConfigError(f"Unknown preset {arg!r} for supervised; use demo or "
                             "imagenet[-EPOCHS] (configs/supervised.py:imagenet-90).")
  c.data.augment = "supervised"
  return c
