"""orbax checkpoints in `<workdir>/checkpoints`: the train state and the data iterator together.

Each step holds two items: `state` (the TrainState pytree) and `data` (the grain iterator's
state, one JSON file per process, written by grain's orbax handler). Restoring both resumes
training on exactly the batch that followed the checkpoint. orbax writes each step into a
temporary folder and renames it when complete, so an interrupted save never leaves a
checkpoint that looks valid.

Saves are asynchronous: `save` returns once the state is copied off the devices and the
iterator's state is written (both happen before the next step can change them), and the
arrays are written while training goes on. A write that fails is raised by the next `save` or
`wait`; the last save of a run and a preemption's save wait for their write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple

import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils.epath import Path

from pouta_jax import errors, files


def _orbax_record_wanted(record: logging.LogRecord) -> bool:
  """orbax logs every save at INFO, and a failed write once per writer thread with a traceback
  (hundreds of lines when the disk fills): keep its warnings and other errors; `save` reports a
  full disk once, as a DiskFullError."""
  if "orbax" not in record.pathname:
    return True
  failure = record.exc_info[1] if record.exc_info else None
  return record.levelno >= logging.WARNING and not (failure and errors.is_disk_full(failure))


def _drop_late_callbacks(previous: Callable[[Any], None]) -> Callable[[Any], None]:
  """An unraisable-exception hook around `previous` that drops "Event loop is closed": after a
  write fails, orbax closes its event loop while tensorstore's other writes are in flight, and
  their completions arrive later, into the closed loop, from a tensorstore thread."""

  def hook(unraisable: Any) -> None:
    late = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
      unraisable.exc_value
    )
    if not late:
      previous(unraisable)

  hook.drops_late_callbacks = True
  return hook


def manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  """The workdir's checkpoints, keeping the newest `keep`; saves through it are asynchronous."""
  if _orbax_record_wanted not in logging.getLogger("absl").filters:
    logging.getLogger("absl").addFilter(_orbax_record_wanted)
  if not getattr(sys.unraisablehook, "drops_late_callbacks", False):
    sys.unraisablehook = _drop_late_callbacks(sys.unraisablehook)
  return ocp.CheckpointManager(
    files.absolute(workdir) / "checkpoints",
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True
    ),
  )


def _fields(state: Any) -> dict:
  """A train state (a dataclass) as saved: its fields by name, without empty dicts, so a model
  without constants saves exactly what checkpoints held before that field existed."""
  return {
    f.name: getattr(state, f.name)
    for f in dataclasses.fields(state)
    if not (isinstance(getattr(state, f.name), dict) and not getattr(state, f.name))
  }


# Free space wanted before a save, as a multiple of the state's size (metadata, the iterator).
SPACE_MARGIN = 1.1


def _good_steps(directory: Path) -> list[int]:
  """The steps of complete checkpoints: orbax renames a step's folder into place when done."""
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def has_checkpoint(workdir: str | Path) -> bool:
  """Whether `workdir` holds a complete checkpoint: what binds a workdir to its config."""
  directory = files.path(workdir) / "checkpoints"
  return directory.is_dir() and bool(_good_steps(directory))


def _disk_full(directory: Path, step: int | str, what: str) -> errors.DiskFullError:
  good = _good_steps(directory)
  newest = f"step {good[-1]}" if good else "none (no step was saved)"
  return errors.DiskFullError(
    f"disk full: checkpoint step {step} in {directory} {what}; the newest good checkpoint is "
    f"{newest}; free space and run the same command again to resume"
  )


# A failed write's partial folder is removed until none has reappeared for QUIET_S seconds (at
# most GIVE_UP_S): tensorstore's writes still in flight when orbax gave up recreate its folders
# as they land (a clean-clone CI run found one left behind once; not reproduced alone).
QUIET_S, GIVE_UP_S = 1.0, 30.0


def _remove_partials(directory: Path) -> list[str]:
  """Removes orbax's temporary folders (of a failed write) in `directory`; their names."""
  removed: set[str] = set()
  start = quiet_since = time.monotonic()
  while time.monotonic() - quiet_since < QUIET_S and time.monotonic() - start < GIVE_UP_S:
    partials = list(directory.glob("*.orbax-checkpoint-tmp*"))
    for partial in partials:
      shutil.rmtree(partial, ignore_errors=True)
    removed.update(p.name for p in partials)
    if partials:
      quiet_since = time.monotonic()
    time.sleep(0.05)
  return sorted(removed)


@contextlib.contextmanager
def _full_disk_reported(mngr: ocp.CheckpointManager, step: int | None = None) -> Iterator[None]:
  """Turns a write (of `step`, or of the step being written in the background) that filled the
  disk into one DiskFullError naming it, after removing the partial checkpoint (orbax leaves
  its temporary folder behind)."""
  directory = Path(mngr.directory)
  try:
    yield
  except Exception as e:
    if not errors.is_disk_full(e):
      raise
    try:  # orbax's own background work on the failed step ends first
      mngr.wait_until_finished()
    except Exception:  # the same failure, reported below
      pass
    partials = _remove_partials(directory)
    written = step if step is not None else ", ".join(p.split(".")[0] for p in partials)
    raise _disk_full(
      directory, written or "in progress", "was not written (the partial one is removed)"
    ) from None


def wait(mngr: ocp.CheckpointManager) -> None:
  """Returns when every save is on disk; raises what a write in the background raised."""
  with _full_disk_reported(mngr):
    mngr.wait_until_finished()


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: grain.DatasetIterator | None = None,
  block: bool = True,
) -> None:
  """Saves `state` (and the iterator that produced its batches) as step `step`. With `block`,
  returns once it is on disk; otherwise once the state is copied and the write has started.

  The previous save's write is finished first (one write at a time bounds host memory). A full
  disk raises DiskFullError naming the newest good checkpoint: before writing when the free
  space cannot hold the state, or when a write fills the disk."""
  directory = Path(mngr.directory)
  wait(mngr)
  needed = sum(x.nbytes for x in jax.tree.leaves(state)) * SPACE_MARGIN
  free = float("inf") if files.is_remote(directory) else shutil.disk_usage(directory).free
  if free < needed:
    raise _disk_full(
      directory, step, f"needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free"
    )
  items = {"state": ocp.args.StandardSave(_fields(state))}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  with _full_disk_reported(mngr, step):
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
  if block:
    wait(mngr)


def _leaf_name(path: tuple) -> str:
  """A leaf's path with dict keys, attributes (a namedtuple's fields) and indices alike: the
  saved metadata holds namedtuples as dicts."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _saved_shapes(mngr: ocp.CheckpointManager, step: int) -> dict[str, tuple[int, ...]]:
  """The shape of every array of checkpoint `step`'s state, by `_leaf_name`."""
  # Read through the handler: a fresh manager's item_metadata knows no handler for the item.
  metadata = ocp.StandardCheckpointHandler().metadata(Path(mngr.directory) / str(step) / "state")
  tree = getattr(metadata, "tree", metadata)
  return {
    _leaf_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


class Restored(NamedTuple):
  state: Any
  saved_rows: int  # the checkpoint's run axis: runs and padding (1: a single run's, any version)


def restore_latest(mngr: ocp.CheckpointManager, template: Any, num_runs: int = 1) -> Any | None:
  """The newest checkpoint's state (`restore_latest_with_rows`), or None."""
  restored = restore_latest_with_rows(mngr, template, num_runs)
  return None if restored is None else restored.state


def restore_latest_with_rows(
  mngr: ocp.CheckpointManager, template: Any, num_runs: int = 1
) -> Restored | None:
  """The newest checkpoint's state in the structure (and shardings) of `template`, a state
  stacked over `num_runs` runs (and padding), and the rows it was saved with; None without one.

  The checkpoint's run axis may hold other padding than the template's (sharding.run_rows:
  another mesh): its first `num_runs` rows are the runs, and the template's padding rows
  become copies of the last run, as fresh padding is. A single run's checkpoint written before
  every state had a run axis is restored as a stack of one. The saved shapes are read once
  (orbax reads every array's metadata: a second each for a tiny DRAEM)."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = _fields(jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  wanted = {
    _leaf_name(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)
  }
  saved = _saved_shapes(mngr, step)
  unstacked = saved.get("step") == ()
  rows = (saved.get("step") or (1,))[0] if "step" in saved else 0  # the saved run axis
  expected = {k: (*(() if unstacked else (rows,)), *shape[1:]) for k, shape in wanted.items()}
  problems = errors.key_problems(expected, saved)
  if problems or rows < num_runs:
    raise errors.ConfigError(
      f"{mngr.directory}/{step}: the checkpoint does not hold {num_runs} runs of the config's "
      f"model ({rows} saved)" + (f" {errors.listing(problems, 3)}" if problems else "")
    )
  if unstacked:
    abstract = jax.tree.map(_without_run_axis, abstract)
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract, strict=saved == wanted)),
  )["state"]
  if unstacked:  # the run axis added on the host, then placed as the template's
    shardings = jax.tree.map(lambda x: x.sharding, _fields(template))
    restored = jax.device_put(jax.tree.map(lambda x: np.asarray(x)[None], restored), shardings)
  state = template.replace(**restored)
  if saved != wanted and not unstacked:
    state = _padded_with_last_run(state, num_runs)
  return Restored(state, rows)


def _without_run_axis(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """`leaf` of one run, replicated on the template's devices."""
  sharding = leaf.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _padded_with_last_run(state: Any, num_runs: int) -> Any:
  return jax.tree.map(lambda x: x.at[num_runs:].set(x[num_runs - 1]), state)


def restore_data_iterator(
  mngr: ocp.CheckpointManager, step: int, iterator: grain.DatasetIterator
) -> bool:
  """Sets `iterator` to its state at checkpoint `step`; False if the step holds no data state
  (a checkpoint converted from another framework, say)."""
  if not (Path(mngr.directory) / str(step) / "data").is_dir():
    return False
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
  return True
