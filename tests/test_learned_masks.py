"""Learned masks (detcon_jax/evaluate/learned_masks.py): K-means segments of dense
features, and the offline round that adds them to records as the `learned` field."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import demo
from data_pipelines import input as input_lib
from data_pipelines import records
from detcon_jax.evaluate import learned_masks as LM
from detcon_jax.evaluate import mask_quality
from harness import ROOT

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def test_relabel_and_nearest_upsampling():
  ids = jnp.asarray([[[0, 5], [5, 9]], [[3, 3], [3, 3]]])
  np.testing.assert_array_equal(np.asarray(LM.relabel(ids, 16)),
                                [[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
  # Four distinct features on a 2x2 grid -> four 4x4 quadrants of an 8x8 image, ids 0..3.
  features = jnp.eye(4).reshape(1, 2, 2, 4)
  masks = LM.learned_masks(lambda images: features, np.zeros((1, 8, 8, 3)),
                           jax.random.PRNGKey(0), k=4, position_weight=0.0)
  assert masks.dtype == jnp.int32 and masks.shape == (1, 8, 8)
  quadrants = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 4, 0), 4, 1)
  assert mask_quality.average_best_overlap(quadrants[None], np.asarray(masks))["abo"] == 1.0
  assert sorted(np.unique(masks).tolist()) == [0, 1, 2, 3]


def test_colour_term_separates_what_features_do_not():
  """Equal features everywhere; the colour term alone splits a red from a blue half."""
  images = np.zeros((1, 8, 8, 3), np.float32)
  images[0, :, :4, 0], images[0, :, 4:, 2] = 1.0, 1.0
  flat = lambda x: jnp.ones((1, 4, 4, 8))
  halves = (np.arange(8)[None, :] >= 4).repeat(8, 0)[None].astype(np.int32)
  plain = LM.learned_masks(flat, images, jax.random.PRNGKey(0), k=2, position_weight=0.0)
  assert len(np.unique(plain)) == 1
  coloured = LM.learned_masks(flat, images, jax.random.PRNGKey(0), k=2, position_weight=0.0,
                              colour_weight=1.0)
  assert mask_quality.average_best_overlap(halves + 1, np.asarray(coloured))["abo"] == 1.0


def test_one_hot_gt_features_give_gt_masks():
  """A stand-in encoder whose dense features are a one-hot copy of the GT instance map
  (background included) gives masks with ABO > 0.95 with K=16 and no position term:
  the K-means clusters are the instances (extra centroids stay empty)."""
  scenes = [demo.example("train", i, size=48) for i in range(8)]
  images = np.stack([s["image"] for s in scenes]).astype(np.float32) / 255
  instances = np.stack([s["instances"] for s in scenes])
  stand_in = lambda x: jax.nn.one_hot(jnp.asarray(instances), int(instances.max()) + 1)
  masks = np.asarray(LM.learned_masks(stand_in, images, jax.random.PRNGKey(0), k=LM.K,
                                      position_weight=0.0))
  quality = mask_quality.average_best_overlap(instances, masks)
  assert quality["num_instances"] >= 8 and quality["abo"] > 0.95, quality
  # With the position term every cluster is used: K segments per image, compact ones.
  spread = np.asarray(LM.learned_masks(stand_in, images, jax.random.PRNGKey(0), k=LM.K))
  assert all(len(np.unique(m)) == LM.K for m in spread)


def _detcon_b_config(records_dir):
  """DetCon-B's demo preset, shrunk (ResNet-18 x 1/8, stride 16: a 6x6 dilated map at 48 px)."""
  from configs import detcon_b
  c = detcon_b.get_config("demo")
  c.update(steps=1, batch_size=4, image_size=32)
  c.model.update(width=0.125)
  c.head.update(hidden_dim=16, output_dim=8)
  c.loss.num_masks = 4
  c.data.update(records_dir=records_dir, build_demo=False)
  return c


def _checkpointed_workdir(config, workdir):
  """A workdir as training leaves it: config.json + a checkpoint of the run's train-state
  layout (jax.eval_shape of its init, filled with random values; BN variances 1), without
  compiling the network (the init alone compiles for 15 s on a loaded CPU)."""
  from data_pipelines import batch as B
  from detcon_jax.core import checkpointing
  from detcon_jax.core import state as state_lib
  from detcon_jax.objectives import registry
  objective = registry.get_objective(config.method)
  tx, _ = state_lib.make_optimizer(objective, config)
  batch = B.synthetic_train_batch(config.batch_size, num_masks=config.loss.num_masks,
                                  specs=objective.views(config))
  abstract = jax.eval_shape(lambda rng, b: state_lib.init_train_state(objective, tx, config,
                                                                      rng, b),
                            jax.random.PRNGKey(0), batch)
  leaves, tree = jax.tree_util.tree_flatten_with_path(abstract)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if "var" in jax.tree_util.keystr(path):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)

  train_state = jax.tree_util.tree_unflatten(tree, [fill(p, x) for p, x in leaves])
  checkpointing.save_config(workdir, config)
  manager = checkpointing.make_manager(workdir)
  checkpointing.save(manager, 0, train_state)
  checkpointing.wait(manager, 0)
  manager.close()
  return workdir


def test_learned_records_round_trip(tiny_demo, tmp_path):
  """records + a workdir -> new records with a `learned` field: every other byte of every
  record kept, shards verify, the manifest names the model, and mask_source=learned
  gives DetCon's training batches; a second round replaces the field."""
  from detcon_jax.train import loop
  records_dir, manifest = tiny_demo
  config = _detcon_b_config(records_dir)
  workdir = _checkpointed_workdir(config, str(tmp_path / "run"))
  out = str(tmp_path / "learned")
  new = LM.write_learned_records(records_dir, workdir, out, batch_size=4, progress=False)

  assert records.verify(out) == [] and records.main(["verify", out]) == 0
  spec = new["masks"][LM.NAME]
  assert spec["kind"] == LM.NAME and spec["step"] == 0 and spec["k"] == LM.K
  assert spec["workdir"] == os.path.abspath(workdir) and spec["method"] == "detcon_b"
  assert new["derived_from"] == os.path.abspath(records_dir)
  assert {n: m for n, m in new["masks"].items() if n != LM.NAME} == manifest["masks"]
  assert {s: v["count"] for s, v in new["splits"].items()} == {
      s: v["count"] for s, v in manifest["splits"].items()}

  import tensorflow as tf
  old_path = records.shard_paths(records_dir, manifest, "train")[0]
  new_path = records.shard_paths(out, new, "train")[0]
  for a, b in zip(tf.data.TFRecordDataset(old_path), tf.data.TFRecordDataset(new_path)):
    a, b = (tf.train.Example.FromString(x.numpy()).features.feature for x in (a, b))
    key = records.MASK_PREFIX + LM.NAME
    assert set(b) == set(a) | {key} and all(a[f] == b[f] for f in a)
    ids = records.decode_ids(b[key].bytes_list.value[0])
    image = tf.io.decode_image(a[records.IMAGE].bytes_list.value[0]).numpy()
    assert ids.shape == image.shape[:2]
    assert sorted(np.unique(ids)) == list(range(len(np.unique(ids))))   # 0..n-1
    assert 2 <= len(np.unique(ids)) <= LM.K

  config.data.update(records_dir=out, mask_source=LM.NAME)
  batch = next(loop.records_batches(config, 0, 0, 1))
  assert batch["view1/masks"].shape == (4, 32, 32) and batch["view1/mask_ids"].shape == (4, 4)
  assert input_lib.resolve_mask_names(new, "learned", out) == [LM.NAME]

  # The masks evaluation's TensorBoard panel: image | every stored source, learned among them
  from detcon_jax.evaluate import run, visualize
  (title, panels), = run.mask_panels(out, new, run.Settings(), 32).items()
  names = title.split(" | ")[1:]
  assert LM.NAME in names and set(names) == set(new["masks"])
  assert panels.dtype == np.uint8 and panels.shape == (
      run.NUM_PICTURES, 32, (1 + len(names)) * 32 + len(names) * visualize.SEPARATOR, 3)

  again = LM.write_learned_records(out, workdir, str(tmp_path / "round2"), batch_size=4,
                                   seed=1, dilated=False, progress=False)
  assert again["masks"][LM.NAME]["seed"] == 1 and again["masks"][LM.NAME]["replaces"] == spec
  # --nodilated: the network's own stride (the online masks' maps), at most one id per cell
  from detcon_jax.models.resnet import output_stride
  cells = (again["masks"][LM.NAME]["image_size"] // output_stride(config.model.stem_pool)) ** 2
  assert "dilated" in spec["features"] and "dilated" not in again["masks"][LM.NAME]["features"]
  for raw in tf.data.TFRecordDataset(records.shard_paths(str(tmp_path / "round2"), again,
                                                          "train")[0]):
    feature = tf.train.Example.FromString(raw.numpy()).features.feature
    assert len(np.unique(records.decode_ids(
        feature[records.MASK_PREFIX + LM.NAME].bytes_list.value[0]))) <= min(cells, LM.K)
  assert again["masks"][LM.NAME]["replaces"]["seed"] == 0
  assert again["derived_from"] == os.path.abspath(records_dir)   # the build's records

  # Model-made masks are not the build's to remake: the hint builds the records they came
  # from, then reruns the round; the demo build refuses to overwrite them.
  hint = records.rebuild_command(out, new)
  built, model = hint.split("`, then `")
  assert f"--out={os.path.abspath(records_dir)}" in built and LM.NAME not in built
  assert model.startswith(f"python -m detcon_jax.evaluate.learned_masks --records="
                          f"{os.path.abspath(records_dir)} --mask_model={os.path.abspath(workdir)}")
  from data_pipelines import build
  with pytest.raises(build.DemoSettingsError, match="derived from .* will not overwrite"):
    build.ensure_demo_records(out, masks=("mcg",))
  assert records.verify(out) == []


def test_mistakes_are_one_error_line(tiny_demo, tmp_path):
  """An existing --out, a workdir without a checkpoint, records without images."""
  from data_pipelines import build
  from detcon_jax.errors import InputError
  records_dir, _ = tiny_demo
  config = _detcon_b_config(records_dir)
  with pytest.raises(InputError, match="exists"):
    LM.write_learned_records(records_dir, str(tmp_path), str(tmp_path))
  empty = str(tmp_path / "empty")
  build.write_records(empty, {"train": []})
  with pytest.raises(InputError, match="hold no images"):
    LM.write_learned_records(empty, str(tmp_path), str(tmp_path / "out"))
  workdir = tmp_path / "untrained"
  from detcon_jax.core import checkpointing
  checkpointing.save_config(str(workdir), config)
  cli = subprocess.run([sys.executable, "-m", "detcon_jax.evaluate.learned_masks",
                        f"--records={records_dir}", f"--mask_model={workdir}",
                        f"--out={tmp_path / 'out'}"],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
  assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
  last = cli.stderr.strip().splitlines()[-1]
  assert last.startswith("error: No checkpoint in") and "train first" in last, last
  assert not (tmp_path / "out").exists()
