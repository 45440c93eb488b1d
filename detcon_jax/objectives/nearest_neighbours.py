"""kNN-MoCo's auxiliary loss (Van Gansbeke et al. 2021, section 4.3, eq. 2), pure math.

MoCo keeps a queue Q_h of key projections; kNN-MoCo adds an equally sized,
aligned queue Q_g of the keys' pooled backbone features (row i of both is the
same key). Each positive (a query view) finds its k nearest neighbours in Q_g
by cosine similarity of its own backbone features, and is pulled towards the
projections of those rows of Q_h:

  L_nn = mean over positives of  -1/k sum_{j in kNN} log softmax_j(q . Q_h / T)

with the softmax over the queue only (no positive key), as the authors'
pull_topk (a SupContrast-style multi-label cross-entropy on l_neg / T). The
neighbour search carries no gradient; the loss's gradient reaches the query
projections.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from detcon_jax.objectives.contrastive import l2_normalize


def neighbours(features, queue_features, k: int):
  """Indices [N, k] of each row's k most cosine-similar rows of queue_features [L, C]."""
  sims = l2_normalize(features.astype(jnp.float32)) @ l2_normalize(
      queue_features.astype(jnp.float32)).T
  return jax.lax.top_k(jax.lax.stop_gradient(sims), k)[1]


def knn_loss(query, features, queue, queue_features, *, k: int, temperature: float):
  """Eq. 2: query [N, D] projections, features [N, C] their backbone features; queue
  [L, D] (Q_h) and queue_features [L, C] (Q_g), aligned row for row. Returns a scalar."""
  index = neighbours(features, queue_features, k)
  q, negatives = l2_normalize(query.astype(jnp.float32)), l2_normalize(queue.astype(jnp.float32))
  log_prob = jax.nn.log_softmax(q @ negatives.T / temperature, axis=-1)    # [N, L]
  return -jnp.mean(jnp.take_along_axis(log_prob, index, axis=1))
