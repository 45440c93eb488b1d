"""Decoding and image preparation for the build: any input -> uint8 RGB at the stored size.

numpy/PIL only (imported by spawned build workers and Beam workers).
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

DEFAULT_IMAGE_SIZE = 224          # shorter side of stored real images (paper FH scale)
DEFAULT_MIN_SIDE = 32             # smaller inputs are skipped and reported
DEFAULT_MAX_ASPECT = 10.0         # longer/shorter side; beyond it skipped and reported (a
                                  # 3000x40 strip would be stored 16800 px long)


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
  """Any PIL image -> uint8 RGB: grayscale, palette, RGBA (over white), CMYK, 16-bit."""
  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    arr = np.asarray(img).astype(np.float64)
    top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
    arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=2)
  if mode in ("RGBA", "LA", "PA", "P"):
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image_bytes(data: bytes) -> np.ndarray:
  """Decode encoded image bytes fully (truncated data raises here, not later)."""
  import io
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      return to_rgb_uint8(img)


def load_image_file(path: str) -> np.ndarray:
  """Decode a file (local, or gs:// through tf.io.gfile) fully."""
  if "://" in path:
    import tensorflow as tf
    with tf.io.gfile.GFile(path, "rb") as f:
      return decode_image_bytes(f.read())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with Image.open(path) as img:
      img.load()
      return to_rgb_uint8(img)


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """Resize so the shorter side is `size`, keeping the aspect ratio."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(new, Image.BICUBIC))


def prepare(image, image_size: int, min_side: int = DEFAULT_MIN_SIDE,
            max_aspect: float = DEFAULT_MAX_ASPECT):
  """A decoded real image (any channels/dtype) -> (uint8 RGB resized, None) or (None, reason)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=2)
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  image = image[..., :3]
  if image.dtype != np.uint8:
    top = 65535.0 if image.max() > 255 else 255.0
    image = np.clip(image.astype(np.float64) / top * 255 + 0.5, 0, 255).astype(np.uint8)
  h, w = image.shape[:2]
  if min(h, w) < min_side:
    return None, f"too small: {w}x{h} px, shorter side < --min_side={min_side}"
  if max(h, w) > max_aspect * min(h, w):
    return None, (f"extreme aspect ratio: {w}x{h} px, long side > --max_aspect={max_aspect:g} "
                  "x short side")
  return resize_shorter(image, image_size), None
