"""Device mesh and shardings for data-parallel training (jax.sharding, no pmap).

The mesh comes from `config.mesh.axes`: (name, size) pairs where one size may be -1 for "all
remaining devices". The batch is split over the `data` axis, parameters and optimizer state are
replicated, and the jit-compiled step computes BatchNorm statistics and gradients over the global
batch: XLA inserts the collectives.
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
