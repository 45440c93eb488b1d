"""SwAV (Caron et al. 2020). Presets: demo (CPU minutes; crop + flip views, see
below), bench (demo x 5), imagenet[-EPOCHS], coco[-EPOCHS].

Paper settings (800-epoch ImageNet model): ResNet-50, batch 4096, multi-crop
2 x 224 px (14-100% of the image) + 6 x 96 px (5-14%), 3000 prototypes frozen
for the first epoch, Sinkhorn-Knopp with 3 iterations and epsilon 0.05,
temperature 0.1, LARS on every parameter (lr 4.8 = 0.3 x 4096/256, weight decay 1e-6), 10
warmup epochs and a cosine schedule, no feature queue at this batch size.
"""
from configs import common

EPOCHS = {"imagenet": 800, "coco": common.DATASETS["coco"]["epochs"]}


@common.with_bench
def get_config(arg: str | None = None):
  name, epochs = common.parse_preset("swav", arg)
  c = _get_config(name, epochs)
  # main_swav.py wraps SGD in apex LARC over model.parameters(): the trust ratio
  # (and weight decay) on every parameter, batch norm and biases included. With
  # BN and biases excluded, their steps are lr x gradient, unbounded by the trust
  # ratio (lr 4.8 in the demo): the demo's embeddings collapsed (mean cosine
  # 0.40 -> 0.93 in steps 10-20), but not with LARS on every parameter (0.26-0.67).
  c.optimizer.exclude_1d = False
  return c


def _get_config(name, epochs):
  if name == "demo":
    c = common.demo_config("swav", "swav")
    # Multi-crop scaled to the 64 px views: 2 x 64 px + 4 x 32 px (a multiple of
    # the stride 16). 300 prototypes: more than the 64 embedding dimensions, as
    # the paper's 3000 exceed its 128 (with 30 the embeddings went orthogonal to
    # every prototype within 15 steps: uniform codes, loss = log P). A queue of 8
    # batches once the first epoch (2500 / 32 = 78 steps) is over, as SwAV does
    # for small batches.
    # epsilon 0.02, not the paper's 0.05: at batch 32 the embeddings of a batch
    # differ by cosines of ~0.1 across prototypes, about epsilon, so at 0.05 the
    # codes start nearly uniform (codes_entropy 0.84 at step 10) and the loss is
    # best lowered by moving every embedding to the prototypes' flattest
    # direction (prediction_entropy 0.96, as computed for 300 random prototypes
    # in 64 dimensions); the codes then stay uniform (0.94-0.98, loss >= log P).
    # Prototypes frozen for the whole run, not the paper's first epoch: released
    # at step 78 (epsilon 0.02), they drifted until every embedding scored them
    # alike (prediction_entropy 0.9995, codes 0.98 from step ~270; kNN 10.2%,
    # linear 18.0%); frozen, the codes stayed 0.73-0.95 (kNN 16.0%, linear 21.0%
    # vs 16.4% / 13.2% at random init; README, SwAV).
    # Crop + flip only, not the paper's colour distortion (jitter 0.8, grayscale,
    # blur): on the demo the two colour-distorted views of an image barely agree
    # (view_agreement 0.48-0.56 at step 400 in six colour runs, 0.52 at random
    # init; 0.5 = not at all), so no prediction of the other view's codes beats
    # log P: the loss ended above it in every colour setting tried (5.76-6.00 at
    # step 400, log 300 = 5.70; docs/results.md, SwAV). Without colour the views
    # agree (0.79 at init, 0.93 at step 400) and the loss ends 0.65 below log P,
    # with linear 21.8% (21.0% with colour, 13.2% at random init; seed 0).
    # --config.data.augment=swav restores the paper's colour distortion.
    c.data.augment = "supervised"
    c.views.update(small_crops=4, small_size=32)
    # freeze_prototypes_fraction=1.0: frozen for the whole run at any --config.steps (the
    # bench preset's 2000 included); queue_start_step stays one epoch of the demo data.
    c.swav.update(num_prototypes=300, freeze_prototypes_fraction=1.0, queue_size=256,
                  queue_start_step=78, epsilon=0.02)
    return c
  c = common.paper_config("swav", "swav", name, epochs or EPOCHS[name])
  # The first epoch, as a fraction of the run (like the warmup) so that --config.steps
  # scales it; --config.swav.freeze_prototypes_steps=N fixes it.
  epoch = common.steps_for_epochs(1, common.DATASETS[name]["images"], c.batch_size)
  c.swav.freeze_prototypes_fraction = epoch / c.steps
  return c
