"""Device mesh and shardings for data-parallel training (jax.sharding, no pmap), multi-host.

The mesh comes from `config.mesh.axes`: (name, size) pairs where one size may be -1 for "all
remaining devices". The batch is split over the `data` axis, parameters and optimizer state are
replicated, and the jit-compiled step computes BatchNorm statistics and gradients over the global
batch: XLA inserts the collectives. With several processes (jax.distributed), each process
synthesises only its rows of every global batch and process 0 alone writes outputs.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def mesh_shape(axes: tuple[tuple[str, int], ...], num_devices: int) -> dict[str, int]:
  """Resolves the -1 of `axes` against `num_devices`; raises ValueError naming the mesh."""
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if DATA_AXIS not in names:
    raise ValueError(f"config.mesh.axes={axes!r}: needs a {DATA_AXIS!r} axis")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh.axes={axes!r}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"config.mesh.axes={axes!r}: {known} does not divide the {num_devices} "
                     f"devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh.axes={axes!r}: uses {math.prod(sizes)} of the "
                     f"{num_devices} devices")
  return dict(zip(names, sizes))


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The config's mesh over all devices; checks that the batch splits over the data axis."""
  shape = mesh_shape(tuple(tuple(a) for a in config.mesh.axes), jax.device_count())
  if config.data.batch_size % shape[DATA_AXIS]:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} does not split over the "
                     f"{shape[DATA_AXIS]} devices of the mesh's {DATA_AXIS!r} axis")
  devices = np.asarray(jax.devices()).reshape(tuple(shape.values()))
  return Mesh(devices, tuple(shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_split(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data axis, the rest whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def initialize_distributed(detect: bool, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process JAX program: explicit coordinator flags, or, with `detect`, what
  jax.distributed finds in the environment (TPU VM, SLURM, Open MPI). Must run before any
  other JAX call; does nothing for a single process."""
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif detect:
    jax.distributed.initialize()


def is_primary() -> bool:
  """Whether this process writes the outputs (logs, metrics, heatmaps, config)."""
  return jax.process_index() == 0


def process_rows(batch_size: int) -> tuple[int, int]:
  """(first row, number of rows) of each global batch that this process synthesises."""
  count = jax.process_count()
  if batch_size % count:
    raise ValueError(f"config.data.batch_size={batch_size} does not split over the {count} "
                     f"processes")
  local = batch_size // count
  return jax.process_index() * local, local


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows of a batch as one global array per key, split over the data axis."""
  split = batch_split(mesh)
  return {k: jax.make_array_from_process_local_data(split, np.asarray(v))
          for k, v in local_batch.items()}
