"""The build as an Apache Beam pipeline: the same shards, byte for byte, on many workers.

  python -m data_pipelines.build --source=demo --out=DIR --masks=fh,grid,gt \
      --runner=beam --direct_num_workers=2 --direct_running_mode=multi_processing

  # Dataflow (documented, not run here): records and workers on GCP
  python -m data_pipelines.build --source=tfds:imagenet2012 --data_dir=gs://B/tfds \
      --out=gs://B/records/imagenet --masks=fh,grid --runner=beam \
      --beam_runner=DataflowRunner --project=P --region=us-central1 \
      --temp_location=gs://B/tmp --max_num_workers=8 --machine_type=n2-highcpu-16 \
      --extra_package=dist/detcon_jax-0.1.0-py3-none-any.whl  # pip wheel --no-deps -w dist .

The unit of work is one shard: Create(shard jobs) -> Reshuffle (spread them
over workers) -> ParDo(read inputs, masks, encode, write the shard and its
sidecar). Each worker runs exactly the local builder's `shard_job.run_job`, so
records are identical to a local build; the manifest is then assembled on the
launching machine from the sidecars, as the local runner does. Shards that are
already complete (matching sidecar) are not recomputed, so a failed pipeline
can simply be rerun.
"""
from __future__ import annotations

import os

from data_pipelines import shard_job

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_beam():
  try:
    import apache_beam  # noqa: F401
  except ImportError as e:
    raise ImportError("--runner=beam needs Apache Beam: pip install -e '.[beam]' "
                      "(or pip install apache-beam).") from e
  return apache_beam


class _ShardFn:
  """Beam DoFn body (wrapped in run() so this module imports without Beam)."""

  def __init__(self, out_dir: str, plan: dict):
    self.out_dir, self.plan = out_dir, plan

  def __call__(self, job: dict):
    side = shard_job.run_job(self.out_dir, self.plan, job)
    return {k: side[k] for k in ("file", "count", "bytes", "sha256")}


def pipeline_options(options: list[str]):
  """PipelineOptions for the flags given; several DirectRunner workers default to
  processes (threads would share one GIL)."""
  beam = _import_beam()
  from apache_beam.options.pipeline_options import PipelineOptions
  del beam
  options = list(options)
  workers = [o for o in options if o.startswith("--direct_num_workers")]
  if workers and not any(o.startswith("--direct_running_mode") for o in options):
    n = int(workers[-1].split("=", 1)[1]) if "=" in workers[-1] else 1
    if n > 1:
      options.append("--direct_running_mode=multi_processing")
  return PipelineOptions(options)


def run(b: dict, options: list[str]) -> None:
  """Run build.plan_build's jobs as a Beam pipeline; fills b['sides'] from the sidecars."""
  beam = _import_beam()
  jobs = b["jobs"]
  if jobs:
    fn = _ShardFn(b["out_dir"], b["plan"])
    # Worker subprocesses of the DirectRunner must import this checkout.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, old) if p)
    try:
      with beam.Pipeline(options=pipeline_options(options)) as p:
        _ = (p
             | "shard jobs" >> beam.Create(jobs)
             | "spread" >> beam.Reshuffle()
             | "masks + write" >> beam.Map(fn))
    finally:
      if old is None:
        os.environ.pop("PYTHONPATH", None)
      else:
        os.environ["PYTHONPATH"] = old
  for job in jobs:
    side = shard_job.done(b["out_dir"], job["fname"], job["settings"])
    if side is None:
      raise RuntimeError(f"The Beam pipeline finished but shard {job['fname']} is missing "
                         f"in {b['out_dir']}; rerun to complete it.")
    b["sides"][job["fname"]] = side
