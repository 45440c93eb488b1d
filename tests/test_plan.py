"""launch/plan.py: FLOPs as benchmarks/train_step.py counts them, the CPU-compiled memory
line, remat's cost and saving, the fit and largest-batch search, launch.tpu's plan line,
and benchmarks/accelerator.sh --dry_run. Tiny networks (ResNet-18 x0.25, 32 px) only."""
import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from detcon_jax.models import resnet
from detcon_jax.core import sharding
from launch import plan, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
METHOD = "simclr"


def _args(**kw):
  """benchmarks/train_step.py's arguments at its CPU preset, smaller."""
  return argparse.Namespace(**dict(dict(
      preset="cpu", depth=18, width=0.25, image_size=32, small_size=32, batch_size=8,
      dtype="float32", paper_heads=False, stem_pool=False, num_masks=4, local_negatives=False,
      flops_only=True), **kw))


def _target(memory_bytes: float) -> plan.Target:
  """One device with `memory_bytes` of memory (a fake, tiny accelerator)."""
  return plan.Target("fake-1", plan.Accelerator("fake", int(memory_bytes), 1e12, 1, ("fake",)),
                     devices=1, hosts=1)


@pytest.fixture(scope="module")
def rows(train_step):
  """The plan of the tiny config without and with remat (one set of CPU compiles)."""
  config = train_step.make_config(METHOD, _args())
  remat = train_step.make_config(METHOD, _args())
  remat.model.remat = True
  base = plan.plan(config, _target(2 ** 40), probe_batches=(2, 4))
  return base, plan.plan(remat, _target(2 ** 40), cpu=base["cpu"])


def test_flops_are_train_step_benchmarks_count(train_step, rows):
  args = _args()
  mesh = sharding.make_mesh(jax.devices()[:1])
  counted = train_step.compile_pair((METHOD,), args, mesh, jax.random.PRNGKey(0))
  assert rows[0]["flops"] == counted[METHOD]["flops"] > 0
  assert rows[0]["flops_per_image"] == rows[0]["flops"] / args.batch_size


def test_memory_line_goes_through_the_compiled_probes(rows):
  line = rows[0]["cpu"].line
  assert sorted(line.points) == [2, 4] and line.per_image > 0 < line.fixed
  for b, peak in line.points.items():
    assert line.fixed + line.per_image * b == pytest.approx(peak)
  assert rows[0]["peak"] == pytest.approx(line.at(8))          # read at the real batch


def test_remat_costs_flops_saves_memory_and_keeps_the_forward(train_step, rows):
  base, remat = rows
  assert remat["remat"] and not base["remat"]
  assert remat["flops"] > base["flops"]                          # the recomputed forward
  assert remat["kept"] < base["kept"]                            # fewer activations kept
  assert remat["peak"] < base["peak"]
  assert remat["largest"] >= base["largest"]
  # Same parameters, same images: the same feature maps (and batch statistics) in training
  # mode with and without remat.
  config = train_step.make_config(METHOD, _args())
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
  shapes = jax.eval_shape(lambda x: resnet.encoder_from_config(config).init(
      jax.random.PRNGKey(0), x, train=True), images)
  rng = np.random.default_rng(0)          # random values: flax's init compiles for seconds
  variables = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), shapes)
  outs = []
  for remat in (False, True):
    config.model.remat = remat
    model = resnet.encoder_from_config(config)
    outs.append(jax.jit(lambda v, x, m=model: m.apply(v, x, train=True,
                                                       mutable=["batch_stats"]))(variables, images))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_largest_fit_searches_powers_of_two():
  def memory(b):
    return 100 + 10 * b
  assert plan.largest_fit(memory, 260, start=4) == 16            # doubling up
  assert plan.largest_fit(memory, 260, start=256) == 16          # halving down
  assert plan.largest_fit(memory, 180, start=24) == 8
  assert plan.largest_fit(memory, 105, start=8) == 0             # not even one image
  assert plan.largest_fit(memory, 1e12, start=8, limit=64) == 64


def test_fit_on_a_fake_tiny_device(train_step, rows):
  line = rows[0]["cpu"].line
  config = train_step.make_config(METHOD, _args(batch_size=16))
  small = _target((line.at(8) + line.at(16)) / 2)                # 8 per device fits, 16 not
  row = plan.plan(config, small, cpu=rows[0]["cpu"])
  assert (row["per_device"], row["fits"], row["largest"]) == (16, False, 8)
  assert "does NOT fit" in plan.summary(row) and "8/device" in plan.summary(row)
  assert row["line"] == (line.fixed, line.per_image)             # in the summary, for others
  assert f"{line.per_image / 2 ** 20:.1f} MiB per image" in plan.summary(row)
  row = plan.plan(config, _target(line.at(16)), cpu=rows[0]["cpu"])
  assert row["fits"] and row["largest"] == 16
  assert "CPU-compiled estimate" in plan.summary(row)


def test_devices_table_and_targets():
  v4, v3, h100 = plan.tpu_target("v4-32"), plan.tpu_target("v3-8"), plan.gpu_target("h100")
  assert (v4.devices, v4.hosts, v4.memory, v4.peak) == (16, 4, 32 * plan.GiB, 275e12)
  assert (v3.devices, v3.memory, v3.peak) == (8, 16 * plan.GiB, 61.5e12)   # per TensorCore
  assert (h100.devices, h100.hosts, h100.memory) == (8, 1, 0.75 * 80e9)
  assert plan.gpu_target("h100-16").hosts == 2
  assert plan.accelerator_of("TPU v5 lite") == "v5e" and plan.accelerator_of("TPU v5") == "v5p"
  assert plan.accelerator_of("NVIDIA H100 80GB HBM3") == "h100"
  with pytest.raises(tpu.LaunchError, match="h100"):
    plan.gpu_target("k80")


def test_dry_run_script_carries_the_plan_line():
  a = tpu.parser().parse_args(["--config=configs/detcon_b.py:imagenet", "--tpu=v4-32",
                               "--zone=us-central2-b", "--workdir=gs://b/run", "--dry_run"])
  job = tpu.make_plan(a, [])
  job.summary = "detcon_b on v4-32: 256/device ..."
  script = tpu.script(job, 3)
  assert "\n# plan: detcon_b on v4-32: 256/device ...\n" in script
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.slow
def test_launch_tpu_dry_run_plans_end_to_end():
  out = subprocess.run(
      [sys.executable, "-m", "launch.tpu", "--config=configs/simclr.py:demo", "--tpu=v5e-8",
       "--zone=z", "--workdir=gs://b/r", "--dry_run", "--config.model.width=0.25",
       "--config.image_size=32", "--config.batch_size=16"],
      cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  line = next(x for x in out.stdout.splitlines() if x.startswith("# plan: "))
  assert "simclr:demo on v5e-8: 2/device (global 16)" in line and ": fits;" in line


def test_accelerator_sh_dry_run_names_install_and_runs():
  out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "accelerator.sh"), "--dry_run",
                        "--methods=detcon_b,byol"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  text = out.stdout
  assert "pip install -q -U jax\\[cuda12\\]" in text or "pip install -q -U jax\\[tpu\\]" in text
  for m in ("detcon_b", "byol"):
    assert f"-m launch.plan --config=configs/{m}.py:imagenet" in text
    assert f"benchmarks/train_step.py --preset imagenet --methods {m}" in text
  assert "nothing installed or run" in text
