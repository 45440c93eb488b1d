"""The TensorBoard pictures: shapes, dtype, and colours that follow ids across views."""
import numpy as np

from data_pipelines import batch as B
from detcon_jax.evaluate import visualize


def test_view_mask_overlay_images_shape_and_shared_colours():
  batch = B.synthetic_train_batch(batch_size=3, image_size=16, grid=2)
  batch[B.VIEW1][:] = 0.0; batch[B.VIEW2][:] = 0.0   # black images: pixels show the mask colour
  out = visualize.view_mask_overlay_images(batch, max_images=2)
  assert out.dtype == np.uint8 and out.shape == (2, 16, 2 * 16 + visualize.SEPARATOR, 3)
  left, right = out[:, :, :16], out[:, :, 16 + visualize.SEPARATOR:]
  np.testing.assert_array_equal(left, right)          # same ids -> same colours in both views
  assert len({tuple(left[0, 2, 2]), tuple(left[0, 2, 13]), tuple(left[0, 13, 2])}) == 3
  assert (left[0, 7] == 255).all()                     # boundary between grid rows drawn white


def test_segmentation_panels_background_black():
  images = np.ones((1, 4, 4, 3), np.float32)
  gt = np.zeros((1, 4, 4), np.int32); gt[0, :2] = 3
  out = visualize.segmentation_panels(images, gt, gt)
  assert out.shape == (1, 4, 3 * 4 + 2 * visualize.SEPARATOR, 3)
  gt_panel = out[0, :, 4 + visualize.SEPARATOR:8 + visualize.SEPARATOR]
  assert (gt_panel[2:] == 0).all() and (gt_panel[:2] > 0).any()
