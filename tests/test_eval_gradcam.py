"""The grounding evaluation: binarised Grad-CAM vs a target, IoU known answers (a run on a
tiny trained state is in test_objectives_cast.py, which has one)."""
import numpy as np
import pytest

from data_pipelines import batch as B
from detcon_jax.evaluate import gradcam


def test_iou_known_answers():
  target = np.zeros((3, 4, 4), bool)
  target[:, :2] = True                                   # top half
  pred = np.zeros((3, 4, 4), bool)
  pred[0, :2] = True                                     # exact
  pred[1, :, :2] = True                                  # left half: 4 / 12
  target[2] = False                                      # empty target: not counted
  np.testing.assert_allclose(gradcam.iou(pred, target), [1.0, 4 / 12, np.nan])


def test_cam_is_upsampled_min_max_normalised_and_binarised_at_half():
  cam = np.asarray([[[0.0, 1.0], [2.0, 4.0]]])           # min 0, max 4
  pred, up = gradcam.binarised_cam(cam, 2)              # same size: no interpolation
  np.testing.assert_array_equal(pred[0], [[False, False], [True, True]])   # >= 2 of 4
  np.testing.assert_allclose(up, cam)
  pred, _ = gradcam.binarised_cam(cam * 10 + 3, 2)     # invariant to scale and shift
  np.testing.assert_array_equal(pred[0], [[False, False], [True, True]])
  big, _ = gradcam.binarised_cam(cam, 8)
  assert big.shape == (1, 8, 8) and big[0, -1, -1] and not big[0, 0, 0]


def test_target_is_gt_foreground_else_saliency():
  sem = np.asarray([[[0, 2], [1, 0]]])
  np.testing.assert_array_equal(gradcam.target_maps({B.SEMANTIC: sem})[0], [[0, 1], [1, 0]])
  sal = np.asarray([[[0.2, 0.7], [0.5, 0.51]]])
  np.testing.assert_array_equal(gradcam.target_maps({"saliency": sal})[0], [[0, 1], [0, 1]])
  with pytest.raises(ValueError, match="ground-truth instances or saliency"):
    gradcam.target_maps({B.IMAGE: sal})

