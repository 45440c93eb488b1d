"""Masks from a trained encoder: one offline round of DetCon's "virtuous crescendo".

  python -m detcon_jax.evaluate.learned_masks --records=DIR --mask_model=WORKDIR
      --out=NEW_DIR [--k=16] [--position_weight=0.5] [--colour_weight=0] [--step=N]
      [--nodilated] [--image_size=N]

DetCon's power follows how well its masks align with objects (its section 5), and
its own features may segment better than FH. Per image: the trained encoder's
dense features of the last stage (dilated, as retrieval and seg_linear use them:
evaluate/features.py), L2-normalised, with the pixel position (and optionally the
colour) appended, clustered into K segments by K-means (models/kmeans.py), the
assignment nearest-neighbour upsampled to the image and relabelled 0..n-1.

The command writes NEW_DIR = the records at DIR plus one more mask field,
`learned` (a 16-bit PNG id map like every mask source; replaced if DIR already
has one, e.g. a second round), and a manifest that names the workdir, step and
settings that made it; `--config.data.records_dir=NEW_DIR
--config.data.mask_source=learned` trains on them.

It sits in the evaluate layer, not in data_pipelines/build.py: the mask needs a
checkpoint and the encoder (detcon_jax.core, models), which the data layer may not
import (pyproject.toml's layer contract). Every other field of a record is copied
byte for byte (the Example gains one feature, serialized as records.example_bytes
does), so shard names, counts and order are those of DIR.

Options (defaults are a first choice, not yet measured against ABO or training):
  k                K-means clusters per image (16: DetCon samples 16 masks per image)
  position_weight  scale of the (row, col) position in [0, 1]^2 appended to the unit
                   features: 0 clusters by appearance only (segments may be scattered);
                   larger values give compact, grid-like segments
  colour_weight    scale of the mean RGB in [0, 1] over the feature cell (0: off)
  dilated          True: the last stage dilated (twice the feature resolution); False:
                   the network's own output stride, the maps online masks cluster
                   (with --k=8 --position_weight=0 --image_size=<the view size>, the
                   online rule applied to the whole image, for its ABO)
  iterations, init Lloyd iterations and the seeding (kmeans.INITS); seed: per image,
                   fold_in(seed, split, example index), so a mask does not depend on
                   the batch it was computed in
Images are resized to a square of the records' image size (a multiple of the
encoder's stride) for the encoder; the segment map is upsampled to each image's
own height and width.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import records
from detcon_jax.core import sharding
from detcon_jax.errors import InputError
from detcon_jax.evaluate import features as F
from detcon_jax.evaluate import retrieval
from detcon_jax.models import kmeans

NAME = "learned"          # the mask field (config.data.mask_source=learned); a key
                          # of records.MODEL_MASKS
K = 16
POSITION_WEIGHT = 0.5
COLOUR_WEIGHT = 0.0
BATCH_SIZE = 64


def relabel(ids: jax.Array, k: int) -> jax.Array:
  """Cluster ids [B, ...] in [0, k) -> consecutive ids 0..n-1 per image, in cluster order
  (K-means leaves empty clusters; DetCon samples among the ids present)."""
  b = ids.shape[0]
  flat = ids.reshape(b, -1)
  present = jnp.zeros((b, k), bool).at[jnp.arange(b)[:, None], flat].set(True)
  new = jnp.cumsum(present, axis=1) - 1
  return jnp.take_along_axis(new, flat, axis=1).reshape(ids.shape).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("size", "k", "position_weight", "colour_weight",
                                             "iterations", "init"))
def cluster_features(keys: jax.Array, features: jax.Array, images: jax.Array | None = None, *,
                     size: tuple[int, int] | None = None, k: int = K,
                     position_weight: float = POSITION_WEIGHT,
                     colour_weight: float = COLOUR_WEIGHT,
                     iterations: int = kmeans.ITERATIONS, init: str = "kmeans++") -> jax.Array:
  """Segment ids int32 [B, *size] (size None: the feature grid) from dense features
  [B, h, w, C]: unit features ++ position_weight * (row, col) [++ colour_weight * RGB of
  `images` [B, H, W, 3] in [0, 1] averaged over each cell], K-means per image with its
  key (keys [B, 2]), nearest upsampling, ids relabelled 0..n-1."""
  b, h, w, _ = features.shape
  points = kmeans.feature_points(features, position_weight)
  if colour_weight:
    if images is None:
      raise ValueError("colour_weight > 0 needs the images.")
    colour = jax.image.resize(images.astype(jnp.float32), (b, h, w, 3), "linear", antialias=True)
    points = jnp.concatenate([points, colour_weight * colour.reshape(b, h * w, 3)], -1)
  assignment, _ = jax.vmap(lambda key, p: kmeans.kmeans(key, p, k, iterations, init))(keys,
                                                                                     points)
  ids = assignment.reshape(b, h, w)
  if size is not None:
    ids = retrieval.upsample_nearest(ids, tuple(size))
  return relabel(ids, k)


def learned_masks(feature_fn, images, key: jax.Array, **options) -> jax.Array:
  """int32 [B, H, W] segment ids of images [B, H, W, 3] in [0, 1], from
  feature_fn(images) -> dense features [B, h, w, C] (encoder_features, or a stand-in);
  options: cluster_features' (k, position_weight, colour_weight, iterations, init)."""
  images = jnp.asarray(images, jnp.float32)
  keys = jax.random.split(key, images.shape[0])
  return cluster_features(keys, feature_fn(images), images, size=tuple(images.shape[1:3]),
                          **options)


def encoder_features(model, variables, mesh=None, dilated: bool = True):
  """images [B, H, W, 3] in [0, 1] (B a multiple of the devices) -> the (dilated) last
  stage [B, h, w, C] of `model` with `variables` (BN frozen), batch-sharded."""
  mesh = mesh or sharding.make_mesh(jax.local_devices())
  fn = F.make_feature_fn(model.clone(dilate_last=dilated), mesh, spatial=True)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  return lambda images: fn(variables, images)[F.SPATIAL]


# --- The offline round: records -> records + `learned` ---------------------------

def _decode(example) -> np.ndarray:
  """uint8 [H, W, 3] of a record's image (PNG or JPEG)."""
  import tensorflow as tf
  feature = example.features.feature
  if records.IMAGE not in feature:
    raise InputError("a record has no image (field image/encoded); learned masks need the "
                     "images: rebuild the records with python -m data_pipelines.build.")
  return tf.io.decode_image(feature[records.IMAGE].bytes_list.value[0], channels=3,
                            expand_animations=False).numpy()


def _resized(image: np.ndarray, side: int) -> np.ndarray:
  """float32 [side, side, 3] in [0, 1]: the whole image, for the encoder."""
  from PIL import Image
  if image.shape[:2] != (side, side):
    image = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR))
  return image.astype(np.float32) / 255.0


def _shard_masks(path, feature_fn, split_key, image_size, batch_size, options):
  """(serialized examples with the learned field, images done) for one shard; every
  batch is padded to batch_size (one compilation)."""
  import tensorflow as tf
  examples = [tf.train.Example.FromString(raw.numpy())
              for raw in tf.data.TFRecordDataset(path)]
  out = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    images = [_decode(e) for e in chunk]
    batch = np.zeros((batch_size, image_size, image_size, 3), np.float32)
    batch[:len(chunk)] = [_resized(im, image_size) for im in images]
    index = [e.features.feature[records.INDEX].int64_list.value[0] for e in chunk]
    index += [0] * (len(batch) - len(chunk))
    keys = jax.vmap(lambda i: jax.random.fold_in(split_key, i))(jnp.asarray(index))
    grid = np.asarray(cluster_features(keys, feature_fn(jnp.asarray(batch)), jnp.asarray(batch),
                                       **options))
    for e, im, ids in zip(chunk, images, grid):
      full = retrieval.upsample_nearest(ids[None], im.shape[:2])[0]
      e.features.feature[records.MASK_PREFIX + NAME].bytes_list.value[:] = [
          records.encode_ids(full)]
      out.append(e.SerializeToString(deterministic=True))
  return out, len(examples)


def write_learned_records(records_dir: str, workdir: str, out_dir: str, *, step=None,
                          k: int = K, position_weight: float = POSITION_WEIGHT,
                          colour_weight: float = COLOUR_WEIGHT,
                          iterations: int = kmeans.ITERATIONS, init: str = "kmeans++",
                          seed: int = 0, image_size: int | None = None, dilated: bool = True,
                          batch_size: int = BATCH_SIZE, progress: bool = True) -> dict:
  """records_dir + the `learned` mask of workdir's checkpoint -> out_dir (new); returns
  the new manifest. Errors a user can fix are InputError / FileNotFoundError /
  WorkdirError with the fix in the message."""
  from detcon_jax.core import checkpointing
  from detcon_jax.evaluate import run
  from detcon_jax.models.resnet import output_stride

  if records.exists(out_dir):
    partial = not records.exists(records.join(out_dir, records.MANIFEST))
    raise InputError(f"--out={out_dir} exists; learned masks go into a new directory (the "
                     "records at --records stay as they are): choose another --out"
                     + (" (it has no manifest.json: an interrupted round; delete it and "
                        "rerun)." if partial and records.listdir(out_dir) else "."))
  if init not in kmeans.INITS:
    raise InputError(f"--init={init}: choose one of {sorted(kmeans.INITS)}.")
  if k < 1 or iterations < 0 or batch_size < 1:
    raise InputError(f"--k={k}, --iterations={iterations} and --batch_size={batch_size} must "
                     "be positive (iterations may be 0).")
  manifest = records.read_manifest(records_dir)
  total = sum(int(s.get("count", 0)) for s in manifest.get("splits", {}).values())
  if not total:
    raise InputError(f"The records at {records_dir!r} hold no images ({records.MANIFEST} lists "
                     "no examples); build them first (python -m data_pipelines.build).")
  for split in manifest["splits"]:
    records.verify_shards(records_dir, manifest, split)
  config, model, variables, step = checkpointing.restore_encoder(workdir, step)
  stride = output_stride(model.stem_pool)
  image_size = run.resolve_settings(run.Settings(image_size=image_size), manifest,
                                    stride=stride).image_size
  mesh = sharding.make_mesh(jax.local_devices())
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
  feature_fn = encoder_features(model, variables, mesh, dilated)
  options = dict(k=k, position_weight=float(position_weight),
                 colour_weight=float(colour_weight), iterations=iterations, init=init)
  t0, done = time.time(), 0
  records.makedirs(out_dir)
  splits = {}
  for split_number, (split, info) in enumerate(sorted(manifest["splits"].items())):
    split_key = jax.random.fold_in(jax.random.PRNGKey(seed), split_number)
    shards = []
    for entry in info["shards"]:
      serialized, n = _shard_masks(records.join(records_dir, entry["file"]), feature_fn,
                                   split_key, image_size, batch_size, options)
      digest = records.write_shard(records.join(out_dir, entry["file"]), serialized)
      shards.append(dict(entry, count=n, **digest))
      done += n
      if progress:
        print(f"learned masks: {split} {entry['file']} ({done}/{total} images)",
              file=sys.stderr, flush=True)
    splits[split] = dict(info, shards=shards)
  seconds = time.time() - t0
  replaced = manifest.get("masks", {}).get(NAME)
  spec = dict(kind=NAME, workdir=os.path.abspath(workdir) if "://" not in workdir else workdir,
              step=int(step), method=config.method, model=config.model.to_dict(),
              features=(f"{F.FEATURE_STAGE}, last stage dilated (stride {stride // 2})"
                        if dilated else f"{F.FEATURE_STAGE}, stride {stride}"),
              image_size=image_size, seed=seed, **options,
              seconds_per_image=round(seconds / total, 4))
  if replaced:
    spec["replaces"] = replaced
  parent = records_dir if "://" in records_dir else os.path.abspath(records_dir)
  new = dict(manifest, splits=splits, masks=dict(manifest.get("masks", {}), **{NAME: spec}),
             derived_from=manifest.get("derived_from", parent))   # the build's records
  #   (a second round keeps the first's: records.rebuild_command builds them anew)
  new = json.loads(json.dumps(new))          # ConfigDict leaves -> plain JSON
  records.write_manifest(out_dir, new)       # last: its presence means complete
  return new


def _main(argv):
  del argv
  from detcon_jax import cli
  from detcon_jax.core import checkpointing
  f = _FLAGS
  try:
    m = write_learned_records(
        f.records.value, f.mask_model.value, f.out.value, step=f.step.value, k=f.k.value,
        position_weight=f.position_weight.value, colour_weight=f.colour_weight.value,
        iterations=f.iterations.value, init=f.init.value, seed=f.seed.value,
        image_size=f.image_size.value, dilated=f.dilated.value, batch_size=f.batch_size.value)
  except (ValueError, OSError, KeyError, InputError, checkpointing.WorkdirError) as e:
    cli.fail(e)
  spec = m["masks"][NAME]
  counts = ", ".join(f"{s}: {v['count']}" for s, v in m["splits"].items())
  print(f"Wrote {f.out.value}: {counts}; mask '{NAME}' (K={spec['k']}) from "
        f"{spec['workdir']} step {spec['step']}"
        + (" (replacing the records' previous one)" if "replaces" in spec else "")
        + f"; {spec['seconds_per_image'] * 1000:.1f} ms/image. Train on it: "
        f"--config.data.records_dir={f.out.value} --config.data.mask_source={NAME}")


class _Flags:
  """absl flags, defined only when this module is the program (python -m ...)."""

  def __init__(self):
    from absl import flags
    d = flags
    self.records = d.DEFINE_string("records", None, "Records directory to add masks to.")
    self.mask_model = d.DEFINE_string("mask_model", None, "Training workdir whose checkpoint "
                                      "makes the masks.")
    self.out = d.DEFINE_string("out", None, "New records directory (must not exist).")
    self.step = d.DEFINE_integer("step", None, "Checkpoint step (default: the newest that "
                                 "restores).")
    self.k = d.DEFINE_integer("k", K, "K-means clusters per image.")
    self.position_weight = d.DEFINE_float("position_weight", POSITION_WEIGHT,
                                          "Weight of the (row, col) position in [0, 1] appended "
                                          "to the unit features (0: appearance only).")
    self.colour_weight = d.DEFINE_float("colour_weight", COLOUR_WEIGHT,
                                        "Weight of the cell's mean RGB in [0, 1] (0: off).")
    self.iterations = d.DEFINE_integer("iterations", kmeans.ITERATIONS, "Lloyd iterations.")
    self.init = d.DEFINE_string("init", "kmeans++", f"K-means seeding: {sorted(kmeans.INITS)}.")
    self.seed = d.DEFINE_integer("seed", 0, "Seed of the K-means seeding.")
    self.image_size = d.DEFINE_integer("image_size", None, "Encoder input side (default: the "
                                       "records' size rounded down to the model's stride).")
    self.dilated = d.DEFINE_bool("dilated", True, "Dilate the last stage (twice the feature "
                                 "resolution); --nodilated: the network's own stride, as "
                                 "online masks use.")
    self.batch_size = d.DEFINE_integer("batch_size", BATCH_SIZE, "Images per batch.")
    d.mark_flags_as_required(["records", "mask_model", "out"])


_FLAGS = None

if __name__ == "__main__":
  from detcon_jax import cli as _cli
  _FLAGS = _Flags()
  _cli.run(_main)
