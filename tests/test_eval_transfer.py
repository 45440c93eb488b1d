"""Transfer evaluations with known answers: mIoU, the dense linear probe, multi-label mAP,
the FCN head of Revisiting A.3, and the runner rows (seg_linear, multilabel, seg_finetune)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from data_pipelines import batch as B
from data_pipelines import build
from detcon_jax.evaluate import features, finetune, multilabel, run, segmentation
from detcon_jax.models.resnet import ResNet

IGNORE = segmentation.IGNORE


def test_miou_equals_numpy_confusion_matrix_with_ignore_pixels():
  rng = np.random.default_rng(0)
  n = 5
  gt = rng.integers(0, n, (4, 16, 16))
  gt[rng.random(gt.shape) < 0.2] = IGNORE
  pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, n, gt.shape))
  pred[pred == IGNORE] = 0
  conf = np.zeros((n, n), np.int64)
  for g, p in zip(gt.ravel(), pred.ravel()):
    if g != IGNORE:
      conf[g, p] += 1
  iou = np.array([conf[c, c] / (conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(n)])
  out = segmentation.miou(gt, pred, n)
  np.testing.assert_allclose(out["per_class_iou"], iou)
  assert out["miou"] == pytest.approx(iou.mean())
  # A class neither present nor predicted is NaN and left out of the mean.
  out = segmentation.miou(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int), 3)
  assert out["miou"] == 1.0 and np.isnan(out["per_class_iou"][1:]).all()


def test_bilinear_at_equals_full_upsampling():
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(2, 6, 5, 3)), jnp.float32)
  full = jax.image.resize(f, (2, 24, 20, 3), "bilinear")
  rows, cols = rng.integers(0, 24, (2, 40)), rng.integers(0, 20, (2, 40))
  np.testing.assert_allclose(segmentation.bilinear_at(f, rows, cols, (24, 20)),
                             full[np.arange(2)[:, None], rows, cols], atol=1e-5)


def test_seg_linear_on_one_hot_features_of_the_semantic_map():
  """Features = a one-hot copy of 4x-downsampled block maps: the probe recovers the map."""
  rng = np.random.default_rng(0)
  num_classes = 4
  blocks = rng.integers(0, num_classes + 1, (48, 6, 6))
  semantic = np.repeat(np.repeat(blocks, 4, 1), 4, 2)
  feats = np.eye(num_classes + 1, dtype=np.float32)[blocks]
  out = segmentation.linear_segmentation(feats[:40], semantic[:40], feats[40:], semantic[40:],
                                         num_classes=num_classes, epochs=30, batch_size=8)
  assert out["miou"] > 0.95
  assert out["predictions"].shape == (8, 24, 24)
  with pytest.raises(ValueError, match="outside"):
    segmentation.linear_segmentation(feats, semantic + 9, feats, semantic, num_classes=4)


def test_mean_average_precision_equals_sklearn():
  rng = np.random.default_rng(0)
  targets = rng.random((60, 5)) < 0.3
  targets[:, 4] = False                                  # no positive: left out
  scores = targets + rng.normal(0, 0.8, targets.shape)
  out = multilabel.mean_average_precision(targets, scores)
  ref = [average_precision_score(targets[:, k], scores[:, k]) for k in range(4)]
  np.testing.assert_allclose(out["per_class_ap"][:4], ref)
  assert np.isnan(out["per_class_ap"][4])
  assert out["map"] == pytest.approx(np.mean(ref))


def test_multilabel_probe_separable_and_present_classes():
  semantic = np.array([[[0, 1], [3, 3]], [[0, 0], [0, 0]], [[2, 2], [IGNORE, 1]]])
  np.testing.assert_array_equal(B.present_classes(semantic, 3),
                                [[1, 0, 1], [0, 0, 0], [1, 1, 0]])
  rng = np.random.default_rng(0)
  targets = rng.random((120, 3)) < 0.5
  feats = np.concatenate([targets * 2.0 - 1, rng.normal(0, 0.1, (120, 4))], 1)
  out = multilabel.multilabel_probe(feats[:90], targets[:90], feats[90:], targets[90:],
                                    sweep="quick")
  assert out["map"] > 0.99 and len(out["per_class_ap"]) == 3


def test_fcn_head_matches_revisiting_a3_at_resnet50_512px():
  """Shapes (jax.eval_shape) and conv dilations (the jaxpr), no compute."""
  fcn = finetune.build_fcn(ResNet(depth=50), 21)
  x = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: fcn.init(jax.random.PRNGKey(0), x, train=False), x)
  head = jax.tree_util.tree_map(lambda a: a.shape, variables["params"]["head"])
  assert head["conv1"]["kernel"] == (3, 3, 2048, 256)
  assert head["conv2"]["kernel"] == (3, 3, 256, 256)
  assert head["classifier"] == {"kernel": (1, 1, 256, 21), "bias": (21,)}
  assert set(head) == {"conv1", "bn1", "conv2", "bn2", "classifier"}

  def intermediates(v, x):
    return fcn.apply(v, x, train=False, capture_intermediates=True)
  logits, state = jax.eval_shape(intermediates, variables, x)
  assert logits.shape == (2, 512, 512, 21)
  inter = state["intermediates"]
  assert inter["encoder"]["__call__"][0]["stage4"].shape == (2, 32, 32, 2048)  # stride 16
  assert inter["head"]["__call__"][0].shape == (2, 32, 32, 21)
  jaxpr = jax.make_jaxpr(lambda v, x: fcn.apply(v, x, train=False))(variables, x)
  dilations = [tuple(e.params["rhs_dilation"]) for e in jaxpr.jaxpr.eqns
               if e.primitive.name == "conv_general_dilated"]
  kernels = [e.invars[1].aval.shape for e in jaxpr.jaxpr.eqns
             if e.primitive.name == "conv_general_dilated"]
  assert dilations[-3:] == [(6, 6), (6, 6), (1, 1)]          # head: 6, 6, then the 1x1
  layer4 = [d for d, k in zip(dilations[:-3], kernels[:-3]) if k[0] == 3][-3:]
  assert layer4 == [(1, 1), (2, 2), (2, 2)]   # RN50 layer4's 3x3s: the stride-carrying one 1
  cityscapes = finetune.build_fcn(ResNet(depth=50, width=0.5), 19, dilation=1)
  assert (cityscapes.dilation, cityscapes.head_channels) == (1, 128)   # 256 x width


def test_finetune_augment_and_schedule():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (40, 40, 3), np.uint8)
  label = rng.integers(0, 5, (40, 40)).astype(np.int32)
  for _ in range(10):
    x, y = finetune.augment(rng, image, label, 48)
    assert x.shape == (48, 48, 3) and y.shape == (48, 48)
    assert set(np.unique(y)) <= set(range(5)) | {IGNORE}
  lr = finetune.learning_rate("detcon", 100)
  assert [float(lr(s)) for s in (0, 69, 70, 89, 90)] == pytest.approx(
      [0.02, 0.02, 0.002, 0.002, 0.0002])
  lr = finetune.learning_rate("revisiting", 45)
  assert [float(lr(s)) for s in (29, 30, 40)] == pytest.approx([0.003, 0.0003, 0.00003])


SIZE = 32
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], np.uint8)


def example(rng):
  """Two coloured boxes of random classes on grey: multi-label, segmentable by colour."""
  image = np.full((SIZE, SIZE, 3), 128, np.uint8)
  inst = np.zeros((SIZE, SIZE), np.int32)
  classes = rng.integers(0, 3, 2)
  image[:16, :16], inst[:16, :16] = COLOURS[classes[0]], 1
  image[16:, 16:], inst[16:, 16:] = COLOURS[classes[1]], 2
  return dict(image=image, label=int(classes[0]), instances=inst, classes=list(classes),
              masks={"gt": inst})


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  out = str(tmp_path_factory.mktemp("records"))
  build.write_records(out, {"train": [example(rng) for _ in range(24)],
                            "test": [example(rng) for _ in range(8)]},
                      num_classes=3, class_names=["r", "g", "b"])
  return out


def _runner(records_dir, evals):
  model = ResNet(depth=18, width=0.125, stem_pool=False)
  variables = features.random_init_variables(model, SIZE)
  settings = run.Settings(image_size=SIZE, batch_size=16, linear_sweep="quick",
                          finetune_steps=2, seg_linear_epochs=20)
  return run.evaluate_variables(model, {run.BASELINE: variables}, records_dir, evals, settings)


def test_runner_seg_linear_and_multilabel_rows(records_dir):
  """Colour = class: even random-init features separate the classes."""
  results, pictures = _runner(records_dir, "multilabel,seg_linear")
  row = results["rows"][run.BASELINE]
  assert list(row) == ["seg_linear", "multilabel"]
  assert row["multilabel"] > 0.9 and row["seg_linear"] > 0.5
  assert len(results["details"][run.BASELINE]["seg_linear"]["per_class_iou"]) == 4  # bg + 3
  assert pictures[run.BASELINE]["seg_linear"].shape == (run.NUM_PICTURES, SIZE, 3 * SIZE + 4, 3)
  table = run.format_table(results)
  assert "seg-linear mIoU" in table and "multi-label mAP" in table and "per-class IoU" in table


@pytest.mark.slow   # two FCN compiles (train step, prediction): 27 s at load 3, 2 min at load 14
def test_runner_seg_finetune_row(records_dir):
  results, pictures = _runner(records_dir, "seg_finetune")
  details = results["details"][run.BASELINE]["seg_finetune"]
  assert 0.0 <= results["rows"][run.BASELINE]["seg_finetune"] <= 1.0
  assert len(details["per_class_iou"]) == 4 and details["steps"] == 2
  assert pictures[run.BASELINE]["seg_finetune"].shape == (run.NUM_PICTURES, SIZE, 3 * SIZE + 4, 3)
  assert "FCN mIoU" in run.format_table(results)


def test_records_without_semantic_labels_are_refused_naming_what_applies():
  manifest = {"source": "folder", "num_classes": 3, "has_gt": False,
              "splits": {"train": {"count": 4}, "test": {"count": 2}}}
  with pytest.raises(ValueError) as e:
    run.check_data(("seg_linear", "multilabel", "seg_finetune"), manifest, "recs")
  msg = str(e.value)
  assert "seg_linear, multilabel, seg_finetune: no ground-truth instance maps" in msg
  assert msg.endswith("Use --evals=knn,linear on these records.") and "\n" not in msg


@pytest.mark.slow   # 400 SGD steps of the demo ResNet: 68 s at load 3, 5 min at load 12
def test_seg_finetune_overfits_8_demo_images():
  """Demo ResNet-18 (width 0.25, stride 16) + FCN head from random init, no augmentation,
  the DetCon schedule at 2.5x its rate: train mIoU > 0.9 (measured 0.92)."""
  from data_pipelines import demo
  examples = [demo.example("train", i) for i in range(8)]
  images = np.stack([e["image"] for e in examples])
  semantic = np.stack([np.concatenate([[0], e["classes"] + 1])[e["instances"]]
                       for e in examples]).astype(np.int32)
  model = ResNet(depth=18, width=0.25, stem_pool=False)
  fcn = finetune.build_fcn(model, 13)
  variables = finetune.init_variables(fcn, features.random_init_variables(model, 96), 96)
  variables, losses = finetune.train(fcn, variables, images, semantic, steps=400, crop=96,
                                     batch_size=8, augmentation=False, lr_scale=2.5)
  assert losses[-1] < 0.1 * losses[0]
  predictions = finetune.predict(fcn, variables, images.astype(np.float32) / 255)
  assert segmentation.miou(semantic, predictions, 13)["miou"] > 0.9
