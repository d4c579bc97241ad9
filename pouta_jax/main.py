"""Command line: train and/or evaluate one model on one category.

    python -m pouta_jax.main --config=configs/draem.py:weave,tiny --workdir=outputs/weave \
        [--mode=train|eval|train_and_eval] [--config.optim.lr=2e-4 ...]

Flags are read by the entry points only: this module, demo.py, sweep.py's command line and
launch/.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from pouta_jax import config as config_lib, experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and argument, e.g. configs/draem.py:bottle,tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", experiment.MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  results = experiment.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  if results:
    print(f"Outputs in {_WORKDIR.value}: metrics.json, results.md, heatmaps/")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags_or_exit)
