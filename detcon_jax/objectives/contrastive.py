"""Contrastive math shared by the objectives: pure functions of latents.

Scale convention (as the SimCLR, BYOL and DetCon reference code): a symmetric
loss is the *sum* of its two directions (view 1 -> view 2 and back), each
averaged over its anchors. So NT-Xent here is twice the mean over the 2N
anchors; the factor only rescales gradients.

Negatives span the whole batch passed in. `num_shards > 1` restricts them to
contiguous blocks of `B / num_shards` images (the per-device slices of a
global batch sharded on the data axis: DetCon Table 5, "local negatives").
It is computed block-diagonally (reshape to [shards, B/shards, ...] and vmap),
so local negatives also cost less, and anchors are still averaged over the
global batch.

Chance level (the metric 'chance' of every contrastive objective): the loss when
every similarity is equal, so that each anchor's softmax is uniform over its
candidates: log(candidates per anchor), averaged over anchors and summed over
directions as the loss is. It is the loss function itself applied to `uniform`
latents, so it counts exactly the candidates the loss counts (excluded pairs,
local negatives, duplicates, invalid boxes, BG Swaps' extra negative).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LARGE_NEGATIVE = -1e9  # logit of an excluded pair (finite: keeps gradients NaN-free)
DETCON_FORMS = ("reference", "dedup")  # detcon_nce(form=...): the public code | no duplicates


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps))


def uniform(x):
  """Latents [..., D] -> equal unit latents [..., 1]: every similarity the same, so a loss
  of them is its chance level (None stays None)."""
  return None if x is None else jnp.ones(x.shape[:-1] + (1,), jnp.float32)


def info_nce(query, key, queue, *, temperature: float, extra=None):
  """MoCo's InfoNCE: each query vs its key (positive) and every queue entry (negatives).

  query, key [N, D], queue [L, D] (rows need not be normalised: all three are
  l2-normalised here). Cross-entropy with the positive at index 0 of
  [q.k, q.queue] / temperature, averaged over the N queries, as the MoCo
  reference. Returns (loss, top-1 accuracy of the positive). extra [N, D]: one more
  negative per query, after the positive (BG Swaps' background-matched negative).
  """
  q, k, negatives = (l2_normalize(x.astype(jnp.float32)) for x in (query, key, queue))
  positive = jnp.sum(q * k, axis=-1) / temperature
  columns = [positive[:, None]]
  if extra is not None:
    columns.append(jnp.sum(q * l2_normalize(extra.astype(jnp.float32)), -1)[:, None]
                   / temperature)
  logits = jnp.concatenate(columns + [q @ negatives.T / temperature], axis=1)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positive)
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == 0)


def _over_shards(rows_fn, num_shards: int, *arrays):
  """Sums of `rows_fn`'s outputs over independent blocks of the batch axis."""
  b = arrays[0].shape[0]
  if num_shards < 1 or b % num_shards:
    raise ValueError(f"Local negatives need the batch ({b}) to split into {num_shards} equal "
                     "shards; make the global batch a multiple of the device count.")
  split = lambda a: a.reshape((num_shards, b // num_shards) + a.shape[1:])
  outs = jax.vmap(rows_fn)(*map(split, arrays))
  return tuple(jnp.sum(o) for o in outs)


def _nt_xent_rows(q, t_other, t_same, temperature, extra=None):
  """One direction of NT-Xent over [N, D] unit latents -> (sum of row losses, rows);
  extra [N, D]: one more negative per anchor (BG Swaps)."""
  n = q.shape[0]
  logits_other = q @ t_other.T / temperature                       # positive on the diagonal
  logits_same = jnp.where(jnp.eye(n, dtype=bool), LARGE_NEGATIVE, q @ t_same.T / temperature)
  lse = jnp.logaddexp(jax.nn.logsumexp(logits_other, axis=-1),
                      jax.nn.logsumexp(logits_same, axis=-1))
  if extra is not None:
    lse = jnp.logaddexp(lse, jnp.sum(q * extra, axis=-1) / temperature)
  return (jnp.sum(lse - jnp.diagonal(logits_other)), jnp.float32(n))


def nt_xent(online1, online2, target1=None, target2=None, *, temperature: float,
            num_shards: int = 1, extra=None) -> jax.Array:
  """SimCLR's NT-Xent: each anchor vs its other view among 2N-2 negatives.

  online*/target* [N, D]; anchors are `online`, candidates are `target` of the
  other view (the positive and N-1 negatives) and of the same view (N-1
  negatives, self excluded). Without targets this is SimCLR; with a predictor
  output as online and an EMA projection as target it is the DetCon-B loss of
  one global mask. extra [N, D]: one more negative for each view-1 anchor (BG
  Swaps' background-matched negative; data_pipelines/background_augment.py).
  """
  if target1 is None:
    target1, target2 = online1, online2
  q1, q2, t1, t2 = (l2_normalize(x.astype(jnp.float32)) for x in (online1, online2, target1, target2))
  loss = 0.0
  extras = ([l2_normalize(extra.astype(jnp.float32))] if extra is not None else [], [])
  for (q, t_other, t_same), e in zip(((q1, t2, t1), (q2, t1, t2)), extras):
    total, rows = _over_shards(lambda q, o, s, *e: _nt_xent_rows(q, o, s, temperature, *e),
                               num_shards, q, t_other, t_same, *e)
    loss += total / rows
  return loss


def _multiplicity(ids):
  """How often each id occurs among its image's K sampled ids: [B, K] -> [B, K] float."""
  return jnp.sum(ids[:, :, None] == ids[:, None, :], axis=-1).astype(jnp.float32)


def _detcon_rows(q, t_other, t_same, ids, ids_other, temperature, dedup, same_image_negatives,
                 extra=None):
  """One direction of the DetCon loss over [B, K, D] unit latents.

  Returns (sum of weighted row losses, sum of row weights, unique rows, rows).
  Rows are the B*K anchors; the positives of (b, k) are the other view's
  copies of its id in image b (the label spread evenly over them), the
  same view's copies are excluded. An anchor row has weight [it has a
  positive] / c, c being how often its id occurs among its image's K ids.
  dedup=False counts every sampled copy as its own candidate (the reference);
  dedup=True folds duplicates out: a candidate whose id occurs c times in its
  image contributes exp(logit) / c per copy, once in total, so duplicated
  masks never change the loss. same_image_negatives=False also excludes the
  other ids of the anchor's own image (both views). extra [B, K, D]: one more
  negative per anchor row (BG Swaps), never a positive, never deduplicated.
  """
  b = q.shape[0]
  same_image = jnp.eye(b, dtype=bool)[:, None, :, None]                     # [B, 1, B, 1]
  mult, mult_other = _multiplicity(ids), _multiplicity(ids_other)
  logits_other = jnp.einsum("bkd,jld->bkjl", q, t_other) / temperature
  logits_same = jnp.einsum("bkd,jld->bkjl", q, t_same) / temperature
  if dedup:
    logits_other, logits_same = logits_other - jnp.log(mult_other), logits_same - jnp.log(mult)
  self_match = same_image & (ids[:, :, None, None] == ids[None, None, :, :])
  logits_same = jnp.where(self_match if same_image_negatives else same_image, LARGE_NEGATIVE,
                          logits_same)
  if not same_image_negatives:
    other_id = ids[:, :, None, None] != ids_other[None, None, :, :]
    logits_other = jnp.where(same_image & other_id, LARGE_NEGATIVE, logits_other)
  lse = jnp.logaddexp(jax.nn.logsumexp(logits_other, axis=(2, 3)),
                      jax.nn.logsumexp(logits_same, axis=(2, 3)))
  if extra is not None:
    lse = jnp.logaddexp(lse, jnp.sum(q * extra, axis=-1) / temperature)
  positive = ids[:, :, None] == ids_other[:, None, :]                       # [B, K, K]
  num_pos = jnp.sum(positive, axis=-1)
  pos_logits = jnp.einsum("bkd,bld->bkl", q, t_other) / temperature
  pos_logit = jnp.sum(jnp.where(positive, pos_logits, 0.0), axis=-1) / jnp.maximum(num_pos, 1)
  weight = (num_pos > 0) / mult
  return (jnp.sum(weight * (lse - pos_logit)), jnp.sum(weight), jnp.sum(1.0 / mult),
          jnp.float32(ids.size))


def detcon_nce(online1, online2, target1, target2, ids1, ids2, *, temperature: float,
               num_shards: int = 1, form: str = "reference", same_image_negatives: bool = True,
               extra=None):
  """DetCon's contrastive detection loss (paper eq. 3, batched as the reference).

  online*/target* [B, K, D] mask latents of views 1 and 2, ids* [B, K] their
  mask ids (ids are global to the source image). For the anchor (image b, id
  m) in one view: the positive is id m of image b in the other view; the
  negatives are every other (image, id) of the other view and every (image, id)
  of the same view except (b, m) itself. Latents are l2-normalised and dotted
  over `temperature` (norm 1/sqrt(tau) each). Anchors whose id is absent from
  the other view have no loss. DetCon-S: target = online; DetCon-B: online =
  predictions, target = stop-gradient EMA projections.

  form="reference" is the public DetCon code (byol_nce_detcon): every sampled
  copy is its own candidate and each direction is the mean over all B*K rows
  (weight 1/copies, 0 without a positive), so sampling duplicates shrinks the
  loss. form="dedup" is the cleaner variant: each (image, id) counts once as
  anchor and as candidate, and each direction is averaged over the anchors
  that have a positive; duplicates never change it and one global mask is
  NT-Xent. same_image_negatives=False drops the other masks of the anchor's
  own image from its negatives (the reference's local_negatives=False; not to
  be confused with `num_shards`, the per-device negatives of Table 5).

  extra [B, K, D]: BG Swaps' negative for each view-1 anchor (b, k): the
  background-matched image of b pooled under b's own mask k (the same region:
  the query's background, another image's foreground; background.negative_view).
  It is one more candidate of that row's softmax only, as nt_xent's `extra` is
  of a view-1 anchor; with one global mask DetCon-S + extra is SimCLR + extra.

  Returns (loss, metrics) with metrics['positive_fraction'] = share of unique
  anchors that have a positive.
  """
  if form not in DETCON_FORMS:
    raise ValueError(f"Unknown DetCon loss form {form!r}; choose one of {DETCON_FORMS}.")
  latents = [l2_normalize(x.astype(jnp.float32)) for x in (online1, online2, target1, target2)]
  q1, q2, t1, t2 = latents
  rows_fn = lambda q, o, s, i, io, *e: _detcon_rows(q, o, s, i, io, temperature,
                                                     form == "dedup", same_image_negatives, *e)
  extras = ([l2_normalize(extra.astype(jnp.float32))] if extra is not None else [], [])
  loss, with_pos, unique = 0.0, 0.0, 0.0
  for (q, t_other, t_same, ids, ids_other), e in zip(
      ((q1, t2, t1, ids1, ids2), (q2, t1, t2, ids2, ids1)), extras):
    total, weight, unique_rows, rows = _over_shards(rows_fn, num_shards,
                                                    q, t_other, t_same, ids, ids_other, *e)
    loss += total / (jnp.where(weight > 0, weight, 1.0) if form == "dedup" else rows)
    with_pos, unique = with_pos + weight, unique + unique_rows
  return loss, {"positive_fraction": with_pos / unique}


def _region_nce_rows(q, k, q_valid, k_valid, temperature, intra):
  """MaskCo rows of one shard: q [n, D], k [n, K, D] unit latents -> (loss sum, rows, hits)."""
  n = q.shape[0]
  positive = jnp.sum(q * k[:, 0], axis=-1) / temperature                    # [n]
  negative = jnp.einsum("nd,mjd->nmj", q, k[:, 1:]) / temperature          # [n, n, K-1]
  images = jnp.ones((n, n), bool) if intra else ~jnp.eye(n, dtype=bool)
  allowed = images[:, :, None] & k_valid[None, :, 1:]
  negative = jnp.where(allowed, negative, LARGE_NEGATIVE).reshape(n, -1)
  logits = jnp.concatenate([positive[:, None], negative], axis=1)
  row = (q_valid & k_valid[:, 0]).astype(jnp.float32)
  loss = jax.nn.logsumexp(logits, axis=-1) - positive
  hit = (jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)
  return jnp.sum(row * loss), jnp.sum(row), jnp.sum(row * hit)


def region_nce(query, keys, query_valid, keys_valid, *, temperature: float,
               num_shards: int = 1, intra: bool = False):
  """MaskCo's InfoNCE (Zhao et al. 2021, eq. 1 and Algorithm 1).

  query [B, D]: the masked box's latent; keys [B, K, D]: the key boxes, 0 the
  positive, 1..K-1 the negative boxes. Row b: the positive q_b.k_b0 against
  the negative boxes (1..K-1) of every other image of its shard (the paper:
  16 x 31 on one GPU), plus its own K-1 when intra (MaskCo(+in)). All latents
  are l2-normalised; cross-entropy with the positive at index 0, temperature
  `temperature`. Invalid key boxes (keys_valid [B, K] False) are no negatives;
  rows whose query or positive is invalid are left out, and the mean is over
  the rows kept. Returns (loss, top-1 accuracy of the positive, rows kept).
  """
  q, k = (l2_normalize(x.astype(jnp.float32)) for x in (query, keys))
  total, rows, hits = _over_shards(
      lambda *a: _region_nce_rows(*a, temperature, intra), num_shards,
      q, k, query_valid.astype(bool), keys_valid.astype(bool))
  denominator = jnp.maximum(rows, 1.0)
  return total / denominator, hits / denominator, rows
