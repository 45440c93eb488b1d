"""Background augmentations (Ryali et al. 2021, sec. 2.2 and 4): BG RM, BG Random, BG Swaps.

Applied after every other augmentation, in the input pipeline's batched colour step
(input.py), to the global views only (multi-crop small crops are never touched), each
view independently with probability p_pos. A view's foreground m is its saliency
> config.data.foreground_threshold (views.FOREGROUND); its pixels stay, the rest becomes
  'rm'      a solid gray, one level drawn from U[0, 1] per view;
  'random'  the tiled background (masks/tiled_background.py, moved with the view) of another
            image of the same batch, picked uniformly among the others;
  'swaps'   as 'random', with the two global views' backgrounds from distinct images
            (batch >= 3), plus, for methods with explicit negatives (their Objective's
            `backgrounds` holds 'swaps') and p_neg > 0, one extra negative per image in
            batch[NEGATIVE]:
            m_q * r + (1 - m_q) * q with probability p_neg (q the final query view, r the
            key view of another image of the batch), else r itself, so every query has
            |Q| + 1 negatives (p_neg = 0 adds none, so that p = 0 is the plain method). MoCo:
            it goes through the key network with the keys and is never enqueued
            (objectives/moco.py); SimCLR and DetCon-S: through the network with the views,
            one more negative of each view-1 anchor (simclr.py; DetCon-S pools it under the
            query's own masks, negative_view and contrastive.detcon_nce); never a positive.
            Its global crops hold >= fg_min of the foreground (the paper's FGmin = 0.1,
            MoCo-v2 A.1: augment.salient_crop_box, rule 'fg_min'); config.background.fg_min
            None = FG_MIN[mode], a number = that, for any mode; 0 = unconstrained crops.
With p_pos = p_neg = fg_min = 0 every view is the plain method's, bit for bit, and there
is no extra negative: the plain method exactly.
Random numbers: DRAWS per view and 2 for the negative, per example from its own key
(input.py), so a batch stays a function of (seed, step).
"""
from __future__ import annotations

import dataclasses

from data_pipelines import batch as B
from data_pipelines import views as V
from detcon_jax.errors import ConfigError

MODES = ("none", "rm", "random", "swaps")
NEGATIVE = "bg_negative"   # batch key: [B, S, S, 3] Swaps' extra negative (query-sized)
DRAWS = 3                  # per view: apply?, gray level, which other image
FG_MIN = {"swaps": 0.1}    # default fg_min per mode (paper A.1, MoCo-v2); others 0


@dataclasses.dataclass(frozen=True)
class Settings:
  mode: str
  p_pos: float
  p_neg: float = 0.0
  negative: bool = False     # build batch[NEGATIVE] (swaps on a method with negatives)
  fg_min: float = 0.0        # global crops hold >= this fraction of the foreground


def settings(config) -> Settings | None:
  """config.background -> Settings, or None when off (mode 'none' or no section)."""
  bg = config.get("background", None)
  if bg is None or bg.mode == "none":
    return None
  fg_min = bg.get("fg_min", None)
  return Settings(bg.mode, float(bg.p_pos), float(bg.p_neg),
                  negative=bg.mode == "swaps" and float(bg.p_neg) > 0,
                  fg_min=FG_MIN.get(bg.mode, 0.0) if fg_min is None else float(fg_min))


def needs_tiled(s: Settings | None) -> bool:
  return s is not None and s.mode in ("random", "swaps")


def with_fields(specs, s: Settings | None):
  """The view specs with what the augmentation reads added to the global views, and
  their crops constrained to fg_min of the foreground (rule 'fg_min') when > 0."""
  if s is None:
    return tuple(specs)
  extra = (V.FOREGROUND,) + ((V.BACKGROUND,) if needs_tiled(s) else ())
  crop = dict(min_salient_cover=s.fg_min, salient_rule="fg_min") if s.fg_min > 0 else {}
  return tuple(spec if spec.small else dataclasses.replace(
      spec, fields=spec.fields + tuple(f for f in extra if f not in spec.fields), **crop)
      for spec in specs)


def negative_view(batch: dict, query):
  """(batch, ViewSpec) of batch[NEGATIVE] for a method's forward pass (SimCLR, DetCon-S).

  The negative has the query view's geometry (its pixels are the query's outside m_q),
  so a mask-pooled method pools it under the query's own masks: the batch gets
  '<NEGATIVE>/masks' and '/mask_ids' as aliases of the query's (no copy). Each mask
  anchor (b, k) of the query then meets the same region of a background-matched image:
  the query's background there, another image's foreground where m_q was; with one
  global mask this is SimCLR's image-level negative.
  """
  fields = tuple(f for f in query.fields if f == V.MASKS)
  if fields:
    batch = dict(batch, **{B.key(NEGATIVE, f): batch[B.key(query.name, f)]
                           for f in ("masks", "mask_ids")})
  return batch, V.ViewSpec(NEGATIVE, batch[NEGATIVE].shape[1], fields=fields)


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


def check_hole(manifest: dict, foreground_threshold: float) -> bool:
  """Warn (and return False) when the records' tiled-background hole (saliency > its
  build threshold, masks/background.BUILD_THRESHOLD = 0.2, dilated) is smaller than the
  train-time foreground (saliency > foreground_threshold): pasted backgrounds then keep
  the pixels in between (weak object parts). The hole is deliberately generous and
  fixed at build time, so it holds the foreground of any threshold >= 0.2."""
  import logging
  hole = float(manifest.get("background", {}).get("threshold", 0.0))
  if float(foreground_threshold) < hole:
    logging.warning("config.data.foreground_threshold=%s is below the tiled backgrounds' hole "
                    "threshold %s: pasted backgrounds keep pixels of saliency in between.",
                    foreground_threshold, hole)
    return False
  return True


def validate(config) -> None:
  """One ConfigError line for a mode or probability that does not fit (which methods a
  mode composes with is each Objective's `backgrounds`: core/validation.py)."""
  bg = config.get("background", None)
  if bg is None:
    return
  if bg.mode not in MODES:
    raise ConfigError(f"config.background.mode={bg.mode!r}: choose one of {list(MODES)}.")
  for name in ("p_pos", "p_neg"):
    if not 0.0 <= float(bg[name]) <= 1.0:
      raise ConfigError(f"config.background.{name}={bg[name]!r}: must be in [0, 1] "
                        "(paper: 0.2 for MoCo-v2).")
  fg_min = bg.get("fg_min", None)
  if fg_min is not None and not 0.0 <= float(fg_min) < 1.0:
    raise ConfigError(f"config.background.fg_min={fg_min!r}: must be in [0, 1) (paper: 0.1 "
                      "for MoCo-v2 + BG Swaps; 0: unconstrained crops; None: per mode).")
  if bg.mode == "none":
    return
  views = config.get("views", None)
  if settings(config).fg_min > 0 and views is not None and views.get("min_salient_cover", 0):
    raise ConfigError(f"config.background.fg_min={settings(config).fg_min} and "
                      f"config.views.min_salient_cover={views.min_salient_cover} both constrain "
                      "the crops; set one of them to 0.")
  if bg.mode == "swaps":
    if int(config.batch_size) < 3:
      raise ConfigError(f"config.batch_size={config.batch_size}: BG Swaps needs >= 3 images "
                        "per batch for distinct backgrounds of query and positive.")
