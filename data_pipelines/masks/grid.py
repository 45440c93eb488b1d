"""Spatial n x n grid of square cells (DetCon section 3.2, 'spatial heuristic').

Cell ids are row-major, 0 .. n*n-1; n=1 gives a single global mask (SimCLR).
"""
from __future__ import annotations

import numpy as np

DEFAULT_N = 4


def name(n: int) -> str:
  return f"grid_{n}"


def compute(image: np.ndarray, n: int = DEFAULT_N) -> np.ndarray:
  """Id map (int32) of an n x n grid over the image's height and width."""
  h, w = image.shape[:2]
  rows = np.arange(h) * n // h
  cols = np.arange(w) * n // w
  return (rows[:, None] * n + cols[None, :]).astype(np.int32)
