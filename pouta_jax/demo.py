"""`make demo`: DRAEM and POUTA on every embedded category at the tiny size, side by side, each
next to its untrained copy; `make demo-all` adds PRN.

    python -m pouta_jax.demo [--workdir=outputs/demo] [--models=draem,pouta,prn]
        [--categories=weave,pill] [--preset=tiny] [--num_steps=300]
        [--backbone_weights=resnet18.npz]
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from absl import flags

from pouta_jax import config as config_lib, errors, experiment
from pouta_jax.data import embedded

_WORKDIR = flags.DEFINE_string("workdir", "outputs/demo", "Where the outputs go.")
_MODELS = flags.DEFINE_list("models", ["draem", "pouta"], "Models (configs/<model>.py).")
_CATEGORIES = flags.DEFINE_list(
  "categories", list(embedded.CATEGORIES), "Embedded categories to run."
)
_PRESET = flags.DEFINE_string("preset", "tiny", "Size preset of every run.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 0, "Train steps per run; 0: the preset's.")
_BACKBONE_WEIGHTS = flags.DEFINE_string(
  "backbone_weights",
  "",
  "Pretrained backbone weights (.npz from pouta_jax.convert) for "
  "models with a frozen backbone (PRN); empty: a random backbone.",
)


def _notes(configs: dict) -> list[str]:
  """What the caption must say about models whose setting differs from the others'."""
  notes = []
  for model, config in configs.items():
    if "backbone" in config and not config.backbone.pretrained:
      notes.append(
        f"{model}: random (untrained) {config.backbone.name} backbone, since no "
        f"pretrained weights were given (--backbone_weights)"
      )
    if config.data.num_real_anomalies:
      notes.append(
        f"{model}: trained on {config.data.num_real_anomalies} real defect images "
        f"per category, which are left out of its test set "
        f"(<model>/<category>/real_anomalies.json)"
      )
  return notes


def main(argv: list[str]) -> None:
  del argv
  start = time.perf_counter()
  workdir = Path(_WORKDIR.value)
  results, profiles, configs = {}, {}, {}
  for model in _MODELS.value:
    for category in _CATEGORIES.value:
      config = config_lib.load(model, f"{category},{_PRESET.value}")
      if _NUM_STEPS.value:
        config.train.num_steps = _NUM_STEPS.value
      if "backbone" in config:
        config.backbone.weights = _BACKBONE_WEIGHTS.value
        config.backbone.pretrained = bool(_BACKBONE_WEIGHTS.value)
      configs[model] = config
      run = experiment.run(config, workdir / model / category, include_untrained=True)
      for name, per_category in run["metrics"].items():
        results.setdefault(name, {}).update(per_category)
      profiles.update(run["profiles"])
  minutes = (time.perf_counter() - start) / 60
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  caption = (
    f"Embedded dataset, preset {_PRESET.value}: {config.data.image_size} px, base width "
    f"{config.model.base_width}, {config.train.num_steps} steps of batch "
    f"{config.data.batch_size} per model and category (a short CPU schedule, not the papers' "
    f"700 epochs). FLOPs from XLA's cost analysis, latency at batch 1 on this machine's CPU. "
    f"Wall time {minutes:.1f} min, peak memory {peak_gib:.2f} GiB (main process). Heatmap "
    f"threshold: pixel F1-max on the test set (display only)."
    + "".join(f" {note}." for note in _notes(configs))
  )
  experiment.write_results(workdir, results, profiles, caption)
  print((workdir / "results.md").read_text())
  print(
    f"Outputs: {workdir.absolute()}/metrics.json, results.md, <model>/<category>/heatmaps/*.png"
  )


if __name__ == "__main__":
  errors.run(main)
