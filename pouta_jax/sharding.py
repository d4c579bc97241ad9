"""Device mesh and shardings for data-parallel training (jax.sharding, no pmap), multi-host.

The mesh comes from `config.mesh.axes`: "auto" (the default: the layout with the least padding
of the stacked runs, then the largest category axis, the rest over the batch), or (name, size)
pairs where one size may be -1 for "all remaining devices"; `config.mesh.num_devices` takes a
subset of the devices. Stacked runs that do not fill the category axis are padded with copies
of the last run (`run_rows`). The batch is split over the `data` axis; parameters and optimizer
state, stacked over the program's runs (runs.py), are split over the category axis if the mesh
has one, replicated otherwise; the
jit-compiled step computes BatchNorm statistics and gradients over the global batch: XLA
inserts the collectives. With several processes (jax.distributed), each process synthesises
only its rows of every global batch and process 0 alone writes outputs.
"""

from __future__ import annotations

import itertools
import math

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pouta_jax import errors, runs as runs_lib

DATA_AXIS = "data"
CATEGORY_AXIS = "category"


def mesh_shape(axes: tuple[tuple[str, int], ...], num_devices: int) -> dict[str, int]:
  """Resolves the -1 of `axes` against `num_devices`; raises ValueError naming the mesh."""
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if DATA_AXIS not in names:
    raise errors.ConfigError(f"config.mesh.axes={axes!r}: needs a {DATA_AXIS!r} axis")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise errors.ConfigError(
      f"config.mesh.axes={axes!r}: sizes must be positive, with at most one -1"
    )
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise errors.ConfigError(
      f"config.mesh.axes={axes!r}: {known} does not divide the {num_devices} devices"
    )
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise errors.ConfigError(
      f"config.mesh.axes={axes!r}: uses {math.prod(sizes)} of the {num_devices} devices"
    )
  return dict(zip(names, sizes))


# What installs jax for each accelerator platform (pyproject.toml's extras).
INSTALL = {"tpu": "pip install -e '.[tpu]'", "gpu": "pip install -e '.[cuda12]'"}


def check_platform(required: str) -> None:
  """Refuses to run on another platform than `required` ("" accepts any): on a TPU VM or GPU
  node without the accelerator's jax plugin, jax silently falls back to the CPU."""
  platform = jax.default_backend()
  if required and platform != required:
    raise errors.ConfigError(
      f"config.mesh.require_platform={required!r}, but jax runs on {platform} "
      f"({jax.device_count()} {jax.devices()[0].device_kind} devices); "
      f"{INSTALL.get(required, 'install jax for ' + required)} on this machine"
    )


def describe(mesh: Mesh) -> str:
  """Platform, device kind and count, processes and mesh: logged at the start of every run."""
  device = mesh.devices.flat[0]
  shape = ", ".join(f"{name} {size}" for name, size in mesh.shape.items())
  return (
    f"{device.platform} ({device.device_kind}): {mesh.devices.size} devices of "
    f"{jax.device_count()}, {jax.local_device_count()} local; process {jax.process_index()} "
    f"of {jax.process_count()}; mesh {shape}"
  )


AUTO = ("auto",)  # config.mesh.axes: the layout chosen from the devices, runs and batch


def run_rows(num_runs: int, run_axis: int) -> int:
  """The rows of a program's run axis: its `num_runs` stacked runs padded to a multiple of the
  `run_axis` devices. The padding rows are copies of the last run (runs.padded): computed like
  the others, never written or counted."""
  return -(-num_runs // run_axis) * run_axis


def layouts(num_devices: int, num_runs: int, batch: int) -> list[dict[str, int]]:
  """Every mesh of exactly `num_devices`: a category (run) axis times a data axis that divides
  the batch (a single run's mesh has only the data axis: splitting it over runs would only
  compute copies), the fewest padding rows first (`run_rows`: the least work per device), then
  the largest run axis (it needs no collectives)."""
  found = []
  for runs in range(num_devices, 0, -1):
    data = num_devices // runs
    if runs * data != num_devices or batch % data or (runs > 1 and num_runs == 1):
      continue
    found.append({CATEGORY_AXIS: runs, DATA_AXIS: data} if num_runs > 1 else {DATA_AXIS: data})
  found.sort(key=lambda shape: run_rows(num_runs, shape.get(CATEGORY_AXIS, 1)) - num_runs)
  return found


def _mesh_devices(num_devices: int) -> list:
  """The first `num_devices` devices (0: all), the same number from every process."""
  devices = jax.devices()
  if not num_devices:
    return devices
  processes = jax.process_count()
  if num_devices > len(devices) or num_devices % processes:
    raise errors.ConfigError(
      f"config.mesh.num_devices={num_devices}: expected 0 (all) or a multiple of the "
      f"{processes} processes up to the {len(devices)} devices"
    )
  per_process = num_devices // processes
  return [
    d for p in range(processes) for d in [d for d in devices if d.process_index == p][:per_process]
  ]


def _describe_layout(shape: dict[str, int]) -> str:
  return " x ".join(f"{name} {size}" for name, size in shape.items())


def _auto_layout(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """The first of `layouts`; refused, listing device counts that would work, when none exists
  (a single run whose batch does not split over the devices: stacked runs always fit)."""
  num_runs = runs_lib.count(config)
  batch = config.data.batch_size
  found = layouts(num_devices, num_runs, batch)
  if found:
    return found[0]
  processes = jax.process_count()
  smaller = [
    (n, fitting[0])
    for n in range(num_devices - 1, 0, -1)
    if n % processes == 0 and (fitting := layouts(n, num_runs, batch))
  ]
  listed = ", ".join(f"mesh.num_devices={n} ({_describe_layout(s)})" for n, s in smaller[:4])
  raise errors.ConfigError(
    f"config.mesh.axes=auto: no mesh of all {num_devices} devices holds a batch of "
    f"{batch} (config.data.batch_size); layouts that would: {listed}"
  )


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The config's mesh over its devices (`mesh.num_devices`); checks the platform
  (`mesh.require_platform`), that the batch splits over the data axis and that a category axis
  has stacked runs to hold. `mesh.axes` "auto" chooses the layout (`layouts`)."""
  check_platform(config.mesh.require_platform)
  devices = _mesh_devices(config.mesh.num_devices)
  axes = tuple(config.mesh.axes)
  if axes == AUTO:
    shape = _auto_layout(config, len(devices))
  elif not all(isinstance(a, (tuple, list)) and len(a) == 2 for a in axes):
    raise errors.ConfigError(
      f"config.mesh.axes={axes!r}: expected auto or (name, size) pairs, e.g. "
      f"\"(('category', 5), ('data', -1))\""
    )
  else:
    shape = mesh_shape(tuple(tuple(a) for a in axes), len(devices))
  if config.data.batch_size % shape[DATA_AXIS]:
    raise errors.ConfigError(
      f"config.data.batch_size={config.data.batch_size} does not split over the "
      f"{shape[DATA_AXIS]} devices of the mesh's {DATA_AXIS!r} axis"
    )
  if shape.get(CATEGORY_AXIS, 1) > 1 and runs_lib.count(config) == 1:
    raise errors.ConfigError(
      f"config.mesh.axes={axes!r}: a {CATEGORY_AXIS!r} axis of {shape[CATEGORY_AXIS]} devices "
      f"needs stacked runs (data.categories, config.stack); this program trains one"
    )
  return Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape))


def mesh_rows(mesh: Mesh, config: ml_collections.ConfigDict) -> int:
  """The rows of the config's run axis on `mesh` (`run_rows`)."""
  return run_rows(runs_lib.count(config), dict(mesh.shape).get(CATEGORY_AXIS, 1))


def _run_axis(mesh: Mesh) -> str | None:
  return CATEGORY_AXIS if CATEGORY_AXIS in mesh.axis_names else None


def state_sharding(mesh: Mesh) -> NamedSharding:
  """Parameters and optimizer state (stacked over runs): their run axis split over the mesh's
  category axis if it has one, replicated otherwise."""
  return NamedSharding(mesh, PartitionSpec(_run_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """A global batch (runs, batch, ...): runs as the state, the batch over the data axis."""
  return NamedSharding(mesh, PartitionSpec(_run_axis(mesh), DATA_AXIS))


def process_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The block of a global array of `shape` that this process's devices hold (one slice per
  dimension). Data-parallel meshes give each process a contiguous block."""
  indices = list(sharding.addressable_devices_indices_map(shape).values())
  block = []
  for dim, size in enumerate(shape):
    starts = [idx[dim].start or 0 for idx in indices]
    stops = [size if idx[dim].stop is None else idx[dim].stop for idx in indices]
    block.append(slice(min(starts), max(stops)))
  return tuple(block)


def global_batch(
  sharding: NamedSharding, local_batch: dict[str, np.ndarray], leading_shape: tuple[int, ...]
) -> dict[str, jax.Array]:
  """Global arrays of leading dims `leading_shape` ((batch,) or (runs, batch)) from this
  process's block of them, which grain delivered flattened into one leading dim."""
  local_leading = tuple(b.stop - b.start for b in process_block(sharding, leading_shape))
  arrays = {}
  for key, value in local_batch.items():
    # A copy: grain's workers deliver arrays in shared memory, and a CPU device array made from
    # one aliases it, so the last batch's segments outlived the pipeline's close and leaked at
    # exit (4 per run, without the copy; pipeline.close frees the rest).
    value = np.array(value)
    arrays[key] = jax.make_array_from_process_local_data(
      sharding, value.reshape(local_leading + value.shape[1:]), leading_shape + value.shape[1:]
    )
  return arrays


def to_host(tree):
  """Host (numpy) copies of a pytree of global arrays, gathered from every process if they are
  split over processes."""
  if all(x.is_fully_addressable or x.is_fully_replicated for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def initialize_distributed(
  detect: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins a multi-process JAX program: explicit coordinator flags, or, with `detect`, what
  jax.distributed finds in the environment (TPU VM, SLURM, Open MPI). Must run before any
  other JAX call; does nothing for a single process."""
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise errors.ConfigError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif detect:
    jax.distributed.initialize()


# Seconds every process waits at `connect_collectives` for the others (their imports, data).
CONNECT_TIMEOUT_S = 600
_connections = itertools.count()  # each barrier of a program has its own name


def connect_collectives(mesh: Mesh) -> None:
  """Connects jax's CPU collectives (Gloo) between processes, for every group of devices the
  mesh's programs reduce over (each axis, and all of them), with every process at the same
  point: Gloo gives a group's first connection 30 s, so a process that compiled its first step
  more slowly than another would otherwise fail it ("Gloo context initialization failed").
  Later collectives wait for a slower process. Nothing to do on one process, or off the CPU."""
  if jax.process_count() == 1 or jax.default_backend() != "cpu":
    return
  from jax._src import distributed  # the coordination service's barrier: no collective

  distributed.global_state.client.wait_at_barrier(
    f"pouta_jax.connect_collectives {next(_connections)}: {_describe_layout(dict(mesh.shape))}",
    CONNECT_TIMEOUT_S * 1000,
  )
  meshes = [mesh]
  if mesh.devices.size < jax.device_count():  # to_host gathers over every device
    meshes.append(Mesh(np.asarray(jax.devices()), ("all",)))
  for each in meshes:
    spec = PartitionSpec(*each.axis_names)
    block = np.ones((1,) * each.devices.ndim)
    ones = jax.make_array_from_callback(
      each.devices.shape, NamedSharding(each, spec), lambda _, block=block: block
    )
    for axes in (each.axis_names, *((name,) for name in each.axis_names)):
      connect = jax.shard_map(
        lambda x, axes=axes: jax.lax.psum(x, axes), mesh=each, in_specs=spec, out_specs=spec
      )
      jax.block_until_ready(jax.jit(connect)(ones))


def is_primary() -> bool:
  """Whether this process writes the outputs (logs, metrics, heatmaps, config)."""
  return jax.process_index() == 0
