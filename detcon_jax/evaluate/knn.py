"""Weighted cosine k-nearest-neighbour classification of frozen features.

The protocol of InstDisc (Wu et al. 2018) as used by DINO: cosine similarity
to every training example (the memory), the k most similar vote for their
label with weight exp(similarity / temperature), the class with the largest
summed weight wins. It needs no training, so it is the cheapest honest
read-out of a representation.
"""
from __future__ import annotations

import numpy as np

K = 20
TEMPERATURE = 0.07


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray,
                test_features: np.ndarray, *, num_classes: int, k: int = K,
                temperature: float = TEMPERATURE, chunk: int = 1024) -> np.ndarray:
  """Predicted class of each test feature ([M] int) from the labelled memory.

  `train_features` [N, C] with `train_labels` [N] in [0, num_classes);
  `test_features` [M, C]. Queries are processed in chunks so the similarity
  matrix never exceeds chunk x N.
  """
  train_labels = np.asarray(train_labels)
  if train_features.ndim != 2 or test_features.ndim != 2:
    raise ValueError("kNN expects [N, C] features; got train "
                     f"{train_features.shape} and test {test_features.shape}.")
  if train_features.shape[0] != train_labels.shape[0]:
    raise ValueError(f"{train_features.shape[0]} train features but "
                     f"{train_labels.shape[0]} labels.")
  if train_labels.size == 0:
    raise ValueError("kNN needs at least one labelled training example.")
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f"train labels must lie in [0, {num_classes}); drop unlabelled "
                     "examples (label -1) before calling knn_predict.")
  k = min(k, train_features.shape[0])
  memory = _l2_normalize(train_features)
  queries = _l2_normalize(test_features)
  predictions = np.empty(queries.shape[0], np.int64)
  for start in range(0, queries.shape[0], chunk):
    sim = queries[start:start + chunk] @ memory.T                  # [m, N]
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]              # [m, k]
    top_sim = np.take_along_axis(sim, top, axis=1)
    weights = np.exp((top_sim - 1.0) / temperature)  # shifted by the max possible sim: same argmax, no overflow
    votes = np.zeros((top.shape[0], num_classes), np.float64)
    np.add.at(votes, (np.arange(top.shape[0])[:, None], train_labels[top]), weights)
    predictions[start:start + chunk] = votes.argmax(axis=1)
  return predictions


def knn_top1(train_features, train_labels, test_features, test_labels, *,
             num_classes: int, k: int = K, temperature: float = TEMPERATURE) -> float:
  """Top-1 accuracy (in [0, 1]) of weighted cosine kNN; unlabelled (-1) examples are left out."""
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  keep_train, keep_test = train_labels >= 0, test_labels >= 0
  if not keep_test.any():
    raise ValueError("No labelled test example (all labels are -1): kNN accuracy is undefined.")
  predictions = knn_predict(np.asarray(train_features)[keep_train], train_labels[keep_train],
                            np.asarray(test_features)[keep_test], num_classes=num_classes,
                            k=k, temperature=temperature)
  return float(np.mean(predictions == test_labels[keep_test]))
