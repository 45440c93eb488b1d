"""Device mesh, shardings and multi-host start-up.

One 1-D mesh over every device of every host, axis 'data'. Batches are split
on their leading axis over 'data'; parameters, optimizer and EMA state are
replicated. Under jit, reductions over the batch axis (batch-norm statistics,
contrastive negatives) therefore span the global batch: XLA inserts the
cross-device collectives.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables that mean "this process is one of several hosts".
# JAX_COORDINATOR_ADDRESS (host:port): set by hand or by a launcher for CPU/GPU
#   clusters, with JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here and passed
#   to jax.distributed.initialize, which reads only the address itself). This
#   is how tests/test_multihost.py runs 2 CPU processes on localhost.
# DETCON_DISTRIBUTED=1: set by launch/tpu.py on multi-host TPU slices, where
#   jax.distributed.initialize() discovers everything from the TPU metadata.
# TPU_WORKER_HOSTNAMES: set on Cloud TPU VMs; more than one name = a pod slice.
# SLURM_NTASKS / OMPI_COMM_WORLD_SIZE > 1: cluster launchers jax auto-detects.
_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "DETCON_DISTRIBUTED")
_WORLD_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def is_multi_host_environment(env=None) -> bool:
  """Whether the environment says several processes take part in this run."""
  env = os.environ if env is None else env
  if any(env.get(k) not in (None, "", "0") for k in _MULTI_HOST_ENV):
    return True
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return True
  return any(int(env.get(k, "1") or 1) > 1 for k in _WORLD_SIZE_ENV)


def distributed_args(env=None) -> dict:
  """jax.distributed.initialize keyword arguments given by the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); what is not
  given, JAX detects (TPU metadata, SLURM, Open MPI)."""
  env = os.environ if env is None else env
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if env.get(key, "") != "":
      try:
        kwargs[arg] = int(env[key])
      except ValueError:
        raise ValueError(f"{key}={env[key]!r} must be an integer.") from None
  return kwargs


def maybe_initialize_distributed() -> bool:
  """Call jax.distributed.initialize() once, only when running multi-host.

  Must run before anything touches jax devices. Returns True if it initialised.
  Single-host runs (laptop, one TPU VM, tests) skip it. Processes on CPU talk
  through gloo collectives (cross-process all-reduce for the sharded step).
  """
  if not is_multi_host_environment():
    return False
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:        # a JAX without that option: its default applies
    pass
  jax.distributed.initialize(**distributed_args())
  return True


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def host_batch_to_global(batch: dict, mesh: Mesh) -> dict:
  """This host's numpy batch -> global jax.Arrays split over 'data'.

  Each host passes its own slice (global_batch / process_count rows); the
  result has the global batch as its leading dimension.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}

