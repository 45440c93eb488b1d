"""The embedded demo dataset: shapes on real photographs, offline and deterministic.

Backgrounds are random crops of photographs that installed packages ship in
their wheels (scikit-image, scikit-learn, matplotlib); which of them load is
checked at run time and nothing is ever downloaded. Each image holds 1 to 4
foreground objects from NUM_CLASSES shape classes with random scale, position,
rotation, overlap and texture (solid, striped, or a patch of another photo).

Every example is a pure function of (seed, split, index), so any worker can
generate any slice and the build is reproducible and resumable. The image
label is the class of the object with the largest visible area; objects are
made big (the last, topmost object has radius 30-40 % of the side, the others
14-28 %) so the label is learnable from pixels.
numpy/PIL/skimage only: this module is imported by spawned build workers.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
from PIL import Image
from skimage.draw import polygon2mask

CLASSES = ("disc", "square", "triangle", "star", "ring", "cross", "ellipse",
           "hexagon", "crescent", "diamond", "arrow", "lshape")
NUM_CLASSES = len(CLASSES)
SPLITS = ("train", "test")
VERSION = 2              # bump when example() changes, so stale demo records rebuild
DEFAULTS = dict(size=96, num_train=2500, num_test=500, seed=0, bg_correlation=0.0,
                max_objects=4, nuisance_texture=0.2)
_PHOTO_SIDE = 256        # photos are pre-shrunk so crops are cheap


def _regular(n, start=np.pi / 2):
  t = start + 2 * np.pi * np.arange(n) / n
  return np.stack([np.cos(t), np.sin(t)], 1)


def _star():
  outer, inner = _regular(5), 0.45 * _regular(5, np.pi / 2 + np.pi / 5)
  return np.stack([outer, inner], 1).reshape(-1, 2)


# Unit-radius polygons (x, y); analytic shapes are handled in _shape_mask.
_POLYGONS = {
    "square": np.array([[-.75, -.75], [.75, -.75], [.75, .75], [-.75, .75]]),
    "triangle": _regular(3),
    "star": _star(),
    "cross": np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3],
                       [.3, 1], [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]]),
    "hexagon": _regular(6),
    "diamond": np.array([[0, -1], [.5, 0], [0, 1], [-.5, 0]]),
    "arrow": np.array([[-1, -.25], [.1, -.25], [.1, -.7], [1, 0], [.1, .7], [.1, .25],
                       [-1, .25]]),
    "lshape": np.array([[-.8, -.9], [-.25, -.9], [-.25, .35], [.8, .35], [.8, .9],
                        [-.8, .9]]),
}


@functools.lru_cache(maxsize=1)
def photos() -> tuple[tuple[str, np.ndarray], ...]:
  """(name, uint8 RGB) of every bundled photograph that loads offline."""
  loaders = {}
  try:
    import skimage.data as sd
    for name in ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
                 "hubble_deep_field"):
      loaders[name] = getattr(sd, name)
  except ImportError:
    pass

  def _sklearn(i):
    from sklearn.datasets import load_sample_images
    return load_sample_images().images[i]

  loaders["china"] = functools.partial(_sklearn, 0)
  loaders["flower"] = functools.partial(_sklearn, 1)

  def _grace():
    import matplotlib.cbook as cbook
    with cbook.get_sample_data("grace_hopper.jpg") as f:
      return np.asarray(Image.open(f).convert("RGB"))

  loaders["grace_hopper"] = _grace
  out = []
  for name, load in loaders.items():
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = load()
      if isinstance(img, tuple):          # stereo_motorcycle: (left, right, disparity)
        img = img[0]
      img = np.asarray(img)
      if img.ndim != 3 or img.shape[2] < 3:
        continue
      pil = Image.fromarray(img[..., :3].astype(np.uint8))
      pil.thumbnail((_PHOTO_SIDE * 2, _PHOTO_SIDE * 2), Image.BILINEAR)
      out.append((name, np.asarray(pil)))
    except Exception:                     # a photo needing the network: leave it out
      continue
  if not out:
    raise RuntimeError("No bundled photographs could be loaded (scikit-image, "
                       "scikit-learn or matplotlib sample data); reinstall them.")
  return tuple(out)


def _crop(rng, photo, size, min_frac=0.3):
  """A random square crop of `photo` resized to size x size."""
  h, w = photo.shape[:2]
  side = int(min(h, w) * rng.uniform(min_frac, 1.0))
  y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  pil = Image.fromarray(photo[y:y + side, x:x + side])
  return np.asarray(pil.resize((size, size), Image.BILINEAR))


def _shape_mask(cls, size, cy, cx, radius, angle):
  name = CLASSES[cls]
  c, s = np.cos(angle), np.sin(angle)
  if name in _POLYGONS:
    pts = _POLYGONS[name] @ np.array([[c, s], [-s, c]]) * radius
    return polygon2mask((size, size), pts[:, ::-1] + [cy, cx])
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  dy, dx = (yy - cy) / radius, (xx - cx) / radius
  u, v = c * dx + s * dy, -s * dx + c * dy
  r2 = u * u + v * v
  if name == "disc":
    return r2 <= 0.8
  if name == "ring":
    return (r2 <= 1.0) & (r2 >= 0.36)
  if name == "ellipse":
    return (u * u) + (v / 0.5) ** 2 <= 1.0
  if name == "crescent":
    return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.6)
  raise ValueError(name)


# Each class has its own surface pattern (in random colours) besides its own
# shape: colour is a nuisance the augmentations teach invariance to, while
# pattern and shape carry the class, as parts and textures do in real scenes.
PATTERNS = ("stripes", "checker", "dots", "rings", "zigzag", "solid")


def _pattern(name, size, cy, cx, period, angle):
  """Boolean [S, S] two-colour pattern in the object's own frame."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  c, s = np.cos(angle), np.sin(angle)
  u, v = (c * (xx - cx) + s * (yy - cy)) / period, (-s * (xx - cx) + c * (yy - cy)) / period
  if name == "stripes":
    return np.floor(u) % 2 == 0
  if name == "checker":
    return (np.floor(u) + np.floor(v)) % 2 == 0
  if name == "dots":
    return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.1
  if name == "rings":
    return np.floor(np.hypot(u, v)) % 2 == 0
  if name == "zigzag":
    return np.floor(u + 0.5 * np.abs(((v % 2) - 1))) % 2 == 0
  return np.ones((size, size), bool)


def _texture(rng, size, photo_list, cls, cy, cx, radius, angle, nuisance):
  """Class pattern in two random colours; with prob. `nuisance` a photo patch or solid."""
  a, b = rng.integers(0, 256, (2, 3), dtype=np.uint8)
  if rng.uniform() < nuisance:
    if rng.uniform() < 0.5:
      return np.broadcast_to(a, (size, size, 3))
    return _crop(rng, photo_list[rng.integers(len(photo_list))][1], size, 0.1)
  on = _pattern(PATTERNS[cls % len(PATTERNS)], size, cy, cx, radius / 2.5, angle)
  return np.where(on[..., None], a, b)


def example(split: str, index: int, *, size=96, seed=0, bg_correlation=0.0,
            max_objects=4, nuisance_texture=0.2) -> dict:
  """One demo scene, a pure function of its arguments.

  Returns image uint8 [S,S,3], instances uint16 [S,S] (0 background, k = k-th
  object), classes int64 [K] (class of instance k at position k-1), label
  (class of the largest visible object), saliency uint8 [S,S] (255 on objects),
  and background (name of the photo). With bg_correlation=p, a train image whose
  label is c gets photo c mod #photos with probability p (test stays uniform).
  """
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  photo_list = photos()
  n = int(rng.integers(1, max_objects + 1))
  instances = np.zeros((size, size), np.uint16)
  classes, poses = [], []
  for k in range(n):                 # the last object is the big one, drawn on top
    cls = int(rng.integers(NUM_CLASSES))
    main = k == n - 1
    radius = size * (rng.uniform(0.38, 0.48) if main else rng.uniform(0.1, 0.18))
    cy, cx = rng.uniform(*((0.4, 0.6) if main else (0.15, 0.85)), 2) * size
    angle = rng.uniform(0, 2 * np.pi)
    mask = _shape_mask(cls, size, cy, cx, radius, angle)
    classes.append(cls)
    poses.append((cy, cx, radius, angle))
    instances[mask] = k + 1
  visible = np.bincount(instances.ravel(), minlength=n + 1)[1:]
  keep = np.flatnonzero(visible > 0)          # drop objects hidden behind others
  remap = np.zeros(n + 1, np.uint16)
  remap[keep + 1] = np.arange(1, len(keep) + 1)
  instances = remap[instances]
  classes = np.asarray(classes, np.int64)[keep]
  label = int(classes[np.argmax(visible[keep])])

  if split == "train" and bg_correlation > 0 and rng.uniform() < bg_correlation:
    photo_id = label % len(photo_list)
  else:
    photo_id = int(rng.integers(len(photo_list)))
  image = _crop(rng, photo_list[photo_id][1], size).copy()
  for new_id, k in enumerate(keep, start=1):
    region = instances == new_id
    texture = _texture(rng, size, photo_list, int(classes[new_id - 1]), *poses[k],
                       nuisance_texture)
    image[region] = texture[region]
  return dict(image=image, instances=instances, classes=classes, label=label,
              saliency=np.where(instances > 0, 255, 0).astype(np.uint8),
              background=photo_list[photo_id][0])
