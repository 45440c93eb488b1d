"""Run a pretraining config on a Cloud TPU VM or a queued resource, and keep it running.

  python -m launch.tpu --config=configs/detcon_b.py:imagenet --tpu=v4-32 \
      --zone=us-central2-b --workdir=gs://BUCKET/runs/detcon_b [--spot] [--queued] \
      [--records=gs://BUCKET/records/imagenet] [--config.KEY=VALUE ...] [--dry_run]

What it does, as plain gcloud commands (--dry_run prints them as a bash script,
headed by launch.plan's one-line memory and FLOPs summary, and starts nothing;
without it, this module runs them):
  1. create the slice: `tpu-vm create` (or a `queued-resources create` that is
     waited for until ACTIVE) with the accelerator type, zone, runtime version
     and, if asked, spot / preemptible capacity;
  2. stage the code: a source archive of this checkout, copied to every worker
     (`tpu-vm scp --worker=all`);
  3. install it on every worker (`pip install -e .` plus jax[tpu]);
  4. train on every worker at once (`tpu-vm ssh --worker=all`):
     `python -m detcon_jax.train --config=... --workdir=gs://...`; each host
     reads its own shards of the records, checkpoints go to the workdir;
  5. preemption: while the training command fails, look at the slice; if it
     was preempted (or is gone), delete and re-create (or re-queue) it, stage
     and install again; then rerun the same command, which resumes from the
     latest checkpoint in the workdir;
  6. delete the slice when training has finished (--keep_tpu keeps it).

Checks before anything starts, each a one-line `error:` and exit status 2:
gcloud missing (not needed for --dry_run), a global batch the slice's device
count does not divide, a local workdir (or records) on a multi-host slice.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this checkout
ARCHIVE = "detcon-jax-src.tar.gz"
REMOTE_DIR = "~/detcon-jax"
SOURCES = ("pyproject.toml", "README.md", "detcon_jax", "data_pipelines", "configs", "launch")


# --- Slices ----------------------------------------------------------------------
# Per generation: how the number in the accelerator type counts (TensorCores or
# chips), TensorCores per chip, chips per host (VM), JAX devices per chip
# (v4/v5p run both TensorCores of a chip as one "megacore" device; v2/v3 expose
# each TensorCore), the gcloud accelerator-type prefix, and the TPU runtime.
@dataclasses.dataclass(frozen=True)
class Generation:
  name: str
  counts: str                 # "cores" or "chips"
  cores_per_chip: int
  chips_per_host: int
  devices_per_chip: int
  prefix: str
  runtime: str


GENERATIONS = {
    "v2": Generation("v2", "cores", 2, 4, 2, "v2", "tpu-ubuntu2204-base"),
    "v3": Generation("v3", "cores", 2, 4, 2, "v3", "tpu-ubuntu2204-base"),
    "v4": Generation("v4", "cores", 2, 4, 1, "v4", "tpu-ubuntu2204-base"),
    "v5p": Generation("v5p", "cores", 2, 4, 1, "v5p", "v2-alpha-tpuv5"),
    "v5e": Generation("v5e", "chips", 1, 8, 1, "v5litepod", "v2-alpha-tpuv5-lite"),
    "v6e": Generation("v6e", "chips", 1, 8, 1, "v6e", "v2-alpha-tpuv6e"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str       # what gcloud takes, e.g. v4-32, v5litepod-8
  generation: Generation
  chips: int
  hosts: int
  devices: int                # jax.device_count() on the slice

  @property
  def devices_per_host(self) -> int:
    return self.devices // self.hosts


class LaunchError(ValueError):
  """A problem to report as one `error:` line before anything starts."""


def parse_slice(tpu: str) -> Slice:
  """'v4-32', 'v5e-8' / 'v5litepod-8', 'v5p-16', 'v6e-16', 'v3-8', ... -> Slice."""
  m = re.fullmatch(r"(v\d+[a-z]*|v5litepod|v5lite|trillium)-(\d+)", tpu.strip().lower())
  if not m or ALIASES.get(m.group(1), m.group(1)) not in GENERATIONS:
    raise LaunchError(f"--tpu={tpu!r} is not an accelerator type; use e.g. v4-32, v5e-8 "
                      f"(= v5litepod-8), v5p-16, v6e-8, v3-8 ({', '.join(GENERATIONS)}).")
  gen = GENERATIONS[ALIASES.get(m.group(1), m.group(1))]
  n = int(m.group(2))
  if gen.counts == "cores":
    if n < 8 or n % 8:
      raise LaunchError(f"--tpu={tpu}: {gen.name} slices count TensorCores in multiples of 8 "
                        f"(e.g. {gen.name}-8, {gen.name}-32).")
    chips = n // gen.cores_per_chip
  else:
    if n not in (1, 4, 8) and (n < 8 or n % 8):
      raise LaunchError(f"--tpu={tpu}: {gen.name} slices have 1, 4, 8 or a multiple of 8 "
                        "chips up to 256.")
    chips = n
  hosts = max(1, chips // gen.chips_per_host)
  return Slice(f"{gen.prefix}-{n}", gen, chips, hosts, chips * gen.devices_per_chip)


# --- The plan ----------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
  name: str
  zone: str
  slice: Slice
  runtime_version: str
  project: str | None
  spot: bool
  preemptible: bool
  queued: bool
  workdir: str
  train_args: list[str]       # after `python -m detcon_jax.train`
  keep_tpu: bool
  archive: str                # local path of the source archive
  notes: list[str]
  summary: str = ""           # launch.plan's one line (memory and FLOPs per device)

  def _gcloud(self, *args) -> list[str]:
    tail = [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])
    return ["gcloud", "compute", "tpus", *args, *tail]

  @property
  def queued_name(self) -> str:
    return f"{self.name}-qr"

  def create(self) -> list[list[str]]:
    capacity = ["--spot"] if self.spot else (["--preemptible"] if self.preemptible else [])
    if self.queued:
      # Queued resources take --spot (preemptible is the older TPU VM flag).
      capacity = ["--spot"] if (self.spot or self.preemptible) else []
      return [self._gcloud("queued-resources", "create", self.queued_name,
                           f"--node-id={self.name}",
                           f"--accelerator-type={self.slice.accelerator_type}",
                           f"--runtime-version={self.runtime_version}", *capacity)]
    return [self._gcloud("tpu-vm", "create", self.name,
                         f"--accelerator-type={self.slice.accelerator_type}",
                         f"--version={self.runtime_version}", *capacity)]

  def queued_state(self) -> list[str]:
    return self._gcloud("queued-resources", "describe", self.queued_name,
                        "--format=value(state.state)")

  def tpu_state(self) -> list[str]:
    return self._gcloud("tpu-vm", "describe", self.name, "--format=value(state)")

  def delete(self) -> list[list[str]]:
    if self.queued:
      return [self._gcloud("queued-resources", "delete", self.queued_name, "--force",
                           "--quiet")]
    return [self._gcloud("tpu-vm", "delete", self.name, "--quiet")]

  def archive_command(self) -> list[str]:
    return ["tar", "czf", self.archive, "--exclude=__pycache__", *SOURCES]

  def ssh(self, command: str) -> list[str]:
    return self._gcloud("tpu-vm", "ssh", self.name, "--worker=all", "--command", command)

  def stage(self) -> list[list[str]]:
    return [self._gcloud("tpu-vm", "scp", self.archive, f"{self.name}:", "--worker=all")]

  def install(self) -> list[list[str]]:
    return [self.ssh(f"mkdir -p {REMOTE_DIR} && tar xzf ~/{os.path.basename(self.archive)} "
                     f"-C {REMOTE_DIR} && cd {REMOTE_DIR} && "
                     "python3 -m pip install -q -U pip && "
                     'python3 -m pip install -q -e . "jax[tpu]"')]

  def train(self) -> list[str]:
    env = "DETCON_DISTRIBUTED=1 " if self.slice.hosts > 1 else ""
    return self.ssh(f"cd {REMOTE_DIR} && {env}python3 -m detcon_jax.train "
                    + shlex.join(self.train_args))


def _q(argv: list[str]) -> str:
  return shlex.join(argv)


def script(plan: Plan, max_restarts: int) -> str:
  """The whole job as a bash script (what --dry_run prints)."""
  p, s = plan, plan.slice
  lines = [
      "#!/usr/bin/env bash",
      f"# detcon-jax on Cloud TPU: {s.accelerator_type} in {p.zone} ({s.chips} chips, "
      f"{s.hosts} host(s), {s.devices} JAX devices, {s.devices_per_host} per host), "
      f"runtime {p.runtime_version}"
      + (", spot" if p.spot else ", preemptible" if p.preemptible else "")
      + (", queued resource" if p.queued else "") + ".",
      f"# workdir {p.workdir}: checkpoints, config.json, TensorBoard (tb/).",
  ]
  lines += [f"# note: {n}" for n in p.notes]
  if p.summary:
    lines += [f"# plan: {p.summary}"]
  lines += ["set -uo pipefail", f"cd {shlex.quote(ROOT)}", "mkdir -p dist", ""]

  def up(indent=""):
    out = [f"{indent}# 1. Create the slice."]
    out += [indent + _q(c) for c in p.create()]
    if p.queued:
      out += [f"{indent}until [ \"$({_q(p.queued_state())})\" = ACTIVE ]; do sleep 60; done"]
    out += [f"{indent}# 2. Stage the code on every worker.", indent + _q(p.archive_command())]
    out += [indent + _q(c) for c in p.stage()]
    out += [f"{indent}# 3. Install it on every worker."]
    out += [indent + _q(c) for c in p.install()]
    return out

  state = p.queued_state() if p.queued else p.tpu_state()
  healthy = "ACTIVE" if p.queued else "READY"
  lines += up()
  lines += [
      "",
      "# 4. Train on every worker. 5. If that fails: a preempted (or vanished) slice is",
      "#    re-created and the same command resumes from the latest checkpoint in the",
      "#    workdir; on a healthy slice, a SIGTERM exit (143, maintenance) or a lost ssh",
      "#    connection (255) is retried, any other failure stops here.",
      "restarts=0",
      "while true; do",
      f"  {_q(p.train())}",
      "  rc=$?",
      "  if [ \"$rc\" -eq 0 ]; then break; fi",
      "  restarts=$((restarts + 1))",
      f"  if [ \"$restarts\" -gt {max_restarts} ]; then echo \"error: training failed $restarts times\" >&2; exit 1; fi",
      f"  state=\"$({_q(state)} 2>/dev/null || true)\"",
      f"  if [ \"$state\" != {healthy} ]; then",
      "    echo \"slice state '$state': re-creating it\" >&2",
  ]
  lines += ["    " + _q(c) + " || true" for c in p.delete()]
  lines += up("    ")
  lines += [
      "  elif [ \"$rc\" -ne 143 ] && [ \"$rc\" -ne 255 ]; then",
      "    echo \"error: training failed (exit status $rc) on a healthy slice; not retrying\" >&2",
      "    exit \"$rc\"",
      "  fi",
      "done", ""]
  if not p.keep_tpu:
    lines += ["# 6. Training finished: delete the slice."]
    lines += [_q(c) for c in p.delete()]
  return "\n".join(lines) + "\n"


# --- Running it (no --dry_run) ----------------------------------------------------------
def _run(argv, check=True) -> int:
  print("+ " + _q(argv), flush=True)
  rc = subprocess.call(argv, cwd=ROOT)
  if check and rc:
    raise SystemExit(f"error: command failed with exit status {rc}: {_q(argv)}")
  return rc


def _output(argv) -> str:
  proc = subprocess.run(argv, capture_output=True, text=True)
  return proc.stdout.strip() if proc.returncode == 0 else ""


def execute(plan: Plan, max_restarts: int) -> None:
  """Run the script's steps with subprocess (same commands, same loop)."""
  def up():
    for c in plan.create():
      _run(c)
    if plan.queued:
      while _output(plan.queued_state()) != "ACTIVE":
        time.sleep(60)
    _run(plan.archive_command())
    for c in plan.stage() + plan.install():
      _run(c)

  up()
  restarts = 0
  state_cmd = plan.queued_state() if plan.queued else plan.tpu_state()
  healthy = "ACTIVE" if plan.queued else "READY"
  while (rc := _run(plan.train(), check=False)) != 0:
    restarts += 1
    if restarts > max_restarts:
      raise SystemExit(f"error: training failed {restarts} times; giving up (see the log "
                       f"above; the workdir {plan.workdir} keeps the checkpoints).")
    state = _output(state_cmd)
    if state != healthy:
      print(f"slice state {state!r}: re-creating it", file=sys.stderr)
      for c in plan.delete():
        _run(c, check=False)
      up()
    elif rc not in (143, 255):
      raise SystemExit(f"error: training failed (exit status {rc}) on a healthy slice; "
                       "not retrying.")
  if not plan.keep_tpu:
    for c in plan.delete():
      _run(c, check=False)


# --- Command line ----------------------------------------------------------------------
def _load_config(spec: str, overrides: list[str]):
  """The config the workers will train, with the command line's overrides applied."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv)
  argv = ["launch.tpu", f"--config={spec}", *overrides]
  saved = sys.argv
  sys.argv = argv                       # config_flags reads overrides from sys.argv
  try:
    fv(argv)
    config = fv["config"].value
    config.keys()                 # loads the file (config_flags loads it lazily)
  except Exception as e:                # bad path, unknown preset or key, bad value
    from detcon_jax import cli          # the trainer's one-line description of it
    raise LaunchError(cli.describe(e, argv)) from None
  finally:
    sys.argv = saved
  return config


def make_plan(a, overrides: list[str]) -> Plan:
  s = parse_slice(a.tpu)
  config = _load_config(a.config, overrides)
  from detcon_jax.core.validation import validate
  from detcon_jax.errors import ConfigError
  if config.batch_size % s.devices:
    up = -(-config.batch_size // s.devices) * s.devices
    raise LaunchError(
        f"config.batch_size={config.batch_size} is not divisible by the {s.devices} devices of "
        f"{s.accelerator_type} ({s.chips} chips, {s.hosts} host(s)); use e.g. "
        f"--config.batch_size={up}.")
  try:
    validate(config, device_count=s.devices, process_count=s.hosts)
  except ConfigError as e:
    raise LaunchError(str(e)) from None
  remote = a.workdir.startswith("gs://")
  if s.hosts > 1 and not remote:
    raise LaunchError(
        f"--workdir={a.workdir} is local, but {s.accelerator_type} has {s.hosts} hosts that "
        "must share checkpoints; use a bucket, e.g. --workdir=gs://BUCKET/runs/NAME.")
  records = a.records or config.data.records_dir
  notes = []
  if s.hosts > 1 and not records.startswith("gs://"):
    if a.records:
      raise LaunchError(f"--records={a.records} is local, but {s.accelerator_type} has "
                        f"{s.hosts} hosts; put the records on GCS (gs://...).")
    notes.append(f"config.data.records_dir={records} is a path on each worker; every host must "
                 "hold those records there, or pass --records=gs://BUCKET/records/NAME "
                 "(build them with python -m data_pipelines.build --out=gs://...).")
  train_args = [f"--config={a.config}", f"--workdir={a.workdir}", *overrides]
  if a.records:
    train_args.append(f"--config.data.records_dir={a.records}")
  name = a.name or re.sub(r"[^a-z0-9-]", "-", f"{config.method}-{s.accelerator_type}")
  return Plan(name=name, zone=a.zone, slice=s,
              runtime_version=a.runtime_version or s.generation.runtime, project=a.project,
              spot=a.spot, preemptible=a.preemptible, queued=a.queued, workdir=a.workdir,
              train_args=train_args, keep_tpu=a.keep_tpu,
              archive=os.path.join("dist", ARCHIVE), notes=notes)


def plan_summary(a, overrides: list[str]) -> str:
  """launch.plan's one-line summary for this config and slice (compiled for CPU in a child
  process, which makes the slice's device count); a failure is reported, not fatal."""
  cmd = [sys.executable, "-m", "launch.plan", f"--config={a.config}", f"--tpu={a.tpu}",
         "--summary", *overrides]
  print("planning memory and FLOPs per device (python -m launch.plan, compiling for CPU; "
        "minutes at ResNet-50, --no_plan skips it) ...", file=sys.stderr, flush=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode or not lines:
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")] or ["failed"]
    return f"not available ({errors[-1]})"
  return lines[-1]


def parser():
  import argparse
  p = argparse.ArgumentParser(
      prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
      epilog="Any --config.KEY=VALUE is passed on to the trainer (and checked here first).")
  p.add_argument("--config", required=True, help="configs/<method>.py:<preset>")
  p.add_argument("--tpu", required=True, help="accelerator type: v4-32, v5e-8, v5p-16, v6e-8 ...")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH (required on multi-host)")
  p.add_argument("--records", default=None,
                 help="records directory for the workers (default: the config's)")
  p.add_argument("--name", default=None, help="TPU name (default: METHOD-TYPE, e.g. detcon-b-v4-32)")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  p.add_argument("--runtime_version", default=None,
                 help="TPU software version (default: the generation's JAX runtime)")
  p.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheaper)")
  p.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU VM")
  p.add_argument("--queued", action="store_true",
                 help="request a queued resource and wait for it to become ACTIVE")
  p.add_argument("--max_restarts", type=int, default=20,
                 help="give up after this many failed training runs")
  p.add_argument("--keep_tpu", action="store_true", help="do not delete the slice at the end")
  p.add_argument("--dry_run", action="store_true",
                 help="print the gcloud commands as a bash script, with launch.plan's summary "
                      "(memory and FLOPs per device); start nothing")
  p.add_argument("--no_plan", action="store_true",
                 help="leave launch.plan's summary out of the dry run (it compiles for minutes)")
  return p


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  overrides = [x for x in argv if x.startswith("--config.")]
  a = parser().parse_args([x for x in argv if not x.startswith("--config.")])
  try:
    if a.spot and a.preemptible:
      raise LaunchError("--spot and --preemptible exclude each other; spot is the newer one.")
    if not a.dry_run and shutil.which("gcloud") is None:
      raise LaunchError("gcloud is not on PATH; install the Google Cloud CLI "
                        "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth "
                        "login`, or add --dry_run to print the commands only.")
    plan = make_plan(a, overrides)
  except LaunchError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.dry_run:
    if not a.no_plan:
      plan.summary = plan_summary(a, overrides)
    sys.stdout.write(script(plan, a.max_restarts))
    return 0
  os.makedirs(os.path.join(ROOT, os.path.dirname(plan.archive)), exist_ok=True)
  execute(plan, a.max_restarts)
  return 0


if __name__ == "__main__":
  sys.exit(main())
