"""orbax checkpoints of the train state in `<workdir>/checkpoints`, with resume.

orbax writes each step into a temporary folder and renames it when complete, so an interrupted
save never leaves a checkpoint that looks valid.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _not_orbax_info(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  # orbax logs every save step at INFO through absl; keep its warnings only.
  if _not_orbax_info not in logging.getLogger("absl").filters:
    logging.getLogger("absl").addFilter(_not_orbax_info)
  return ocp.CheckpointManager(
      Path(workdir).absolute() / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
  )


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, template: Any) -> Any | None:
  """The newest checkpoint restored into the structure of `template`, or None if there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
