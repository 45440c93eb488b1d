"""What the tests share: the tiny objective and its synthetic data, tiny configs, the
n-device subprocess runner and one sharded step, small records and folders, workdir
and process helpers. Test modules import from here (never from each other); the
subprocesses the tests start import it too (PYTHONPATH holds tests/)."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import common
from data_pipelines import batch as B
from data_pipelines import build, records
from data_pipelines import views as views_lib
from detcon_jax.core import checkpointing, sharding
from detcon_jax.core import state as state_lib
from detcon_jax.objectives import common as objectives_common
from detcon_jax.train import loop


# Tiny demo records (conftest.tiny_demo): 12 train + 4 test scenes at 48 px, 4 per shard.
TINY_DEMO = dict(num_train=12, num_test=4, shard_size=4, image_size=48, progress=False)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(4)(x)


def _nt_xent(z1, z2, temperature=0.5):
  z = jnp.concatenate([z1, z2]) / jnp.linalg.norm(jnp.concatenate([z1, z2]), axis=1,
                                                  keepdims=True)
  n = z1.shape[0]
  logits = z @ z.T / temperature - 1e9 * jnp.eye(2 * n)
  labels = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


class TinyObjective:
  """NT-Xent between the two views; `ema=True` adds an EMA target, laid out as
  objectives/registry.py says (state['target'] mirrors params)."""

  def __init__(self, ema: bool = False):
    self.net = _Net()
    self.ema = ema

  def init(self, rng, config, batch):
    variables = self.net.init(rng, batch[B.VIEW1], train=False)
    state = {"batch_stats": variables["batch_stats"]}
    if self.ema:
      state["target"] = jax.tree.map(jnp.copy, variables["params"])
    return variables["params"], state

  def loss(self, params, state, batch, rng, step, config):
    views = jnp.concatenate([batch[B.VIEW1], batch[B.VIEW2]])
    noise = 0.01 * jax.random.normal(rng, views.shape)   # uses the per-step rng
    z, updates = self.net.apply({"params": params, "batch_stats": state["batch_stats"]},
                                views + noise, train=True, mutable=["batch_stats"])
    z1, z2 = jnp.split(z, 2)
    loss = _nt_xent(z1, z2)
    new_state = dict(state, batch_stats=updates["batch_stats"])
    metrics = {"z_norm": jnp.linalg.norm(z, axis=1).mean()}
    if self.ema:
      metrics["tau"] = objectives_common.ema_decay(step, config.ema.tau0, config.steps)
    return loss, (metrics, new_state)

  def after_update(self, params, state, step, config):
    """The EMA target update of the bootstrap framework (objectives/byol.py)."""
    if not self.ema:
      return params, state
    tau = objectives_common.ema_decay(step, config.ema.tau0, config.steps)
    return params, dict(state, target=objectives_common.ema(state["target"], params, tau))

  def param_labels(self, params, config):
    return objectives_common.default_labels(params, config)

  def views(self, config):
    return views_lib.standard_views(config, masks=True)

  def default_config(self):
    return {}

  def validate(self, config):
    del config


def tiny_config(**overrides):
  c = common.demo_config("tiny", "simclr")
  c.ema = ml_collections.ConfigDict(dict(tau0=0.99))   # TinyObjective(ema=True)'s decay
  c.update(steps=6, batch_size=8, image_size=32, log_every_steps=2)
  c.optimizer.update(warmup_steps=1, base_lr=1.0)
  c.checkpoint.update(every_steps=2, keep=10)
  c.eval.at_end = False
  c.data.build_demo = False
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def synthetic_batches(nan_at=None, on_step=None):
  """BatchSource: a synthetic batch per step, deterministic in (seed, step)."""
  def source(config, start_step, host_index, host_count):
    step = start_step
    while True:
      if on_step is not None:
        on_step(step)
      b = B.synthetic_train_batch(config.batch_size, num_masks=config.loss.num_masks,
                                  seed=config.seed * 100_003 + step,
                                  specs=views_lib.standard_views(config, masks=True))
      per_host = config.batch_size // host_count
      b = {k: v[host_index * per_host:(host_index + 1) * per_host] for k, v in b.items()}
      if step == nan_at:
        b[B.VIEW1] = np.full_like(b[B.VIEW1], np.nan)
      yield b
      step += 1
  return source


def run(config, workdir, ema=False, **kw):
  return loop.train(config, str(workdir), objective=TinyObjective(ema), batches=synthetic_batches(**kw))


TESTS = os.path.dirname(os.path.abspath(__file__))


ROOT = os.path.dirname(TESTS)


def benchmark_module(name: str):
  """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"{name}_benchmark",
                                                os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def one_step(objective, config, out_path: str, host=None, metrics_saved=("loss",)) -> None:
  """Init, one sharded train step, then save the metrics + params (before and after).
  host: the host batch (default: synthetic for the objective's views)."""
  mesh = sharding.make_mesh()
  if host is None:
    host = B.synthetic_train_batch(config.batch_size, num_masks=config.loss.num_masks, seed=7,
                                   specs=objective.views(config))
  batch = sharding.host_batch_to_global(host, mesh)
  tx, schedule = state_lib.make_optimizer(objective, config)
  rep = sharding.replicated(mesh)
  init = jax.jit(lambda r, b: loop.init_train_state(objective, tx, config, r, b),
                 out_shardings=rep)
  ts = init(jax.random.PRNGKey(0), batch)
  before = checkpointing.to_host(ts["params"])
  step = jax.jit(loop.make_train_step(objective, tx, schedule, config, jax.random.PRNGKey(1)),
                 in_shardings=(rep, sharding.batch_sharded(mesh)), out_shardings=(rep, rep))
  ts, metrics = step(ts, batch)
  after = checkpointing.to_host(ts["params"])
  flat = {f"update/{jax.tree_util.keystr(k)}": a - b for (k, a), b in
          zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before))}
  saved = {k: np.asarray(checkpointing.to_host(metrics[k])) for k in metrics_saved}
  np.savez(out_path, devices=jax.device_count(), **saved, **flat)


def run_on_devices(snippet: str, out: str, devices: int = 8) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
  code = f"{snippet}\n"
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out))


def assert_same_update(one: dict, eight: dict, rtol: float, atol: float) -> None:
  assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
  np.testing.assert_allclose(eight["loss"], one["loss"], rtol=rtol)
  keys = [k for k in one if k.startswith("update/")]
  assert keys and sorted(keys) == sorted(k for k in eight if k.startswith("update/"))
  for k in keys:
    scale = np.abs(one[k]).max()
    assert scale > 0, k   # the step moved every parameter
    # Reduction order differs across shards: compare relative to the leaf's update size.
    np.testing.assert_allclose(eight[k], one[k], rtol=rtol, atol=max(atol, rtol * scale),
                               err_msg=k)


ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([TESTS, ROOT]))


def final_params(workdir) -> list:
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  try:
    ts = manager.restore(manager.latest_step())
  finally:
    manager.close()
  return jax.tree.leaves(ts)


def assert_same_state(a, b):
  la, lb = final_params(a), final_params(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def latest_step(workdir) -> int:
  path = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  steps = [int(p) for p in os.listdir(path) if p.isdigit()] if os.path.isdir(path) else []
  return max(steps, default=0)


SIZE = 32


def tiny_records(out, n=200, bad=()):
  """n examples in 10 shards; those in `bad` have an image that does not decode."""
  rng = np.random.default_rng(0)
  exs = [dict(image=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
              masks={"grid_2": (np.arange(SIZE)[:, None] // 16 * 2
                                + np.arange(SIZE)[None, :] // 16).astype(np.int32)})
         for _ in range(n)]
  manifest = build.write_records(str(out), {"train": exs}, shard_size=n // 10)
  if bad:
    for shard in manifest["splits"]["train"]["shards"]:
      path = os.path.join(out, shard["file"])
      recs = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
      first = int(shard["file"].split("-")[1]) * (n // 10)
      with tf.io.TFRecordWriter(path) as w:
        for i, rec in enumerate(recs, start=first):
          w.write(records.example_bytes(image=b"not an image", fmt="png", height=SIZE,
                                        width=SIZE, index=i, example_id=f"bad/{i}",
                                        masks={"grid_2": b"nor this"}) if i in bad else rec)
      if "bytes" in shard:        # builds that store them: the rewritten shard's own
        shard.update(records.file_digest(path))
    records.write_manifest(str(out), manifest)
  return str(out)


def records_config(records_dir, **kw):
  return tiny_config(**{"data.records_dir": records_dir, "data.mask_source": "grid",
                        "data.shuffle_buffer": 64, "log_every_steps": 2, **kw})


def _image(path, w=64, h=48, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def image_folder(root):
  """cats (one nested deeper), dogs, a 3000x40 strip, and a file beside the classes."""
  _image(root / "cats" / "a.png")
  _image(root / "cats" / "indoor" / "b.png", seed=1)
  _image(root / "dogs" / "c.png", seed=2)
  _image(root / "dogs" / "strip.png", w=3000, h=40, seed=3)
  _image(root / "loose.png", seed=4)
  return f"folder:{root}"


def run_build(source, out):
  return build.build(source, str(out), masks="grid", workers=1, image_size=32,
                     progress=False)


def child_pids(pid):
  """Processes whose parent is pid (Linux /proc)."""
  out = []
  for d in os.listdir("/proc"):
    try:
      stat = open(f"/proc/{d}/stat").read() if d.isdigit() else ""
    except OSError:
      continue
    if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
      out.append(int(d))
  return out


def is_alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def small_config(method, **kw):
  c = importlib.import_module(f"configs.{method}").get_config("demo")
  c.update(steps=3, batch_size=8, image_size=32, log_every_steps=1)
  c.views.small_size = 16
  c.model.width = 0.125
  c.head.update(hidden_dim=32, output_dim=16)
  c.loss.num_masks = 4
  c.optimizer.update(warmup_steps=1)
  c.checkpoint.every_steps = 0
  c.eval.at_end = False
  c.data.build_demo = False
  c.update(kw)
  return c


def _writable(path) -> bool:
  try:
    with open(os.path.join(path, ".probe"), "w"):
      pass
    os.remove(os.path.join(path, ".probe"))
    return True
  except OSError:
    return False


@contextlib.contextmanager
def read_only(path):
  """path unwritable for this process (chmod; chattr +i when root), or the test skipped."""
  path = str(path)
  os.chmod(path, 0o555)
  immutable = False
  try:
    if _writable(path) and os.geteuid() == 0:
      immutable = subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0
    if _writable(path):
      pytest.skip("cannot make a read-only directory on this filesystem")
    yield path
  finally:
    if immutable:
      subprocess.run(["chattr", "-i", path], check=True)
    os.chmod(path, 0o755)


def files(folder) -> dict:
  """{relative path: bytes} of every file under folder."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      path = os.path.join(root, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def refused(argv, named: str, cwd=ROOT) -> str:
  """Run a CLI; assert exit 1, exactly one `error:` line naming `named`, no traceback."""
  proc = subprocess.run(argv, env=ENV, cwd=str(cwd), capture_output=True, text=True,
                        timeout=600)
  out = proc.stdout + proc.stderr
  errors = [line for line in out.splitlines() if line.startswith("error:")]
  assert proc.returncode == 1, out[-3000:]
  assert len(errors) == 1 and named in errors[0], out[-3000:]
  assert "Traceback" not in out
  return errors[0]


def sigterm_at(step_to_kill):
  def on_step(step):
    if step == step_to_kill:
      os.kill(os.getpid(), signal.SIGTERM)
  return on_step


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def tiny_method_config(method, **views):
  c = importlib.import_module(f"configs.{method}").get_config("demo")
  c.update(image_size=32, batch_size=4, steps=10)
  c.optimizer.warmup_steps = 0
  c.model.update(depth=18, width=0.125, stem_pool=False)
  c.head.update(hidden_dim=16, output_dim=8)
  c.views.update(small_size=16, **views)
  return c


def tiny_preset_config(method):
  """The method's demo preset, shrunk: ResNet-18 x 1/8 at 32 px (stride 32), batch 4."""
  c = importlib.import_module(f"configs.{method}").get_config("demo")
  c.update(image_size=32, batch_size=4)
  c.model.update(depth=18, width=0.125, dtype="float32", stem_pool=True)
  c.head.update(hidden_dim=16, output_dim=8)
  c.loss.update(temperature=0.1, local_negatives=False, num_masks=4)
  return c


def box_examples(n=8, seed=0, size=48):
  """A coloured box on a flat per-image colour; mask id 1, saliency 1 on the box; the
  tiled background is white left of the box's centre column and black right of it."""
  rng = np.random.default_rng(seed)
  exs = []
  for i in range(n):
    img = np.empty((size, 64, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    m = np.zeros((size, 64), np.int32)
    y, x = rng.integers(0, 20), rng.integers(0, 30)
    img[y:y + 24, x:x + 20], m[y:y + 24, x:x + 20] = rng.integers(0, 256, 3), 1
    back = np.zeros((size, 64, 3), np.uint8)
    back[:, :x + 10] = 255
    exs.append(dict(image=img, masks={"box": m}, saliency=np.where(m == 1, 1.0, 0.0),
                    background=back))
  return exs


class TinyEncoder(nn.Module):
  """One strided conv named like the backbone's last stage: compiles in a moment."""
  stem_pool: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    return {"stage4": nn.relu(nn.Conv(16, (8, 8), strides=(8, 8))(x))}
