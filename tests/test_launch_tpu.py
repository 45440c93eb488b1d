"""launch/tpu.py: slice arithmetic, the gcloud command sequence, and its clear errors.

The preemption loop is exercised end to end against a fake `gcloud` that
records its calls and reports the slice preempted after the first training
attempt: once through the printed script (--dry_run | bash) and once through
the launcher itself.
"""
import os
import shlex
import stat
import subprocess
import sys

import pytest

from launch import tpu
from harness import ROOT

IMAGENET = "--config=configs/detcon_b.py:imagenet"


@pytest.mark.parametrize("name, gcloud_type, chips, hosts, devices", [
    ("v2-8", "v2-8", 4, 1, 8), ("v3-32", "v3-32", 16, 4, 32),
    ("v4-8", "v4-8", 4, 1, 4), ("v4-32", "v4-32", 16, 4, 16),
    ("v5p-16", "v5p-16", 8, 2, 8), ("v5e-8", "v5litepod-8", 8, 1, 8),
    ("v5litepod-16", "v5litepod-16", 16, 2, 16), ("v5e-4", "v5litepod-4", 4, 1, 4),
    ("v6e-8", "v6e-8", 8, 1, 8), ("v6e-64", "v6e-64", 64, 8, 64)])
def test_slices_know_chips_hosts_and_devices(name, gcloud_type, chips, hosts, devices):
  s = tpu.parse_slice(name)
  assert (s.accelerator_type, s.chips, s.hosts, s.devices) == (gcloud_type, chips, hosts, devices)


def _dry_run(capsys, *args):
  assert tpu.main([IMAGENET, "--workdir=gs://b/run", "--dry_run", "--no_plan", *args]) == 0
  return capsys.readouterr().out


def _commands(script):
  """The gcloud command lines of a script, as argument lists."""
  return [shlex.split(line.strip())
          for line in script.splitlines() if line.strip().startswith("gcloud ")]


def test_v4_32_dry_run_prints_the_whole_job(capsys):
  out = _dry_run(capsys, "--tpu=v4-32", "--zone=us-central2-b")
  cmds = _commands(out)
  create = cmds[0]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
          "--zone=us-central2-b"} <= set(create)
  scp = next(c for c in cmds if c[4] == "scp")
  assert "--worker=all" in scp and scp[5] == "dist/detcon-jax-src.tar.gz"
  ssh = [c for c in cmds if c[4] == "ssh"]
  install, train = ssh[0], ssh[1]
  assert all("--worker=all" in c for c in ssh)
  assert "pip install -q -e ." in install[install.index("--command") + 1]
  remote = train[train.index("--command") + 1]
  assert ("DETCON_DISTRIBUTED=1 python3 -m detcon_jax.train "
          "--config=configs/detcon_b.py:imagenet --workdir=gs://b/run") in remote
  assert "5. If that fails: a preempted (or vanished) slice is" in out
  assert "gcloud compute tpus tpu-vm describe detcon-b-v4-32" in out
  assert '[ "$state" != READY ]' in out
  assert cmds[-1][4:6] == ["delete", "detcon-b-v4-32"]
  assert "16 chips, 4 host(s), 16 JAX devices" in out
  assert "records_dir=data/imagenet is a path on each worker" in out   # noted, not hidden
  assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0


def test_v5e_8_spot_queued_resource(capsys):
  out = _dry_run(capsys, "--tpu=v5e-8", "--zone=us-west4-a", "--spot", "--queued",
                 "--records=gs://b/records/imagenet", "--config.steps=400000")
  cmds = _commands(out)
  create = cmds[0]
  assert create[3:5] == ["queued-resources", "create"]
  assert {"--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
          "--node-id=detcon-b-v5litepod-8", "--zone=us-west4-a"} <= set(create)
  assert "until [" in out and "ACTIVE" in out
  train = [c for c in cmds if c[4] == "ssh"][1]
  remote = train[train.index("--command") + 1]
  assert "DETCON_DISTRIBUTED" not in remote                      # one host
  assert remote.endswith("--workdir=gs://b/run --config.steps=400000 "
                         "--config.data.records_dir=gs://b/records/imagenet")
  assert "queued-resources delete detcon-b-v5litepod-8-qr --force --quiet" in out


def _errors(capsys, *args):
  rc = tpu.main(list(args))
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_clear_errors(capsys, monkeypatch):
  base = [IMAGENET, "--zone=z"]
  msg = _errors(capsys, *base, "--tpu=v4-24", "--workdir=gs://b/r", "--dry_run")
  assert "batch_size=4096 is not divisible by the 12 devices of v4-24" in msg
  msg = _errors(capsys, *base, "--tpu=v5e-8", "--workdir=gs://b/r", "--config.batch_size=100",
                "--dry_run")
  assert "--config.batch_size=104" in msg
  msg = _errors(capsys, *base, "--tpu=v4-32", "--workdir=runs/x", "--dry_run")
  assert "--workdir=runs/x is local" in msg and "4 hosts" in msg
  msg = _errors(capsys, *base, "--tpu=v9-8", "--workdir=gs://b/r", "--dry_run")
  assert "not an accelerator type" in msg
  # config mistakes read as the trainer's (detcon_jax/cli.describe)
  msg = _errors(capsys, *base, "--tpu=v5e-8", "--workdir=gs://b/r", "--config.nope=1", "--dry_run")
  assert msg.startswith("error: --config.nope=1: config.nope is not a config key"), msg
  msg = _errors(capsys, "--config=configs/nope.py:demo", "--zone=z", "--tpu=v5e-8",
                "--workdir=gs://b/r", "--dry_run")
  assert "configs/nope.py:demo: no such config file" in msg, msg
  monkeypatch.setenv("PATH", "/nonexistent")
  msg = _errors(capsys, *base, "--tpu=v5e-8", "--workdir=gs://b/r")
  assert "gcloud is not on PATH" in msg
  assert tpu.main([*base, "--tpu=v5e-8", "--workdir=runs/x", "--dry_run",
                   "--no_plan"]) == 0  # 1 host: fine


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records each call; the first training run "is preempted", the second succeeds.
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
  *"tpu-vm create"*) echo READY > "$FAKE_DIR/state" ;;
  *"tpu-vm describe"*) cat "$FAKE_DIR/state" ;;
  *detcon_jax.train*)
    if [ ! -e "$FAKE_DIR/trained_once" ]; then
      touch "$FAKE_DIR/trained_once"; echo PREEMPTED > "$FAKE_DIR/state"; exit 255
    fi ;;
esac
exit 0
"""


@pytest.mark.parametrize("how", ["script", "launcher"])
def test_preemption_recreates_the_slice_and_reruns_the_same_command(tmp_path, how):
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(FAKE_GCLOUD)
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
             PYTHONPATH=ROOT)
  args = [sys.executable, "-m", "launch.tpu", IMAGENET, "--tpu=v4-32", "--zone=us-central2-b",
          "--workdir=gs://b/run"]
  if how == "script":
    script = subprocess.run(args + ["--dry_run", "--no_plan"], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=True).stdout
    proc = subprocess.run(["bash"], input=script, env=env, capture_output=True, text=True)
  else:
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  calls = [c.split()[:4] for c in (tmp_path / "calls").read_text().splitlines()]
  verbs = [c[3] for c in calls]
  # create, scp, install, train (preempted), describe, delete, create, scp, install, train, delete
  assert verbs == ["create", "scp", "ssh", "ssh", "describe", "delete", "create", "scp", "ssh",
                   "ssh", "delete"], verbs
  trains = [c for c in (tmp_path / "calls").read_text().splitlines() if "detcon_jax.train" in c]
  assert len(trains) == 2 and trains[0] == trains[1]          # the same command resumes
