"""Online masks (config.data.mask_source='online', objectives/online_masks.py): K-means over
DetCon-B's EMA target features inside the step; correspondence, devices, training, warm
start, refusals."""
import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import batch as B
from detcon_jax.core import sharding, validation
from detcon_jax.errors import ConfigError
from detcon_jax.objectives import common, online_masks, registry
from detcon_jax.train import loop
from harness import run_on_devices, small_config

K = 3   # clusters: small_config's 32 px views give a 2 x 2 feature map at stride 16


def online_config(**online):
  c = small_config("detcon_b")
  c.data.mask_source = "online"
  c.online_masks.update(dict(dict(k=K), **online))
  return c


def _same_partition(a, b):
  """a and b [N] are the same partition up to relabelling."""
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_view2_equal_to_view1_gets_the_same_ids_and_one_hot_features_give_the_partition():
  rng = np.random.default_rng(0)
  maps = jnp.asarray(rng.normal(size=(3, 4, 4, 8)), jnp.float32)
  ids1, ids2 = online_masks.cluster_views(maps, maps, jax.random.PRNGKey(0), k=5)
  np.testing.assert_array_equal(ids1, ids2)
  assert ids1.shape == (3, 4, 4) and int(ids1.max()) < 5
  # Features that are a one-hot copy of a known id map (4 segments): K-means with k=4 gives
  # back that partition in view 1, and view 2 (its mirror image) is assigned to the
  # matching centroids: the same segment has the same id in both views.
  truth = np.zeros((2, 6, 6), np.int32)
  truth[0, :3, 3:], truth[0, 3:, :2], truth[0, 3:, 2:] = 1, 2, 3
  truth[1] = np.arange(6)[:, None] // 2 % 2 * 2 + np.arange(6)[None, :] // 3
  one_hot = jax.nn.one_hot(truth, 4) + 0.01 * rng.normal(size=(2, 6, 6, 4))
  mirrored = one_hot[:, :, ::-1]
  ids1, ids2 = online_masks.cluster_views(one_hot, mirrored, jax.random.PRNGKey(1), k=4)
  for i in range(2):
    assert _same_partition(np.asarray(ids1[i]).ravel(), truth[i].ravel())
  np.testing.assert_array_equal(ids2, np.asarray(ids1)[:, :, ::-1])
  # Positions join view 1's clustering only: view 2 is still matched by features.
  ids1, ids2 = online_masks.cluster_views(one_hot, mirrored, jax.random.PRNGKey(1), k=4,
                                          position_weight=0.3)
  np.testing.assert_array_equal(ids2, np.asarray(ids1)[:, :, ::-1])


def test_ids_are_drawn_among_clusters_present_in_both_views():
  p1 = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
  p2 = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1]], bool)
  m1, m2 = online_masks.sample_ids(jax.random.PRNGKey(0), p1, p2, 64)
  m1, m2 = np.asarray(m1), np.asarray(m2)
  assert set(m1[0]) == set(m2[0]) == {1}                    # the one shared cluster
  assert set(m1[1]) == {0} and set(m2[1]) == {1, 2}         # none shared: each its own
  np.testing.assert_array_equal(m1[2], m2[2])
  assert set(m1[2]) == {0, 1, 2, 3}
  ids = jnp.array([[[0, 0], [2, 2]], [[1, 1], [1, 1]]])
  np.testing.assert_array_equal(online_masks.present(ids, 3),
                                [[True, False, True], [False, True, False]])


def _host_batch(config, seed=3):
  spec_config = small_config("detcon_b")          # masked views: the records' masks too
  return B.synthetic_train_batch(8, num_masks=4, seed=seed,
                                 specs=registry.get_objective("detcon_b").views(spec_config))


def test_warm_start_keeps_the_records_masks_before_its_step():
  config = online_config(warm_start_steps=2)
  host = _host_batch(config)
  maps = {v: jnp.asarray(np.random.default_rng(1).normal(size=(8, 2, 2, 16)), jnp.float32)
          for v in (B.VIEW1, B.VIEW2)}
  run = jax.jit(lambda b, step: online_masks.replace_masks(maps, b, jax.random.PRNGKey(0),
                                                           step, config)[0])
  early, late = run(host, 1), run(host, 2)
  for k in (B.MASKS1, B.MASKS2, B.MASK_IDS1, B.MASK_IDS2):
    np.testing.assert_array_equal(early[k], host[k])
  online, _ = online_masks.replace_masks(maps, host, jax.random.PRNGKey(0), 2,
                                         online_config())
  for k in (B.MASK_IDS1, B.MASK_IDS2):
    np.testing.assert_array_equal(late[k], online[k])
  for k in (B.MASKS1, B.MASKS2):     # feature-grid ids, upsampled to the view (16 px cells)
    assert late[k].shape == host[k].shape == (8, 32, 32) and online[k].shape == (8, 2, 2)
    np.testing.assert_array_equal(late[k][:, ::16, ::16], online[k])
    np.testing.assert_array_equal(late[k][:, 15::16, 15::16], online[k])


def sharded_ids(out_path):
  """replace_masks on feature maps sharded over all (8) devices and on one device."""
  config = online_config()
  host = _host_batch(config)
  maps = {v: np.random.default_rng(i).normal(size=(8, 2, 2, 16)).astype(np.float32)
          for i, v in enumerate((B.VIEW1, B.VIEW2))}
  fn = lambda m, b: online_masks.replace_masks(m, b, jax.random.PRNGKey(5), 0, config)
  out = {}
  for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
    mesh = sharding.make_mesh(devices)
    new, metrics = jax.jit(fn)(sharding.host_batch_to_global(maps, mesh),
                               sharding.host_batch_to_global(host, mesh))
    for i, k in enumerate((B.MASKS1, B.MASKS2, B.MASK_IDS1, B.MASK_IDS2)):
      out[f"{name}_ids{i}"] = np.asarray(new[k])
    out[f"{name}_segments"] = float(metrics["online_masks/segments_per_view"])
  np.savez(out_path, devices=jax.device_count(), **out)


def ids_and_loss(out_path):
  """DetCon-B with online masks on one device and on all (8), same params and batch: the
  ids from the target encoder + replace_masks, and the loss."""
  config = online_config()
  objective = registry.get_objective("detcon_b")
  host = _host_batch(config)
  params, state = objective.init(jax.random.PRNGKey(0), config, host)
  rng = jax.random.PRNGKey(5)

  def ids(state, batch):
    nets = common.build_networks(config, True)
    maps, _ = common.encode(nets, state[common.TARGET], state[common.BATCH_STATS], batch,
                            objective.views(config))
    new, _ = online_masks.replace_masks(maps, batch, rng, 0, config)
    return [new[k] for k in (B.MASKS1, B.MASKS2, B.MASK_IDS1, B.MASK_IDS2)]

  def loss(params, state, batch):
    value, (metrics, _) = objective.loss(params, state, batch, rng, 0, config)
    return value, metrics["online_masks/segments_per_view"]

  out = {}
  for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
    mesh = sharding.make_mesh(devices)
    batch = sharding.host_batch_to_global(host, mesh)
    p, s = jax.device_put((params, state), sharding.replicated(mesh))
    for i, a in enumerate(jax.jit(ids)(s, batch)):
      out[f"{name}_ids{i}"] = np.asarray(a)
    value, segments = jax.jit(loss)(p, s, batch)
    out[f"{name}_loss"], out[f"{name}_segments"] = float(value), float(segments)
  np.savez(out_path, devices=jax.device_count(), **out)


def _assert_same_ids(r):
  assert int(r["devices"]) == 8
  for i in range(4):
    np.testing.assert_array_equal(r[f"all_ids{i}"], r[f"one_ids{i}"])
  assert r["one_ids0"].shape == (8, 2, 2) and r["one_ids2"].shape == (8, 4)
  assert r["one_segments"] == r["all_segments"] and r["one_segments"] >= 1


def test_online_masks_are_the_same_on_1_and_8_devices(tmp_path):
  """Per-image K-means (vmap) on a batch sharded over 8 devices: the ids of one device."""
  out = str(tmp_path / "out.npz")
  _assert_same_ids(run_on_devices(f"import test_online_masks as t; t.sharded_ids({out!r})",
                                  out))


@pytest.mark.slow   # 41 s under load; the test above covers the clustering on 8 devices
def test_detcon_b_online_ids_and_loss_are_the_same_on_1_and_8_devices(tmp_path):
  out = str(tmp_path / "out.npz")
  r = run_on_devices(f"import test_online_masks as t; t.ids_and_loss({out!r})", out)
  _assert_same_ids(r)
  np.testing.assert_allclose(r["all_loss"], r["one_loss"], rtol=1e-5)


def _tags(workdir):
  return {v.tag for path in glob.glob(f"{workdir}/tb/events*")
          for e in tf.compat.v1.train.summary_iterator(path) for v in e.summary.value}


def _warm_run(records_dir, workdir):
  config = online_config(warm_start_steps=1)
  config.data.update(records_dir=records_dir, shuffle_buffer=16)
  return loop.train(config, str(workdir))


def test_detcon_b_trains_on_online_masks_after_a_warm_start(tiny_demo, tmp_path):
  """A few real steps on the tiny demo records (FH masks at step 0, online after): finite
  losses; loss, chance and the segment counts logged; the masks panel at the checkpoint."""
  summary = _warm_run(tiny_demo[0], tmp_path)
  losses = summary["losses"]
  assert summary["status"] == "done" and len(losses) == 3
  assert all(np.isfinite(v) for v in losses.values()) and summary["chance"] > 0
  tags = _tags(tmp_path)
  assert {"loss", "chance", "online_masks/segments_per_view",
          "online_masks/shared_segments"} <= tags
  assert any(t.startswith("online masks: view1 | records' masks") for t in tags), tags


def test_a_warm_start_source_missing_from_the_records_names_its_own_key(tiny_demo):
  config = online_config(warm_start_steps=1)
  config.data.update(records_dir=tiny_demo[0])
  config.online_masks.warm_start_source = "mcg"
  with pytest.raises(ValueError, match=r"Set config\.online_masks\.warm_start_source to one of"):
    loop.records_batches(config, 0, 0, 1)


@pytest.mark.slow   # two more runs; test_warm_start_keeps_the_records_masks... covers the rule
def test_warm_start_step_0_is_the_fh_run_and_online_alone_trains(tiny_demo, tmp_path):
  records_dir, _ = tiny_demo
  warm = _warm_run(records_dir, tmp_path / "warm")["losses"]
  fh = small_config("detcon_b", steps=3)
  fh.data.update(records_dir=records_dir, shuffle_buffer=16)
  np.testing.assert_allclose(warm[0], loop.train(fh, str(tmp_path / "fh"))["losses"][0],
                             rtol=1e-5)
  online = online_config()
  online.data.update(records_dir=records_dir, shuffle_buffer=16, mask_source="online")
  online.steps = 2
  losses = loop.train(online, str(tmp_path / "online"))["losses"]
  assert all(np.isfinite(v) for v in losses.values())


def test_methods_without_an_ema_target_refuse_online_masks():
  for method in ("detcon_s", "byol", "simclr"):
    c = small_config(method)
    c.data.mask_source = "online"
    with pytest.raises(ConfigError, match=r"mask_source='online'.*detcon_b"):
      validation.validate(c)
  validation.validate(online_config())
  with pytest.raises(ConfigError, match="online_masks.k=0"):
    validation.validate(online_config(k=0))
  with pytest.raises(ConfigError, match="online_masks.init"):
    validation.validate(online_config(init="random"))
  # Without a warm start the input pipeline reads no mask field; with one, the FH masks.
  objective = registry.get_objective("detcon_b")
  assert all(not s.fields for s in objective.views(online_config()))
  warm = online_config(warm_start_steps=5)
  assert all("masks" in s.fields for s in objective.views(warm))
  assert online_masks.records_mask_source(warm) == "fh"


def test_benchmark_prices_online_masks_against_fh(train_step, capsys):
  train_step.main(["--online_masks", "--flops_only", "--depth", "18", "--width", "0.125",
                   "--image_size", "32", "--batch_size", "8"])
  out = capsys.readouterr().out
  assert "online / fh masks (DetCon-B): XLA flops x" in out, out
  config = train_step.make_config("detcon_b+online", train_step.argparse.Namespace(
      preset="cpu", paper_heads=False, depth=18, width=0.125, dtype="float32", stem_pool=False,
      batch_size=8, image_size=32, num_masks=4, local_negatives=False))
  assert config.data.mask_source == "online"
  # 8 images x (k-means++ 3nCk + (4i + 4) nkC), n = 2 x 2 cells, C = 64, k = 8, i = 10
  assert train_step.kmeans_flops(config) == 8 * (3 * 4 * 64 * 8 + 44 * 4 * 8 * 64)
