"""orbax checkpoints in `<workdir>/checkpoints`: the train state and the data iterator together.

Each step holds two items: `state` (the TrainState pytree) and `data` (the grain iterator's
state, one JSON file per process, written by grain's orbax handler). Restoring both resumes
training on exactly the batch that followed the checkpoint. orbax writes each step into a
temporary folder and renames it when complete, so an interrupted save never leaves a
checkpoint that looks valid.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import grain
import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from pouta_jax import errors


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
  if _orbax_record_wanted not in logging.getLogger("absl").filters:
    logging.getLogger("absl").addFilter(_orbax_record_wanted)
  if not getattr(sys.unraisablehook, "drops_late_callbacks", False):
    sys.unraisablehook = _drop_late_callbacks(sys.unraisablehook)
  return ocp.CheckpointManager(
    Path(workdir).absolute() / "checkpoints",
    options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
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


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iterator: grain.DatasetIterator | None = None,
) -> None:
  """Saves `state` (and the iterator that produced its batches) as step `step`; blocks.

  A full disk raises DiskFullError naming the newest good checkpoint: before writing when the
  free space cannot hold the state, or after removing the partial checkpoint (orbax leaves its
  temporary folder behind) when the disk fills during the write."""
  directory = Path(mngr.directory)

  def disk_full(what: str) -> errors.DiskFullError:
    good = _good_steps(directory)
    newest = f"step {good[-1]}" if good else "none (no step was saved)"
    return errors.DiskFullError(
      f"disk full: checkpoint step {step} in {directory} {what}; the newest good checkpoint is "
      f"{newest}; free space and run the same command again to resume"
    )

  needed = sum(x.nbytes for x in jax.tree.leaves(state)) * SPACE_MARGIN
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise disk_full(f"needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")
  items = {"state": ocp.args.StandardSave(_fields(state))}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  try:
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
  except Exception as e:
    if not errors.is_disk_full(e):
      raise
    for partial in directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(partial, ignore_errors=True)
    raise disk_full("was not written (the partial one is removed)") from None


def restore_latest(mngr: ocp.CheckpointManager, template: Any) -> Any | None:
  """The newest checkpoint's state in the structure (and shardings) of `template`, or None."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = _fields(jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
    "state"
  ]
  return template.replace(**restored)


def restore_data_iterator(
  mngr: ocp.CheckpointManager, step: int, iterator: grain.DatasetIterator
) -> bool:
  """Sets `iterator` to its state at checkpoint `step`; False if the step holds no data state
  (a checkpoint converted from another framework, say)."""
  if not (Path(mngr.directory) / str(step) / "data").is_dir():
    return False
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
  return True
