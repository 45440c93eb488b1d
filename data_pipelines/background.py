"""Background augmentations (Ryali et al. 2021, sec. 2.2 and 4): BG RM, BG Random, BG Swaps.

Applied after every other augmentation, in the input pipeline's batched colour step
(input.py), to the global views only (multi-crop small crops are never touched), each
view independently with probability p_pos. A view's foreground m is its saliency
> config.data.foreground_threshold (views.FOREGROUND); its pixels stay, the rest becomes
  'rm'      a solid gray, one level drawn from U[0, 1] per view;
  'random'  the tiled background (masks/background.py, moved with the view) of another
            image of the same batch, picked uniformly among the others;
  'swaps'   as 'random', with the two global views' backgrounds from distinct images
            (batch >= 3), plus, for methods with explicit negatives (moco_v2, simclr), one extra
            negative per image in batch[NEGATIVE]: m_q * r + (1 - m_q) * q with probability
            p_neg (q the final query view, r the key view of another image of the batch),
            else r itself, so every query has |Q| + 1 negatives. MoCo: it goes through the
            key network with the keys and is never enqueued (objectives/moco.py); SimCLR:
            through the network with the views, a negative of view1's anchors (simclr.py).
            DetCon-S is not yet supported (its negatives are masks, not images).
With p_pos = 0 (and no negative) every view is the plain method's, bit for bit.
Random numbers: DRAWS per view and 2 for the negative, per example from its own key
(input.py), so a batch stays a function of (seed, step).
"""
from __future__ import annotations

import dataclasses

from data_pipelines import batch as B
from data_pipelines import views as V

MODES = ("none", "rm", "random", "swaps")
NEGATIVE = "bg_negative"   # batch key: [B, S, S, 3] Swaps' extra negative (query-sized)
DRAWS = 3                  # per view: apply?, gray level, which other image
# Methods each mode composes with; swaps needs explicit negatives and the hook in the loss.
METHODS = {"rm": ("moco_v2", "byol", "swav", "simclr", "detcon_s", "detcon_b"),
           "random": ("moco_v2", "byol", "swav", "simclr", "detcon_s", "detcon_b"),
           "swaps": ("moco_v2", "simclr")}


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str
  p_pos: float
  p_neg: float = 0.0
  negative: bool = False     # build batch[NEGATIVE] (swaps on a method with negatives)


def settings(config) -> Settings | None:
  """config.background -> Settings, or None when off (mode 'none' or no section)."""
  bg = config.get("background", None)
  if bg is None or bg.mode == "none":
    return None
  return Settings(bg.mode, float(bg.p_pos), float(bg.p_neg), negative=bg.mode == "swaps")


def needs_tiled(s: Settings | None) -> bool:
  return s is not None and s.mode in ("random", "swaps")


def with_fields(specs, s: Settings | None):
  """The view specs with what the augmentation reads added to the global views."""
  if s is None:
    return tuple(specs)
  extra = (V.FOREGROUND,) + ((V.BACKGROUND,) if needs_tiled(s) else ())
  return tuple(spec if spec.small else dataclasses.replace(
      spec, fields=spec.fields + tuple(f for f in extra if f not in spec.fields))
      for spec in specs)


def draws(key, num_views: int):
  """float32 [num_views * DRAWS + 2] uniforms for one example (input.py's make_views)."""
  import tensorflow as tf   # lazy: configs validate without it
  return tf.random.stateless_uniform([num_views * DRAWS + 2], key, dtype=tf.float32)


def _others(u, n, exclude=None):
  """Index of another image per row: i + offset mod n, offset uniform in [1, n - 1]
  (avoiding the offset `exclude` when given: offsets uniform among the n - 2 left)."""
  import tensorflow as tf   # lazy: configs validate without it
  k = n - 1 if exclude is None else n - 2
  off = 1 + tf.minimum(tf.cast(u * tf.cast(k, tf.float32), tf.int32), k - 1)
  if exclude is not None:
    off = tf.where(off >= exclude, off + 1, off)
  return off


def _paste(x, m, fill):
  return m[..., None] * x + (1.0 - m[..., None]) * fill


def apply(batch: dict, names, u, s: Settings) -> dict:
  """Augment views `names` of a batch in place (the first is the query, the second the key).

  u: [B, len(names) * DRAWS + 2] from draws(). Reads '<view>/foreground' (and
  '<view>/background'); adds batch[NEGATIVE] when s.negative.
  """
  import tensorflow as tf   # lazy: configs validate without it
  n = tf.shape(batch[names[0]])[0]
  rows = tf.range(n)
  offsets = []
  for j, v in enumerate(names):
    x, m = batch[v], batch[B.key(v, V.FOREGROUND)]
    on, gray, pick = u[:, DRAWS * j], u[:, DRAWS * j + 1], u[:, DRAWS * j + 2]
    if s.mode == "rm":
      fill = tf.broadcast_to(gray[:, None, None, None], tf.shape(x))
    else:
      off = _others(pick, n, offsets[0] if s.mode == "swaps" and offsets else None)
      offsets.append(off)
      fill = tf.gather(batch[B.key(v, V.BACKGROUND)], (rows + off) % n)
    batch[v] = tf.where((on < s.p_pos)[:, None, None, None], _paste(x, m, fill), x)
  if s.negative:
    q, k = names[0], names[1]
    r = tf.gather(batch[k], (rows + _others(u[:, -1], n)) % n)
    matched = _paste(r, batch[B.key(q, V.FOREGROUND)], batch[q])   # m_q r + (1 - m_q) q
    batch[NEGATIVE] = tf.where((u[:, -2] < s.p_neg)[:, None, None, None], matched, r)
  return batch


def validate(config) -> None:
  """One ConfigError line for a mode, probability or method that does not fit."""
  from configs.common import ConfigError
  bg = config.get("background", None)
  if bg is None:
    return
  if bg.mode not in MODES:
    raise ConfigError(f"config.background.mode={bg.mode!r}: choose one of {list(MODES)}.")
  for name in ("p_pos", "p_neg"):
    if not 0.0 <= float(bg[name]) <= 1.0:
      raise ConfigError(f"config.background.{name}={bg[name]!r}: must be in [0, 1] "
                        "(paper: 0.2 for MoCo-v2).")
  if bg.mode == "none":
    return
  if config.method not in METHODS[bg.mode]:
    why = (" (BG Swaps needs a method with explicit negatives; BYOL, SwAV and DetCon-B "
           "have none)" if bg.mode == "swaps" else "")
    raise ConfigError(f"config.background.mode={bg.mode!r} does not compose with "
                      f"config.method={config.method!r}{why}; it works with "
                      f"{', '.join(METHODS[bg.mode])}.")
  if bg.mode == "swaps":
    if config.get("moco", None) is not None and config.moco.get("symmetric", False):
      raise ConfigError("config.background.mode='swaps' needs config.moco.symmetric=False "
                        "(the background-matched negative belongs to the query view1).")
    if int(config.batch_size) < 3:
      raise ConfigError(f"config.batch_size={config.batch_size}: BG Swaps needs >= 3 images "
                        "per batch for distinct backgrounds of query and positive.")
