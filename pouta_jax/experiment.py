"""One experiment on one category: check inputs, train, evaluate, write the outputs.

Both entry points (main.py and demo.py) call `run`; everything that can be checked before
training is checked first, so bad input costs no training time and overwrites nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
from absl import logging

from pouta_jax import checkpoint, config as config_lib, evaluate, metrics, models, report, train
from pouta_jax.data import category_folder
from pouta_jax.data.folder import load_test_set

MODES = ("train", "eval", "train_and_eval")
# Keys that must match between a workdir's stored config and a run that resumes in it.
IDENTITY_KEYS = (("model", "name"), ("model", "base_width"), ("data", "image_size"),
                 ("data", "category"))


def prepare_workdir(workdir: str | Path, config: ml_collections.ConfigDict) -> Path:
  """Creates `workdir`, checks it is writable and belongs to this model, stores the config."""
  workdir = Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_probe"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"workdir {workdir} is not writable ({e.strerror})") from e
  stored_path = workdir / "config.json"
  if stored_path.exists():
    stored = json.loads(stored_path.read_text())
    for section, key in IDENTITY_KEYS:
      if stored.get(section, {}).get(key) != config[section][key]:
        raise ValueError(
            f"workdir {workdir} holds a run with config.{section}.{key}="
            f"{stored.get(section, {}).get(key)!r}, not {config[section][key]!r}; use another "
            f"--workdir")
  report.write_atomic(stored_path, config.to_json_best_effort(indent=2) + "\n")
  return workdir


def run(config: ml_collections.ConfigDict, workdir: str | Path, mode: str = "train_and_eval",
        include_untrained: bool = False) -> dict:
  """Runs `mode` for `config.data.category`; returns metrics.json's content for this run.

  With `include_untrained`, the freshly initialised model is evaluated too (as
  `<model>_untrained`): a near-chance score there shows the benchmark is not trivial.
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
  config_lib.validate(config)
  models.get(config.model.name)  # an unknown model name fails before any data is read
  folder = category_folder(config)
  test_set = load_test_set(folder, config.data.image_size)
  workdir = prepare_workdir(workdir, config)
  model, _, initial, _ = train.initial_state(config, len(folder.train))

  if mode == "eval":
    mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
    state = checkpoint.restore_latest(mngr, initial)
    mngr.close()
    if state is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints to evaluate; train first")
  else:
    state = train.train(config, workdir, folder)
    if mode == "train":
      return {}

  variants = {config.model.name: state}
  if include_untrained:
    variants[f"{config.model.name}_untrained"] = initial
  results = {}
  category = config.data.category
  for name, variant in variants.items():
    category_metrics, maps, _ = evaluate.evaluate(
        model, variant.variables, test_set, config.eval.batch_size,
        config.eval.score_filter_size)
    results[name] = {category: category_metrics}
    logging.info("%s %s: %s", name, category, category_metrics)
    if name == config.model.name:
      _, threshold = metrics.f1_max(test_set["mask"].ravel(), maps.ravel())
      report.write_heatmaps(workdir / "heatmaps", test_set, maps, threshold,
                            config.eval.num_heatmaps)
  write_results(workdir, results)
  return results


def write_results(workdir: str | Path, results: dict, caption: str = "") -> None:
  """metrics.json (with each model's mean over categories) and results.md."""
  with_means = {
      model: {**per_category, "mean": metrics.mean_over_categories(per_category)}
      for model, per_category in results.items()
  }
  report.write_json(Path(workdir) / "metrics.json", with_means)
  report.write_atomic(Path(workdir) / "results.md", report.results_table(with_means, caption))
