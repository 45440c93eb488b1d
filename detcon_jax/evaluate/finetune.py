"""End-to-end FCN fine-tuning for semantic segmentation (`--evals=seg_finetune`), mIoU.

The model of Revisiting Contrastive Learning A.3 (after He et al.'s MoCo
protocol): the backbone's last stage with stride 1 and dilation 2 (models/
resnet.py dilate_last; output stride 16 for RN50), then two 3x3 convolutions of
256 channels (scaled by the model width) with BN + ReLU and dilation 6
(`dilation=1`: the Cityscapes variant), then a 1x1 convolution to per-pixel
logits, bilinearly upsampled to the input; softmax cross-entropy ignoring the
ignore label. Every layer trains, BN in training mode.

Optimisation as DetCon A.4 (schedule "detcon": SGD momentum 0.9, batch 16,
weight decay 1e-4, lr 0.02 dropped x0.1 at 70% and 90% of the steps);
schedule "revisiting" takes that paper's lr 0.003 dropped at epochs 30 and 40
of 45. Augmentation: random scaling by [0.5, 2.0], horizontal flips, random
crops (padded with the ignore label where the scaled image is smaller). Test
images are scored whole at the evaluation size.

Presets: "demo" fine-tunes the demo's ResNet in minutes on 2 CPU cores (crops of
64 px from the 96 px scenes, a few epochs); "paper" is 45 epochs at 512 px
crops. The papers crop 513 px (TF/DeepLab 'SAME' padding); this torchvision-
layout ResNet needs sides that are multiples of its output stride, so 512.
The train split is held in host memory as uint8 (PASCAL train_aug at 512 px:
about 8 GB).
"""
from __future__ import annotations

import dataclasses
import functools
import time

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import batch as B
from detcon_jax.evaluate import segmentation
from detcon_jax.models.resnet import ResNet, conv_init, normalize_images


@dataclasses.dataclass(frozen=True)
class Preset:
  epochs: float
  crop: int
  batch_size: int = 16


PRESETS = {"demo": Preset(epochs=3, crop=64), "paper": Preset(epochs=45, crop=512)}
# name -> (peak lr, drop points as fractions of the steps)
SCHEDULES = {"detcon": (0.02, (0.7, 0.9)), "revisiting": (0.003, (30 / 45, 40 / 45))}
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
HEAD_CHANNELS = 256
HEAD_DILATION = 6
SCALE_RANGE = (0.5, 2.0)


class FCNHead(nn.Module):
  """Two 3x3 convs (BN + ReLU, dilated) and a 1x1 conv to logits."""
  channels: int
  num_classes: int
  dilation: int = HEAD_DILATION

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dilation
    for i in range(2):
      x = nn.Conv(self.channels, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                  use_bias=False, kernel_init=conv_init, name=f"conv{i + 1}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       name=f"bn{i + 1}")(x)
      x = nn.relu(x)
    return nn.Conv(self.num_classes, (1, 1), name="classifier")(x)


class FCN(nn.Module):
  """Images in [0, 1] [N, H, W, 3] -> logits [N, H, W, num_classes] (bilinear upsampling)."""
  encoder: ResNet
  num_classes: int
  head_channels: int = HEAD_CHANNELS
  dilation: int = HEAD_DILATION

  @nn.compact
  def __call__(self, images, train: bool):
    features = self.encoder(normalize_images(images), train)["stage4"]
    logits = FCNHead(self.head_channels, self.num_classes, self.dilation, name="head")(
        features, train).astype(jnp.float32)
    return segmentation.upsampled_logits(logits, images.shape[1:3])


def build_fcn(encoder: ResNet, num_classes: int, dilation: int = HEAD_DILATION) -> FCN:
  """The FCN on `encoder` (its last stage dilated), head width 256 x the model width."""
  return FCN(encoder.clone(dilate_last=True, parent=None), num_classes,
             head_channels=max(1, int(HEAD_CHANNELS * encoder.width)), dilation=dilation)


def init_variables(fcn: FCN, encoder_variables: dict | None, crop: int, seed: int = 0) -> dict:
  """Random head (and encoder); the encoder's params and BN statistics from
  `encoder_variables` when given (a checkpoint, or the random-init baseline)."""
  x = jnp.zeros((1, crop, crop, 3), jnp.float32)
  variables = dict(jax.jit(lambda r: fcn.init(r, x, train=False))(jax.random.PRNGKey(seed)))
  if encoder_variables is not None:
    for col in ("params", "batch_stats"):
      variables[col] = {**variables[col], "encoder": encoder_variables[col]}
  return {k: variables[k] for k in ("params", "batch_stats")}


def learning_rate(schedule: str, steps: int):
  if schedule not in SCHEDULES:
    raise ValueError(f"Unknown fine-tuning schedule {schedule!r}; choose one of "
                     f"{sorted(SCHEDULES)}.")
  lr, drops = SCHEDULES[schedule]
  return optax.piecewise_constant_schedule(lr, {int(f * steps): 0.1 for f in drops})


def make_optimizer(schedule: str, steps: int, lr_scale: float = 1.0):
  """SGD, momentum 0.9, weight decay 1e-4 on every parameter (torch SGD's weight_decay)."""
  lr = learning_rate(schedule, steps)
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                     optax.sgd(lambda s: lr(s) * lr_scale, momentum=MOMENTUM))


def augment(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, crop: int,
            scale_range=SCALE_RANGE, flip: bool = True):
  """Random scale (bilinear image, nearest label), flip, then a random crop x crop window,
  padded with the ignore label (and black pixels) where the scaled image is smaller."""
  s = rng.uniform(*scale_range)
  h, w = label.shape
  nh, nw = max(1, round(h * s)), max(1, round(w * s))
  image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
  label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
  if flip and rng.random() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  ph, pw = max(crop - nh, 0), max(crop - nw, 0)
  if ph or pw:
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
    label = np.pad(label, ((0, ph), (0, pw)), constant_values=segmentation.IGNORE)
  y = rng.integers(0, label.shape[0] - crop + 1)
  x = rng.integers(0, label.shape[1] - crop + 1)
  return image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


@functools.partial(jax.jit, static_argnames=("fcn", "optimizer"))
def _train_step(variables, opt_state, images, labels, *, fcn, optimizer):
  def loss_fn(params):
    logits, updates = fcn.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                images, train=True, mutable=["batch_stats"])
    return segmentation.cross_entropy(logits, labels), updates["batch_stats"]
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  updates, opt_state = optimizer.update(grads, opt_state, variables["params"])
  return ({"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats},
          opt_state, loss)


@functools.partial(jax.jit, static_argnames=("fcn",))
def _predict(variables, images, *, fcn):
  return jnp.argmax(fcn.apply(variables, images, train=False), -1).astype(jnp.int32)


def predict(fcn: FCN, variables: dict, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Class maps [N, H, W] of float images in [0, 1] (padded to a fixed batch: one compile)."""
  out = []
  for i in range(0, len(images), batch_size):
    x = np.asarray(images[i:i + batch_size], np.float32)
    n = len(x)
    if n < batch_size and len(images) > batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(_predict(variables, x, fcn=fcn))[:n])
  return np.concatenate(out)


def train(fcn: FCN, variables: dict, images: np.ndarray, labels: np.ndarray, *, steps: int,
          crop: int, batch_size: int = 16, schedule: str = "detcon", augmentation: bool = True,
          lr_scale: float = 1.0, seed: int = 0) -> tuple[dict, list[float]]:
  """Fine-tune every layer for `steps` SGD steps on uint8 images [N, H, W, 3] and label
  maps [N, H, W]; returns (variables, per-step losses)."""
  optimizer = make_optimizer(schedule, steps, lr_scale)
  opt_state = optimizer.init(variables["params"])
  rng = np.random.default_rng(seed)
  losses, order = [], np.zeros(0, np.int64)
  batch_size = min(batch_size, len(images))
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(images))])
    idx, order = order[:batch_size], order[batch_size:]
    if augmentation:
      pairs = [augment(rng, images[i], labels[i], crop) for i in idx]
      x = np.stack([p[0] for p in pairs])
      y = np.stack([p[1] for p in pairs])
    else:
      x, y = images[idx], labels[idx]
    x = x.astype(np.float32) / 255.0
    variables, opt_state, loss = _train_step(variables, opt_state, x, y.astype(np.int32),
                                             fcn=fcn, optimizer=optimizer)
    losses.append(loss)
  return variables, [float(v) for v in jax.device_get(losses)]


def load_split(records_dir: str, split: str, image_size: int, batch_size: int = 128):
  """(uint8 images [N, S, S, 3], int32 semantic maps [N, S, S]) of a split, eval reader."""
  from data_pipelines import input as data_input
  images, labels = [], []
  for batch in data_input.eval_iterator(records_dir, split, batch_size=batch_size,
                                        image_size=image_size):
    images.append((np.asarray(batch[B.IMAGE]) * 255 + 0.5).astype(np.uint8))
    labels.append(np.asarray(batch[B.SEMANTIC], np.int32))
  return np.concatenate(images), np.concatenate(labels)


def steps_for(preset: Preset, num_images: int) -> int:
  return max(1, int(round(preset.epochs * num_images / preset.batch_size)))


def evaluate(model: ResNet, encoder_variables: dict, records_dir: str, *, num_classes: int,
             image_size: int, preset: str = "demo", schedule: str = "detcon",
             dilation: int = HEAD_DILATION, steps: int | None = None, seed: int = 0,
             data: dict | None = None) -> dict:
  """Fine-tune from `encoder_variables` on the train split, mIoU on the test split.

  data: {'train': (images, labels), 'test': ...} already loaded (load_split), to
  read the records once for several rows.
  """
  if preset not in PRESETS:
    raise ValueError(f"Unknown fine-tuning preset {preset!r}; choose one of {sorted(PRESETS)}.")
  p = PRESETS[preset]
  data = data or {s: load_split(records_dir, s, image_size) for s in ("train", "test")}
  (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
  num_semantic = num_classes + 1
  segmentation.check_labels(train_y, num_semantic, "train")
  fcn = build_fcn(model, num_semantic, dilation)
  crop = min(p.crop, image_size) if preset == "demo" else p.crop
  steps = steps or steps_for(p, len(train_x))
  variables = init_variables(fcn, encoder_variables, crop, seed)
  t = time.time()
  variables, losses = train(fcn, variables, train_x, train_y, steps=steps, crop=crop,
                            batch_size=p.batch_size, schedule=schedule, seed=seed)
  seconds = time.time() - t
  predictions = predict(fcn, variables, test_x.astype(np.float32) / 255.0)
  lr, drops = SCHEDULES[schedule]
  return {**segmentation.miou(test_y, predictions, num_semantic), "predictions": predictions,
          "train_loss": float(np.mean(losses[-10:])), "steps": steps, "train_seconds": seconds,
          "recipe": (f"{preset}: {steps} steps of batch {p.batch_size}, {crop} px crops, "
                     f"lr {lr} x0.1 at {', '.join(f'{d:.0%}' for d in drops)}, "
                     f"head dilation {dilation}")}
