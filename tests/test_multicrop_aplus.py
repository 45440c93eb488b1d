"""Constrained multi-crop and A+ (Van Gansbeke et al. 2021): the overlap constraint holds for
every accepted small crop, fallbacks are flagged; every AutoAugment op equals PIL's (the
authors' code runs torchvision's AutoAugment on PIL images), eagerly and inside tf.data."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from data_pipelines import augment
from data_pipelines import autoaugment as AA
from data_pipelines import views as V


@pytest.fixture(params=["eager", "tf.data"])
def mode(request):
  return request.param


def run_many(mode, fn, inputs):
  ds = tf.data.Dataset.from_tensor_slices(inputs)
  outs = [fn(x) for x in ds] if mode == "eager" else list(ds.map(fn))
  return [{k: np.asarray(v) for k, v in o.items()} for o in outs]


# --- Constrained multi-crop -----------------------------------------------------------

def _inter(a, b):
  dy = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
  dx = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
  return dy * dx


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_constraint_holds_for_every_accepted_small_crop(mode, rule):
  """200 small crops (5-14% of a 60x90 image) against small anchors (20-30%): each one that
  did not fall back has >= 20% of its area (paper) / >= 10% of its target area, hence of
  its area within rounding (reference), inside the anchor; fallbacks are flagged."""
  anchor_spec = V.ViewSpec("view2", 32, (0.2, 0.3), "moco_v2")
  overlap = V.RULE_OVERLAP[rule]
  small = V.ViewSpec("small1", 16, (0.05, 0.14), "moco_v2", small=True,
                     constraint=V.Constraint("view2", rule, overlap, tries=3))

  def draw(x):
    a = augment.sample_view_params(x["seed"], 60, 90, anchor_spec)
    p = augment.sample_view_params(tf.reverse(x["seed"], [0]), 60, 90, small, anchor_box=a["box"])
    return {"anchor": a["box"], "box": p["box"], "fallback": p["crop_fallback"]}

  n = 200 if mode == "tf.data" else 30      # eager ops are slow; tf.data is the real use
  seeds = {"seed": tf.stack([tf.range(n), tf.fill([n], 3)], 1)}
  draws = run_many(mode, draw, seeds)
  accepted = [d for d in draws if not d["fallback"]]
  fallbacks = len(draws) - len(accepted)
  assert fallbacks < n // 2 and (fallbacks > 0 or mode == "eager")  # 3 tries: some fall back
  # rounding the sides makes h*w differ from the target area by < 0.5 * (h + w) + 0.25
  slack = 0.0 if rule == "paper" else 1.0
  for d in accepted:
    y, x, h, w = d["box"]
    assert y >= 0 and x >= 0 and y + h <= 60 and x + w <= 90
    need = overlap * (h * w - slack * (0.5 * (h + w) + 0.25))
    assert _inter(d["box"], d["anchor"]) >= need, d
  # Without the constraint, the same kind of crops miss the anchor often.
  free = [d["b"] for d in run_many("tf.data", lambda x: {
      "b": augment.crop_box(x["seed"], 60, 90, (0.05, 0.14))}, seeds)]
  anchor = draws[0]["anchor"]
  assert np.mean([_inter(b, anchor) < 0.2 * b[2] * b[3] for b in free]) > 0.3


def test_standard_views_constrain_small_crops_to_view2():
  import ml_collections
  c = ml_collections.ConfigDict(dict(
      image_size=64, data=dict(augment="moco_v2_aplus"),
      views=dict(global_area=(0.2, 1.0), small_crops=2, small_size=32, small_area=(0.05, 0.14),
                 constrained=True, constraint_rule="reference", constraint_overlap=None,
                 constraint_tries=7)))
  specs = V.standard_views(c)
  assert [s.augment for s in specs] == ["moco_v2_aplus", "moco_v2"] + ["moco_v2_aplus"] * 2
  assert [s.constraint for s in specs[:2]] == [None, None]
  assert specs[2].constraint == V.Constraint("view2", "reference", 0.1, 7)


# --- AutoAugment ops against PIL ---------------------------------------------------------

def _image():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
  img[:6] //= 3                          # a darker band: a histogram with structure
  img[6:, :5] = (200, 40, 90)            # a flat patch
  return img


_T = math.tan(0.2)
# op name -> (our op with its magnitude, PIL's result)
PIL_OPS = {
    "Posterize": (lambda x: AA.posterize(x, 5), lambda p: ImageOps.posterize(p, 5)),
    "Solarize": (lambda x: AA.solarize(x, 128.0), lambda p: ImageOps.solarize(p, 128)),
    "Invert": (AA.invert, ImageOps.invert),
    "AutoContrast": (AA.autocontrast, ImageOps.autocontrast),
    "Equalize": (AA.equalize, ImageOps.equalize),
    "Color": (lambda x: AA.color(x, 1.6), lambda p: ImageEnhance.Color(p).enhance(1.6)),
    "Contrast": (lambda x: AA.contrast(x, 0.3), lambda p: ImageEnhance.Contrast(p).enhance(0.3)),
    "Sharpness": (lambda x: AA.sharpness(x, 1.7),
                  lambda p: ImageEnhance.Sharpness(p).enhance(1.7)),
    "Rotate": (lambda x: AA.rotate(x, 27.0), lambda p: p.rotate(27.0, resample=Image.NEAREST)),
    # torchvision's ShearX(m): PIL affine with inverse x_in = x + tan(m) (y - h/2)
    "ShearX": (lambda x: AA.shear_x(x, 0.2),
               lambda p: p.transform(p.size, Image.AFFINE, (1, _T, -_T * p.size[1] / 2, 0, 1, 0),
                                     resample=Image.NEAREST)),
}


def test_every_policy_op_has_a_pil_check():
  assert set(PIL_OPS) == set(AA.OPS) == {n for sub in AA.POLICY for n, _, _ in sub}


@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_autoaugment_op_equals_pil(name, mode):
  img = _image()
  ours, theirs = PIL_OPS[name]
  out = run_many(mode, lambda d: {"y": ours(d["x"])},
                 {"x": tf.constant(img[None] / 255.0, tf.float32)})[0]["y"]
  want = np.asarray(theirs(Image.fromarray(img)))
  np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), want)


def test_rotate_90_is_rot90():
  img = _image()[:, :20] / 255.0
  np.testing.assert_allclose(AA.rotate(tf.constant(img, tf.float32), 90.0).numpy(),
                             np.rot90(img), atol=1e-6)


def test_policy_tables_follow_torchvision_bins():
  ops, probs, mags, signed = (t.numpy() for t in AA._policy_tables())
  assert ops.shape == (25, 2)
  # sub-policy 0: (Posterize, 0.4, bin 8 -> 4 bits), (Rotate, 0.6, bin 9 -> 30 degrees)
  assert AA.OP_NAMES[ops[0, 0]] == "Posterize" and probs[0, 0] == pytest.approx(0.4)
  assert mags[0, 0] == 4 and not signed[0, 0]
  assert AA.OP_NAMES[ops[0, 1]] == "Rotate" and mags[0, 1] == pytest.approx(30.0)
  assert signed[0, 1]
  # Solarize bin 5 of linspace(256, 0, 10)
  assert mags[1, 0] == pytest.approx(256 - 5 * 256 / 9, rel=1e-6)


def test_a_plus_view_inside_tf_data(mode):
  """A+ table: about half the views take AutoAugment (and then no jitter, grey, blur,
  solarize); the policy runs inside the map and keeps images on the 8-bit grid in [0, 1]."""
  spec = V.ViewSpec("view1", 16, (0.2, 1.0), "moco_v2_aplus")
  image = tf.constant(_image()[:16, :16] / 255.0, tf.float32)

  def view(x):
    p = augment.sample_view_params(x["seed"], 20, 24, spec)
    y = augment.colour(image, p)
    return {"y": y, "auto": p["auto"], "jitter": p["jitter"], "gray": p["gray"],
            "blur": p["blur"], "policy": p["aa_policy"]}

  n = 64 if mode == "tf.data" else 24
  seeds = {"seed": tf.stack([tf.range(n), tf.fill([n], 4)], 1)}
  out = run_many(mode, view, seeds)
  auto = np.array([o["auto"] for o in out])
  assert 0.2 < auto.mean() < 0.8
  for o in out:
    if o["auto"]:
      assert not (o["jitter"] or o["gray"] or o["blur"])
      np.testing.assert_allclose(o["y"] * 255, np.round(o["y"] * 255), atol=1e-3)
    assert o["y"].min() >= 0 and o["y"].max() <= 1
  assert len({int(o["policy"]) for o in out}) > 8


def test_autoaugment_refuses_dense_fields():
  spec = V.ViewSpec("view1", 16, augment="moco_v2_aplus", fields=(V.MASKS,))
  with pytest.raises(ValueError, match="AutoAugment.*dense fields"):
    augment.sample_view_params(tf.constant([1, 2]), 20, 20, spec)
