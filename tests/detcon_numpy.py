"""The public DetCon loss in plain numpy, one anchor row at a time (the semantics the
JAX loss must reproduce), and random cases to compare them on. Shared by the DetCon
and BG Swaps tests."""
import jax.numpy as jnp
import numpy as np

from detcon_jax.objectives.contrastive import detcon_nce

TAU = 0.1


def _unit(x):
  return np.asarray(x, np.float64) / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_loss(o1, o2, t1, t2, ids1, ids2, tau=TAU, num_shards=1,
                   same_image_negatives=True, extra=None):
  """One anchor row at a time; excluded candidates are left out of the softmax.
  extra [B, K, D]: one more negative of each view-1 row (BG Swaps)."""
  online, target, ids = (o1, o2), (t1, t2), (np.asarray(ids1), np.asarray(ids2))
  b, k = ids[0].shape
  block = b // num_shards
  total = 0.0
  for v in (0, 1):
    w = 1 - v
    rows = []
    for i in range(b):
      for r in range(k):
        m, q = ids[v][i, r], _unit(online[v][i, r])
        logits, labels = [], []
        for j in range(b):
          if j // block != i // block:
            continue
          for l in range(k):                                  # other view
            positive = j == i and ids[w][j, l] == m
            if j == i and not positive and not same_image_negatives:
              continue
            logits.append(q @ _unit(target[w][j, l]) / tau)
            labels.append(float(positive))
          for l in range(k):                                  # same view
            if j == i and (ids[v][j, l] == m or not same_image_negatives):
              continue
            logits.append(q @ _unit(target[v][j, l]) / tau)
            labels.append(0.0)
        if extra is not None and v == 0:
          logits.append(q @ _unit(extra[i, r]) / tau)
          labels.append(0.0)
        labels, logits = np.array(labels), np.array(logits)
        if labels.sum() == 0:
          rows.append(0.0)
          continue
        log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        weight = 1.0 / np.sum(ids[v][i] == m)
        rows.append(-weight * np.sum(labels / labels.sum() * log_softmax))
    total += np.mean(rows)
  return total


def random_case(seed, b=4, k=5, num_ids=6, dim=3, bootstrap=True):
  """Independent latents per slot; ids drawn per view with replacement."""
  rng = np.random.default_rng(seed)
  ids1, ids2 = (rng.integers(0, num_ids, (b, k)).astype(np.int32) for _ in range(2))
  o1, o2, t1, t2 = (rng.normal(size=(b, k, dim)).astype(np.float32) for _ in range(4))
  return (o1, o2, t1, t2, ids1, ids2) if bootstrap else (o1, o2, o1, o2, ids1, ids2)


def jax_loss(o1, o2, t1, t2, ids1, ids2, tau=TAU, **kw):
  return float(detcon_nce(*map(jnp.asarray, (o1, o2, t1, t2, ids1, ids2)), temperature=tau,
                          **kw)[0])
