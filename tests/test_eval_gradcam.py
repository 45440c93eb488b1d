"""The grounding evaluation: binarised Grad-CAM vs a target, IoU known answers, and a run
on a tiny MoCo v2 state."""
import jax
import numpy as np
import pytest

from data_pipelines import batch as B
from detcon_jax.evaluate import gradcam
from detcon_jax.objectives import registry
from test_objectives_moco_swav import tiny_config


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


def test_evaluate_a_tiny_moco_state():
  config = tiny_config("moco_v2")
  config.moco.queue_size = 12
  objective = registry.get_objective("moco_v2")
  batch = B.synthetic_train_batch(4, specs=objective.views(config), seed=0)
  params, state = jax.jit(lambda r, b: objective.init(r, config, b))(jax.random.key(0), batch)
  rng = np.random.default_rng(0)
  sem = np.zeros((4, 32, 32), np.int32)
  sem[:, 8:24, 8:24] = 1
  batches = [{B.IMAGE: rng.random((4, 32, 32, 3), np.float32), B.SEMANTIC: sem}
             for _ in range(2)]
  out = gradcam.evaluate(config, {"params": params, "state": state}, batches)
  assert out["num_images"] == 8 and 0.0 <= out["miou"] <= 1.0
  assert len(out["ious"]) == 8 and np.all(np.isfinite(out["ious"]))
  assert out["overlays"].shape == (4, 32, 3 * 32 + 2 * 2, 3)
