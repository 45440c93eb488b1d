"""The TensorBoard pictures: shapes, dtype, and colours that follow ids across views."""
import numpy as np
import pytest

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


def test_view_mask_overlay_images_for_multi_crop_views():
  from data_pipelines import views as V
  specs = V.two_views(16) + (V.ViewSpec("small1", 8, (0.05, 0.3), fields=(V.MASKS,), small=True),
                             V.ViewSpec("small2", 8, (0.05, 0.3), small=True))   # no masks
  batch = B.synthetic_train_batch(batch_size=3, num_masks=4, specs=specs)
  for v in V.names(specs):
    batch[v][:] = 0.0
  assert visualize.masked_views(batch) == ["view1", "view2", "small1"]
  out = visualize.view_mask_overlay_images(batch, max_images=3)
  sep = visualize.SEPARATOR
  assert out.shape == (3, 16, 2 * 16 + 8 + 2 * sep, 3)
  small = out[:, :, 2 * (16 + sep):]
  assert (small[:, 8:] == 255).all()                                # padded below in white
  np.testing.assert_array_equal(small[:, :8], visualize.overlay(batch["small1"],
                                                                 batch["small1/masks"]))
  with pytest.raises(KeyError, match="masks"):
    visualize.view_mask_overlay_images({"view1": batch["view1"], "label": batch["label"]})
