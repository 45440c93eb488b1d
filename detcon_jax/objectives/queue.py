"""A ring buffer of past keys, kept in the train state (MoCo's queue, SwAV's feature queue).

A plain dict {'keys': [L, ...], 'ptr': int32, 'count': int32} so that it is
checkpointed and restored with the rest of the state. push() writes a batch
of rows at 'ptr' and wraps around; 'count' (capped at L) says how many rows
hold real keys, so a queue that starts empty knows when it is full. Several
buffers pushed together stay aligned row for row (kNN-MoCo's two queues).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from detcon_jax.objectives.contrastive import l2_normalize


def create(size: int, row_shape, rng=None) -> dict:
  """An empty queue of `size` rows; with `rng`, rows start as random unit vectors
  (MoCo's initial queue, a full one: count = size)."""
  shape = (int(size),) + tuple(row_shape)
  if rng is None:
    keys, count = jnp.zeros(shape, jnp.float32), 0
  else:
    keys, count = l2_normalize(jax.random.normal(rng, shape, jnp.float32)), int(size)
  return {"keys": keys, "ptr": jnp.zeros((), jnp.int32), "count": jnp.asarray(count, jnp.int32)}


def push(queue: dict, rows, enabled=True) -> dict:
  """Write rows [n, ...] at ptr (wrapping around); n must not exceed the queue size.

  enabled (a traced bool is fine) leaves the queue unchanged when false.
  """
  size, n = queue["keys"].shape[0], rows.shape[0]
  if n > size:
    raise ValueError(f"Cannot push {n} rows into a queue of {size}; make the queue at least "
                     "as large as the global batch of keys.")
  index = (queue["ptr"] + jnp.arange(n)) % size
  keys = queue["keys"].at[index].set(rows.astype(queue["keys"].dtype))
  new = {"keys": keys, "ptr": (queue["ptr"] + n) % size,
         "count": jnp.minimum(queue["count"] + n, size)}
  return jax.tree.map(lambda a, b: jnp.where(enabled, a, b), new, {k: queue[k] for k in new})


def is_full(queue: dict):
  return queue["count"] >= queue["keys"].shape[0]
