"""Ground-truth masks: a dataset's own instance map used as the mask source.

DetCon section 4.4 ("what if segmentation were solved?"): the instance map
(0 = background, k = k-th instance) is used unchanged as the id map.
"""
from __future__ import annotations

import numpy as np

NAME = "gt"


def compute(image: np.ndarray, instances: np.ndarray | None = None) -> np.ndarray:
  """The instance map itself (int32); needs a source that provides one."""
  if instances is None:
    raise ValueError("Mask source 'gt' needs instance maps, which this data source "
                     "does not provide; drop 'gt' from --masks.")
  if instances.shape[:2] != image.shape[:2]:
    raise ValueError(f"Instance map shape {instances.shape[:2]} differs from the "
                     f"image's {image.shape[:2]}.")
  return instances.astype(np.int32)
