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
# JAX_COORDINATOR_ADDRESS: set by hand or by a launcher for GPU/CPU clusters
#   (together with JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
#   jax.distributed.initialize reads itself).
# TPU_WORKER_HOSTNAMES: set on Cloud TPU VMs; more than one name = a pod slice,
#   where jax.distributed.initialize() discovers everything on its own.
# SLURM_NTASKS / OMPI_COMM_WORLD_SIZE > 1: cluster launchers jax auto-detects.
_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS",)
_WORLD_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def is_multi_host_environment(env=None) -> bool:
  """Whether the environment says several processes take part in this run."""
  env = os.environ if env is None else env
  if any(env.get(k) for k in _MULTI_HOST_ENV):
    return True
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return True
  return any(int(env.get(k, "1") or 1) > 1 for k in _WORLD_SIZE_ENV)


def maybe_initialize_distributed() -> bool:
  """Call jax.distributed.initialize() once, only when running multi-host.

  Must run before anything touches jax devices. Returns True if it initialised.
  Single-host runs (laptop, one TPU VM, tests) skip it.
  """
  if not is_multi_host_environment():
    return False
  jax.distributed.initialize()
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

