"""One experiment on one category: check inputs, train, evaluate, write the outputs.

Both entry points (main.py and demo.py) call `run`; everything that can be checked before
training is checked first, so bad input costs no training time and overwrites nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
from absl import logging

from pouta_jax import (checkpoint, config as config_lib, evaluate, metrics, models, report,
                       sharding, train)
from pouta_jax.data import category_folder
from pouta_jax.data.folder import load_test_set

MODES = ("train", "eval", "train_and_eval")
# What must match between a workdir's stored config and a run that resumes in it: the whole
# model section, and the data that defines the task.
IDENTITY_KEYS = (("model", None), ("data", "image_size"), ("data", "category"),
                 ("data", "few_shot"))


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
  serialised = config.to_json_best_effort(indent=2) + "\n"
  if stored_path.exists():
    stored = json.loads(stored_path.read_text())
    current = json.loads(serialised)
    for section, key in IDENTITY_KEYS:
      old, new = stored.get(section, {}), current[section]
      if key is not None:
        old, new = old.get(key), new[key]
      if old != new:
        name = f"config.{section}" + (f".{key}" if key else "")
        raise ValueError(f"workdir {workdir} holds a run with {name}={old!r}, not {new!r}; use "
                         f"another --workdir")
  report.write_atomic(stored_path, serialised)
  return workdir


def run(config: ml_collections.ConfigDict, workdir: str | Path, mode: str = "train_and_eval",
        include_untrained: bool = False) -> dict:
  """Runs `mode` for `config.data.category`; returns {"metrics": model -> category -> metric,
  "profiles": model -> parameters, FLOPs and latency} ({} in train mode).

  With `include_untrained`, the freshly initialised model is evaluated too (as
  `<model>_untrained`): a near-chance score there shows the benchmark is not trivial.
  """
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}: expected one of {MODES}")
  config_lib.validate(config)
  models.get(config.model.name).validate(config)  # before any data is read
  sharding.make_mesh(config)  # the mesh must fit the devices and the batch
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
  profiles = {config.model.name: evaluate.profile(
      model, state.variables, config.data.image_size, config.eval.score_filter_size)}
  write_results(workdir, results, profiles)
  return {"metrics": results, "profiles": profiles}


def write_results(workdir: str | Path, results: dict, profiles: dict, caption: str = "") -> None:
  """metrics.json and results.md.

  metrics.json: model -> category (and "mean") -> metric, plus, for models with a profile,
  `params` (reconstructive, discriminative, total), `flops_per_image` and `latency_ms`.
  """
  with_means = {
      model: {**per_category, "mean": metrics.mean_over_categories(per_category)}
      for model, per_category in results.items()
  }
  document = {model: {**per_category, **profiles.get(model, {})}
              for model, per_category in with_means.items()}
  report.write_json(Path(workdir) / "metrics.json", document)
  report.write_atomic(Path(workdir) / "results.md",
                      report.results_table(with_means, profiles, caption))
