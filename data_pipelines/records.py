"""The one TFRecord schema, its lossless PNG codec, and manifest.json.

One tf.train.Example per image:
  image/encoded   bytes   PNG (demo) or JPEG (photos), RGB uint8
  image/height, image/width       int64
  example/index   int64   position of the input in its split's source list
  example/id      bytes   where it came from (file path, tfds key, demo/split/i)
  label           int64   image label, -1 when there is none
  mask/<name>     bytes   16-bit grayscale PNG id map (ids 0..65535, never wrapped)
  gt/instances    bytes   optional 16-bit PNG instance map, 0 = background
  gt/classes      int64[] optional class of instance k at position k-1
  saliency/encoded    bytes   optional 8-bit grayscale PNG saliency map, same H x W as
                              the image (0..255 = 0..1; data_pipelines/masks/saliency.py)
  background/encoded  bytes   optional tiled background, PNG RGB uint8, same H x W as the
                              image (data_pipelines/masks/tiled_background.py)
The reference DetCon code stored FH ids as uint8, silently merging segments in
images with >255 of them; 16-bit PNG keeps them apart and stays compact.

manifest.json beside the shards: schema version, counts and shard files per
split (each with its record count, size in bytes and sha256; manifests written
before those two fields still read), image size, classes, mask names with their
settings, skipped inputs and why.

Schema versions: 1 = the fields above without saliency; 2 adds the optional
saliency field, declared by the manifest's "saliency" entry (detector and
settings), and the optional background field, declared by its "background" entry. A field counts as present only when the manifest declares it, so
version-1 records (and demo records of version 1, which stored the demo's
ground-truth foreground there) read as "no saliency"; `require_field` turns a
missing field into a message with the command that rebuilds the records.

Reproducible bytes: features are serialized with deterministic=True (map keys
sorted), and PNG/JPEG encoding is a pure function of the pixels, so two builds
of the same inputs -- serial, parallel or on Beam -- write identical shards.

Paths may be local or URLs (gs://...): every file operation here goes through
tf.io.gfile, which is also what tf.data reads with. TensorFlow is imported
lazily so spawned build workers stay light.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import struct
import sys
import tempfile

import numpy as np
from PIL import Image

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
IMAGE, FORMAT, HEIGHT, WIDTH = "image/encoded", "image/format", "image/height", "image/width"
INDEX, ID, LABEL = "example/index", "example/id", "label"
MASK_PREFIX = "mask/"
GT_INSTANCES, GT_CLASSES = "gt/instances", "gt/classes"
SALIENCY, BACKGROUND = "saliency/encoded", "background/encoded"
MAX_ID = np.iinfo(np.uint16).max


def encode_ids(id_map: np.ndarray) -> bytes:
  """Lossless 16-bit PNG of an integer id map; refuses ids outside 0..65535."""
  id_map = np.asarray(id_map)
  if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_ID):
    raise ValueError(f"Mask ids must lie in [0, {MAX_ID}] to be stored losslessly; got "
                     f"[{id_map.min()}, {id_map.max()}]. Use coarser segmentation settings.")
  buf = io.BytesIO()
  Image.fromarray(id_map.astype(np.uint16)).save(buf, format="PNG")
  return buf.getvalue()


def decode_ids(data: bytes) -> np.ndarray:
  """int32 id map from encode_ids' bytes (numpy side; tf.data uses decode_png uint16)."""
  return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int32)


def encode_saliency(saliency: np.ndarray) -> bytes:
  """8-bit grayscale PNG of a saliency map: float in [0, 1] (rounded to 1/255) or uint8."""
  saliency = np.asarray(saliency)
  if saliency.dtype != np.uint8:
    if saliency.size and (np.nanmin(saliency) < 0 or np.nanmax(saliency) > 1):
      raise ValueError("Saliency maps must lie in [0, 1] (or be uint8); got "
                       f"[{np.nanmin(saliency)}, {np.nanmax(saliency)}].")
    saliency = np.round(saliency * 255).astype(np.uint8)
  return encode_image(saliency, "png")


def decode_saliency(data: bytes) -> np.ndarray:
  """float32 [H, W] in [0, 1] from encode_saliency's bytes (tf.data: input.py)."""
  return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255.0


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
  buf = io.BytesIO()
  if fmt == "png":
    Image.fromarray(image).save(buf, format="PNG")
  else:
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def example_bytes(*, image: bytes, fmt: str, height: int, width: int, index: int,
                  example_id: str, label: int = -1, masks: dict[str, bytes] | None = None,
                  instances: bytes | None = None, classes=None, saliency: bytes | None = None,
                  background: bytes | None = None) -> bytes:
  """A serialized tf.train.Example in the schema above (encoded fields as bytes)."""
  import tensorflow as tf

  def b(v):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

  def i(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(np.atleast_1d(v))))

  feats = {IMAGE: b(image), FORMAT: b(fmt.encode()), HEIGHT: i(height), WIDTH: i(width),
           INDEX: i(index), ID: b(example_id.encode()), LABEL: i(label)}
  for name, data in (masks or {}).items():
    feats[MASK_PREFIX + name] = b(data)
  if instances is not None:
    feats[GT_INSTANCES] = b(instances)
    feats[GT_CLASSES] = i(np.asarray(classes if classes is not None else [], np.int64))
  if saliency is not None:
    feats[SALIENCY] = b(saliency)
  if background is not None:
    feats[BACKGROUND] = b(background)
  example = tf.train.Example(features=tf.train.Features(feature=feats))
  return example.SerializeToString(deterministic=True)


def feature_spec(mask_names=(), gt=False, saliency=False, background=False) -> dict:
  """tf.io.parse_single_example spec for the fields a reader needs."""
  import tensorflow as tf
  spec = {IMAGE: tf.io.FixedLenFeature([], tf.string),
          INDEX: tf.io.FixedLenFeature([], tf.int64),
          LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}
  for name in mask_names:
    spec[MASK_PREFIX + name] = tf.io.FixedLenFeature([], tf.string)
  if gt:
    spec[GT_INSTANCES] = tf.io.FixedLenFeature([], tf.string)
    spec[GT_CLASSES] = tf.io.VarLenFeature(tf.int64)
  if saliency:
    spec[SALIENCY] = tf.io.FixedLenFeature([], tf.string)
  if background:
    spec[BACKGROUND] = tf.io.FixedLenFeature([], tf.string)
  return spec


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def is_remote(path: str) -> bool:
  """gs://, s3://, ram://... (tf.io.gfile handles them); local paths otherwise."""
  return "://" in str(path)


def join(directory: str, name: str) -> str:
  return posixpath.join(directory, name) if is_remote(directory) else os.path.join(directory, name)


def _gfile():
  import tensorflow as tf
  return tf.io.gfile


def makedirs(directory: str) -> None:
  if is_remote(directory):
    _gfile().makedirs(directory)
  else:
    os.makedirs(directory, exist_ok=True)


def listdir(directory: str) -> list[str]:
  """Names in a directory (local or remote); [] when it does not exist."""
  if is_remote(directory):
    gfile = _gfile()
    return [n.rstrip("/") for n in gfile.listdir(directory)] if gfile.isdir(directory) else []
  return os.listdir(directory) if os.path.isdir(directory) else []


def write_text(path: str, text: str) -> None:
  """Atomic on local disks (temp + rename); a single object write on GCS (also atomic)."""
  if is_remote(path):
    gfile = _gfile()
    if gfile.exists(path):       # some filesystems (ram://) append rather than replace
      gfile.remove(path)
    with gfile.GFile(path, "w") as f:
      f.write(text)
    return
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def read_text(path: str) -> str:
  if is_remote(path):
    with _gfile().GFile(path, "r") as f:
      return f.read()
  with open(path) as f:
    return f.read()


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def write_shard(path: str, serialized) -> dict:
  """TFRecord file of serialized examples at path -> {'bytes', 'sha256'}.

  Written to a local temporary file first (hashed there, so nothing is read
  back from remote storage), then moved into place, so a shard is either
  complete or absent.
  """
  import tensorflow as tf
  local_dir = None if is_remote(path) else os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(suffix=".tfrecord.tmp", dir=local_dir)
  os.close(fd)
  try:
    with tf.io.TFRecordWriter(tmp) as w:
      for data in serialized:
        w.write(data)
    digest, size = hashlib.sha256(), 0
    with open(tmp, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
        size += len(chunk)
    if is_remote(path):
      tf.io.gfile.copy(tmp, path, overwrite=True)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"bytes": size, "sha256": digest.hexdigest()}


def file_digest(path: str) -> dict:
  """{'bytes', 'sha256'} of a file (local or remote)."""
  digest, size = hashlib.sha256(), 0
  with _gfile().GFile(path, "rb") as f:
    while True:
      chunk = f.read(1 << 20)
      if not chunk:
        break
      digest.update(chunk)
      size += len(chunk)
  return {"bytes": size, "sha256": digest.hexdigest()}


def write_manifest(out_dir: str, manifest: dict) -> None:
  """Atomic write, so a half-written manifest never looks complete."""
  write_text(join(out_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(records_dir: str) -> dict:
  """The manifest of a records directory, with a message saying how to make one."""
  path = join(records_dir, MANIFEST)
  if not exists(path):
    raise FileNotFoundError(
        f"No {MANIFEST} in {records_dir!r}: build records first, e.g. "
        f"`python -m data_pipelines.build --source=demo --out={records_dir}`.")
  try:
    manifest = json.loads(read_text(path))
  except ValueError as e:   # cut short (an interrupted copy, a full disk) or edited by hand
    raise ValueError(f"{path} is not valid JSON ({e}); it lists the shards, so the records "
                     "cannot be read without it. Copy it again from where the records came "
                     "from, or rerun the build that made them (python -m data_pipelines.build "
                     f"--source=... --out={records_dir}; its complete shards are kept).") from None
  if not isinstance(manifest, dict):
    raise ValueError(f"{path} is not a records manifest (a JSON object); rebuild the records.")
  if manifest.get("schema_version") not in READABLE_VERSIONS:
    raise ValueError(f"{path} has schema version {manifest.get('schema_version')}, this "
                     f"code reads {list(READABLE_VERSIONS)}; rebuild the records.")
  return manifest


# Optional fields: the manifest key that declares each, and the build flag that adds it.
OPTIONAL_FIELDS = {"saliency": ("saliency", "--saliency=mbd"),
                   "background": ("background", "+background")}   # '+kind': one more --masks kind


class MissingFieldError(ValueError):
  """Records lack an optional field a method needs; the message says how to rebuild."""


def has_field(manifest: dict, field: str) -> bool:
  return bool(manifest.get(OPTIONAL_FIELDS[field][0]))


# Mask kinds a trained model makes from other records, not the build: their command.
MODEL_MASKS = {"learned": "python -m detcon_jax.evaluate.learned_masks"}


def rebuild_command(records_dir: str, manifest: dict, flag: str = "") -> str:
  """The build command that remakes these records (same source and masks) plus `flag`
  (a flag '+KIND' adds KIND to --masks). Records with model-made masks (MODEL_MASKS,
  manifest 'derived_from'): the build of the records they came from, then the model's
  command again."""
  masks = manifest.get("masks", {})
  kinds = sorted({spec.get("kind", name.split("_")[0]) for name, spec in masks.items()}
                 | ({flag[1:]} if flag.startswith("+") else set()))
  flag = "" if flag.startswith("+") else flag
  model_made = {n: spec for n, spec in masks.items() if spec.get("kind") in MODEL_MASKS}
  built = manifest.get("derived_from", records_dir) if model_made else records_dir
  source = manifest.get("source") or "SOURCE"
  parts = ["python -m data_pipelines.build", f"--source={source}", f"--out={built}"]
  kinds = [k for k in kinds if k not in MODEL_MASKS]
  if kinds:
    parts.append(f"--masks={','.join(kinds)}")
  command = " ".join(parts + ([flag] if flag else []))
  for spec in model_made.values():   # the caller quotes the whole: "`build`, then `model`"
    command += (f"`, then `{MODEL_MASKS[spec['kind']]} --records={built} "
                f"--mask_model={spec.get('workdir', 'WORKDIR')} --out=NEW_DIR")
  return command


def require_field(records_dir: str, field: str, manifest: dict | None = None) -> dict:
  """The manifest when the records declare `field` (e.g. 'saliency'); else MissingFieldError
  naming the exact command that rebuilds them with it."""
  if field not in OPTIONAL_FIELDS:
    raise ValueError(f"Unknown optional record field {field!r}; known: {sorted(OPTIONAL_FIELDS)}.")
  manifest = read_manifest(records_dir) if manifest is None else manifest
  if not has_field(manifest, field):
    raise MissingFieldError(
        f"The records at {records_dir!r} have no {field!r} field (schema version "
        f"{manifest.get('schema_version')}); rebuild them with it: "
        f"`{rebuild_command(records_dir, manifest, OPTIONAL_FIELDS[field][1])}`"
        + (" (the demo builds it on first use with config.data.build_demo=True)"
           if manifest.get("source") == "demo" else "") + ".")
  return manifest


def shard_paths(records_dir: str, manifest: dict, split: str) -> list[str]:
  """Shard paths of a split (absolute, or URLs), in build order."""
  if split not in manifest["splits"]:
    raise ValueError(f"Split {split!r} not in {records_dir!r}; available: "
                     f"{sorted(manifest['splits'])}.")
  return [join(records_dir, s["file"]) for s in manifest["splits"][split]["shards"]]



class ShardError(ValueError):
  """A shard is missing or differs from what manifest.json says the build wrote."""


def count_records(path: str) -> int:
  """Records in a TFRecord file, from its framing alone (length headers, payloads
  skipped): a file that ends inside a record raises ShardError."""
  import tensorflow as tf
  size, n, pos = tf.io.gfile.stat(path).length, 0, 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while pos < size:
      header = f.read(8)
      length = struct.unpack("<Q", header)[0] if len(header) == 8 else size
      pos += 8 + 4 + length + 4          # length, its crc, payload, payload crc
      if pos > size:
        raise ShardError(f"{path} ends inside record {n} (truncated or corrupt).")
      f.seek(pos)
      n += 1
  return n


def _shard_problem(path: str, entry: dict, checksums: bool) -> str | None:
  """What is wrong with one shard against its manifest entry, or None.

  It must exist; with 'bytes' in its entry it must have that size, otherwise its
  framing must hold 'count' records; with 'sha256' (and `checksums`) its content
  must hash to it.
  """
  import tensorflow as tf
  if not tf.io.gfile.exists(path):
    return f"listed in {MANIFEST} but missing"
  if "bytes" in entry:
    size = tf.io.gfile.stat(path).length
    if size != entry["bytes"]:
      return f"has {size} bytes, {MANIFEST} says {entry['bytes']} (truncated or replaced)"
  else:
    try:
      n = count_records(path)
    except ShardError:
      return "ends inside a record (truncated or corrupt)"
    if n != entry["count"]:
      return f"holds {n} records, {MANIFEST} says {entry['count']}"
  if checksums and "sha256" in entry and file_digest(path)["sha256"] != entry["sha256"]:
    return f"does not match its sha256 in {MANIFEST} (corrupt or replaced)"
  return None


def shard_problems(records_dir: str, manifest: dict | None = None, splits=None, paths=None,
                   checksums: bool = True) -> list[str]:
  """'FILE: what is wrong' for every shard of `splits` (default all) that does not match
  the manifest (empty: all match); `paths` limits it to those shards (one host's)."""
  manifest = read_manifest(records_dir) if manifest is None else manifest
  out = []
  for split in (manifest["splits"] if splits is None else splits):
    for entry in manifest["splits"][split]["shards"]:
      path = join(records_dir, entry["file"])
      if paths is not None and path not in paths:
        continue
      problem = _shard_problem(path, entry, checksums)
      if problem:
        out.append(f"{entry['file']}: {problem}")
  return out


def verify_shards(records_dir: str, manifest: dict, split: str, paths=None,
                  checksums: bool = True) -> None:
  """Check shards of `split` before reading them (tf.data would skip a missing or short
  shard silently, or retry it forever): ShardError naming the first bad one."""
  problems = shard_problems(records_dir, manifest, [split], paths, checksums)
  if problems:
    name, _, what = problems[0].partition(": ")
    raise ShardError(f"Shard {name} of {records_dir!r}: {what}; restore it, or rebuild the "
                     "records (python -m data_pipelines.build ...).")


def verify(records_dir: str, manifest: dict | None = None) -> list[str]:
  """Every shard of every split against the manifest: shard_problems with checksums."""
  return shard_problems(records_dir, manifest)

def main(argv=None) -> int:
  """python -m data_pipelines.records verify DIR: every shard against manifest.json."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m data_pipelines.records",
                              description="Check built records against their manifest.")
  sub = p.add_subparsers(dest="command", required=True)
  v = sub.add_parser("verify", help="size, record count and sha256 of every shard")
  v.add_argument("records_dir")
  a = p.parse_args(argv)
  try:
    manifest = read_manifest(a.records_dir)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  problems = verify(a.records_dir, manifest)
  shards = sum(len(info["shards"]) for info in manifest["splits"].values())
  for problem in problems:
    print(f"{a.records_dir}/{problem}")
  print(f"{a.records_dir}: {shards - len(problems)} of {shards} shards match {MANIFEST}"
        + ("." if not problems else f"; {len(problems)} do not (rebuild: "
           f"{rebuild_command(a.records_dir, manifest)})."))
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
