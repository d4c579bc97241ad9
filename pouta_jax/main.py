"""Command line: train and/or evaluate one model on one category.

    python -m pouta_jax.main --config=configs/draem.py:weave,tiny --workdir=outputs/weave \
        [--mode=train|eval|train_and_eval] [--artifact=PATH] [--config.optim.lr=2e-4 ...]
        [--allow_config_change=optim.lr] [--sweep=optim.lr=1e-4,3e-4] [--zip=...] [--seeds=3]

With several categories (configs/draem.py:bottle,cable or :all), --sweep, --zip or --seeds, one
program trains every run (category x sweep point) at once, each its own model on a run axis;
each run's outputs go to <workdir>/<sweep point>/<category>, as separate runs' would.

A workdir belongs to one run at a time (a lock) and to one config: resuming with another value
of a key that affects training or evaluation is refused unless --allow_config_change names it.

A SIGTERM (preemption) saves a checkpoint and exits with 143; the same command resumes.
Several processes form one program with --distributed (TPU VM, SLURM) or with
--coordinator_address=host:port --num_processes=N --process_id=i.

Flags are read by the entry points only: this module, demo.py, the command lines of sweep.py and
export.py, and launch/.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from pouta_jax import config as config_lib, errors, experiment, preemption, sharding

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file and argument, e.g. configs/draem.py:bottle,tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", experiment.MODES, "What to run.")
_ARTIFACT = flags.DEFINE_string(
  "artifact",
  None,
  "With --mode=eval: evaluate this exported "
  "artifact (python -m pouta_jax.export) instead of a checkpoint.",
)
_ALLOW_CHANGE = flags.DEFINE_list(
  "allow_config_change",
  [],
  "Config keys (e.g. optim.lr) that may differ from the values stored in an existing --workdir; "
  "the change is recorded in its config_changes.jsonl. Other keys must match.",
)
_SWEEP = flags.DEFINE_multi_string(
  "sweep", [], "key=v1,v2,...: one product axis of runs stacked in this program (config.stack)."
)
_ZIP = flags.DEFINE_multi_string("zip", [], "key=v1,v2,...: all --zip flags form one axis.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Stacked runs with train.seed 0..N-1.", lower_bound=1)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a multi-process program that jax.distributed detects (TPU VM slice, SLURM, Open MPI).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for a multi-process program set up by hand."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  sharding.initialize_distributed(
    _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  )
  config = _CONFIG.value
  if _SWEEP.value or _ZIP.value or _SEEDS.value > 1:
    config.stack.sweep, config.stack.zip = tuple(_SWEEP.value), tuple(_ZIP.value)
    config.stack.seeds = _SEEDS.value
  try:
    results = experiment.run(
      config,
      _WORKDIR.value,
      _MODE.value,
      artifact_path=_ARTIFACT.value,
      allow_changes=_ALLOW_CHANGE.value,
    )
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_code)
  if results and sharding.is_primary():
    print(f"Outputs in {_WORKDIR.value}: metrics.json and results.md, heatmaps/ (per run)")


if __name__ == "__main__":
  errors.run(main, flags_parser=config_lib.parse_flags)
