"""`make demo`: DRAEM on every embedded category at the tiny size, with an untrained baseline.

    python -m pouta_jax.demo [--workdir=outputs/demo] [--categories=weave,pill]
        [--config=configs/draem.py:tiny] [--config.train.num_steps=600]
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from pouta_jax import config as config_lib, experiment
from pouta_jax.data import embedded

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/draem.py:tiny", "Config file and argument; the category is set per run.")
_WORKDIR = flags.DEFINE_string("workdir", "outputs/demo", "Where the outputs go.")
_CATEGORIES = flags.DEFINE_list("categories", list(embedded.CATEGORIES),
                                "Embedded categories to run.")


def main(argv: list[str]) -> None:
  del argv
  start = time.perf_counter()
  workdir = Path(_WORKDIR.value)
  results: dict[str, dict] = {}
  for category in _CATEGORIES.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.data.category = category
    run = experiment.run(config, workdir / category, "train_and_eval", include_untrained=True)
    for model, per_category in run.items():
      results.setdefault(model, {}).update(per_category)
  minutes = (time.perf_counter() - start) / 60
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  config = _CONFIG.value
  caption = (f"Embedded dataset, {config.data.image_size} px, base width "
             f"{config.model.base_width}, {config.train.num_steps} steps of batch "
             f"{config.data.batch_size} per category (a short CPU schedule, not the paper's 700 "
             f"epochs). Wall time {minutes:.1f} min, peak memory {peak_gib:.2f} GiB (this "
             f"process). Heatmap threshold: pixel F1-max on the test set (display only).")
  experiment.write_results(workdir, results, caption)
  print((workdir / "results.md").read_text())
  print(f"Outputs: {workdir.absolute()}/metrics.json, results.md, <category>/heatmaps/*.png")
  logging.info("demo finished in %.1f min", minutes)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags_or_exit)
