"""One experiment on one category: check inputs, train, evaluate, write the outputs.

Both entry points (main.py and demo.py) call `run`; everything that can be checked before
training is checked first, so bad input costs no training time and overwrites nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from typing import Iterator, Sequence

import jax
import ml_collections
from absl import logging
from etils.epath import Path
from jax.sharding import Mesh

from pouta_jax import (
  artifact,
  checkpoint,
  config as config_lib,
  errors,
  evaluate,
  files,
  metrics,
  models,
  report,
  runs,
  sharding,
  train,
)
from pouta_jax.data import category_folder, validation
from pouta_jax.data.folder import CategoryFolder, load_test_set, sample_name

MODES = ("train", "eval", "train_and_eval")
CHANGES_FILE = "config_changes.jsonl"


def _make_writable(workdir: Path) -> None:
  """Fails at start, naming the workdir, if it cannot be written (a read-only folder, or a
  bucket that does not exist or cannot be reached)."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_probe_{jax.process_index()}"
    probe.write_text("")
    probe.unlink()
  except Exception as e:
    if files.is_remote(workdir):  # an object store's client raises its own errors
      raise files.storage_error(workdir, e, "write the workdir") from e
    if isinstance(e, OSError):
      raise errors.WorkdirError(f"workdir {workdir} is not writable ({e.strerror})") from e
    raise


def store_config(
  workdir: Path, config: ml_collections.ConfigDict, allow_changes: Sequence[str] = ()
) -> None:
  """Stores the config in `workdir`, which may already hold a run: then every key outside
  `config.OUTPUT_ONLY_KEYS` must equal the stored value, or be named in `allow_changes`
  (the change is appended to config_changes.jsonl). Process 0 writes; every process checks."""
  serialised = config.to_json_best_effort(indent=2) + "\n"
  unknown = [k for k in allow_changes if not config_lib.has_key(json.loads(serialised), k)]
  if unknown:
    raise errors.ConfigError(f"--allow_config_change: {unknown} are not config keys")
  changed = config_changes(workdir, config)
  refused = [c for c in changed if c[0] not in allow_changes]
  if refused:
    raise errors.ConfigError(
      f"workdir {workdir} holds a run with another config ({listed_changes(refused)}). Use "
      f"another --workdir, or --allow_config_change={','.join(c[0] for c in refused)} to go on "
      f"with the new values"
    )
  if not sharding.is_primary():
    return
  if changed:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log = workdir / CHANGES_FILE
    lines = [
      json.dumps({"time": now, "key": k, "stored": old, "new": new}) for k, old, new in changed
    ]
    files.write_atomic(log, (log.read_text() if log.exists() else "") + "\n".join(lines) + "\n")
  files.write_atomic(workdir / "config.json", serialised)


def config_changes(workdir: Path, config: ml_collections.ConfigDict) -> list[tuple]:
  """(key, stored, new) where `config` differs from the run `workdir` holds, outside
  `config.OUTPUT_ONLY_KEYS`; [] for a workdir without a run. A workdir holds a run once its
  first checkpoint exists: a start that failed before it (a diverged first steps, a bad
  flag) binds nothing, and its corrected rerun replaces the config."""
  path = workdir / "config.json"
  if not path.exists() or not checkpoint.has_checkpoint(workdir):
    return []
  stored = files.read_json(path, errors.ConfigError, "; the workdir is damaged")
  current = json.loads(config.to_json_best_effort())
  return [
    c for c in config_lib.differences(stored, current) if c[0] not in config_lib.OUTPUT_ONLY_KEYS
  ]


def listed_changes(changes: list[tuple]) -> str:
  return "; ".join(f"config.{key}: stored {old!r}, now {new!r}" for key, old, new in changes)


@contextlib.contextmanager
def claimed_workdir(
  workdir: str | Path, config: ml_collections.ConfigDict, allow_changes: Sequence[str] = ()
) -> Iterator[Path]:
  """Creates `workdir` and holds it for the block: an exclusive lock (process 0; a second run
  on it fails at once, naming the holder) and the config stored (see `store_config`)."""
  workdir = files.path(workdir)
  _make_writable(workdir)
  with files.WorkdirLock(workdir) if sharding.is_primary() else contextlib.nullcontext():
    store_config(workdir, config, allow_changes)
    yield workdir


def run(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  mode: str = "train_and_eval",
  include_untrained: bool = False,
  artifact_path: str | Path | None = None,
  allow_changes: Sequence[str] = (),
) -> dict:
  """Runs `mode` for the config's category (or categories, in one program); returns
  {"metrics": model -> category -> metric, "profiles": model -> parameters, FLOPs and latency,
  "validation": the main model -> category -> metric on the validation set (data.val_fraction)}
  ({} in train mode).

  With `include_untrained`, the freshly initialised model is evaluated too (as
  `<model>_untrained`): a near-chance score there shows the benchmark is not trivial. With
  `artifact_path` (eval mode only), an exported artifact is evaluated instead of the workdir's
  checkpoint, on the config's data. `allow_changes`: config keys that may differ from those
  stored in `workdir` (see `store_config`).
  """
  if mode not in MODES:
    raise errors.ConfigError(f"--mode={mode!r}: expected one of {MODES}")
  config_lib.validate(config)
  spec = models.get(config.model.name)
  spec.validate(config)  # before any data is read
  # Evaluation keys that need something of the model: (key, its unset value, has it, what).
  for key, unset, able, what in (
    ("reconstruction_error", False, spec.reconstructs, "reconstruction to score"),
    ("error_weight", 0.0, spec.reconstructs, "reconstruction to score"),
    ("fuse_levels", False, spec.levels, "level maps"),
    ("level_maps", False, spec.levels, "level maps"),
  ):
    if config.eval[key] != unset and not able:
      raise errors.ConfigError(
        f"config.eval.{key}={config.eval[key]}: model {config.model.name!r} has no {what} "
        f"(expected {unset})"
      )
  # The mesh must fit the platform, the devices, the batch and the categories.
  mesh = sharding.make_mesh(config)
  logging.info("Devices: %s", sharding.describe(mesh))
  sharding.connect_collectives(mesh)
  exported = None
  if artifact_path is not None:
    if mode != "eval":
      raise errors.ConfigError(
        f"--artifact evaluates an exported model: use --mode=eval, not {mode!r}"
      )
    for key in ("reconstruction_error", "level_maps"):
      if config.eval[key]:
        raise errors.ConfigError(
          f"config.eval.{key}=True: an exported artifact gives anomaly maps only (expected "
          "False with --artifact)"
        )
    exported = artifact.load(artifact_path)
    model = exported.manifest.get("model")
    if model != config.model.name:
      raise errors.ConfigError(
        f"config.model.name={config.model.name!r}: the artifact {artifact_path} is a "
        f"{model!r} model (expected its config, configs/{model}.py)"
      )
    # Its programs score as its run did; a scoring key given beside it would be ignored.
    baked = exported.manifest.get("config")
    baked = baked if isinstance(baked, dict) else {}
    for key, theirs, ours in config_lib.differences(baked, config.to_dict()):
      if key in config_lib.SCORING_KEYS:
        raise errors.ConfigError(
          f"config.{key}={ours}: the artifact {artifact_path} scores with {theirs} (compiled "
          f"into its programs; expected {theirs} with --artifact, or export the run again)"
        )
    if config.data.image_size not in exported.image_sizes:
      raise errors.ConfigError(
        f"config.data.image_size={config.data.image_size}: the artifact "
        f"{artifact_path} has programs for {exported.image_sizes} only"
      )
  if mode == "eval" and exported is None and not checkpoint.has_checkpoint(workdir):
    raise errors.NotFoundError(f"no checkpoint in {workdir}/checkpoints to evaluate; train first")
  program = runs.runs_of(config)  # checks the stacked sweep's keys and values
  folders = [category_folder(run.config) for run in program]
  test_sets = [load_test_set(f, config.data.image_size) for f in folders]
  val_sets = validation.validation_sets(config, folders)
  if exported is None:
    config = models.resolve(config, [len(f.train) for f in folders])
  with claimed_workdir(workdir, config, allow_changes) as workdir:
    return _run_in(
      config, workdir, mode, mesh, folders, test_sets, val_sets, exported, include_untrained
    )


def _run_in(
  config: ml_collections.ConfigDict,
  workdir: Path,
  mode: str,
  mesh: Mesh,
  folders: list,
  test_sets: list,
  val_sets: list | None,
  exported: artifact.Artifact | None,
  include_untrained: bool,
) -> dict:
  """`run` in a claimed workdir, after every check. Each run of a stacked program writes its
  outputs in its own folder (runs.Run.name), as a separate run would. With `val_sets`
  (data.val_fraction), the main model is scored on them too: validation metrics and the
  deployment thresholds."""
  program = runs.runs_of(config)
  if sharding.is_primary():
    for run, folder in zip(program, folders):
      _write_run_start(workdir / run.name, run, folder, stacked=len(program) > 1)

  if exported is not None:
    predictors = {exported.manifest["model"]: [exported.predict] * len(program)}
    profiles = {}
  else:
    validate = _validator(config, val_sets) if val_sets else None
    predictors, profiles = _trained_predictors(
      config, workdir, mode, mesh, folders, include_untrained, validate
    )
    if mode == "train":
      return {}

  results, on_validation = {}, {}
  for i, (run, test_set) in enumerate(zip(program, test_sets)):
    key = run.name or run.category
    evaluations = {
      name: evaluate.evaluate(per_run[i], test_set, config.eval.batch_size)
      for name, per_run in predictors.items()
    }
    main_name = next(iter(predictors))
    validated = {}  # every row's, so a peer's gain or loss shows where no test label is
    if val_sets:
      for name, per_run in predictors.items():
        validated[name] = evaluate.evaluate(
          per_run[i], val_sets[i], config.eval.batch_size, balanced_threshold=True
        )
        on_validation.setdefault(name, {})[key] = validated[name].metrics
        logging.info("%s %s validation: %s", name, key, validated[name].metrics)
      tested = evaluations[main_name]
      evaluations[main_name] = tested._replace(
        metrics={
          **tested.metrics,
          **evaluate.at_thresholds(tested, validated[main_name].thresholds),
        }
      )
    for name, evaluation in evaluations.items():
      results.setdefault(name, {})[key] = evaluation.metrics
      logging.info("%s %s: %s", name, key, evaluation.metrics)
    if sharding.is_primary():
      step = train.num_train_steps(run.config, len(folders[i].train))
      _write_run_outputs(
        workdir / run.name, run, test_set, evaluations, profiles, config, step, validated
      )
  if sharding.is_primary() and len(program) > 1:
    # The program's overview: one column per run (each run's folder holds its own results).
    files.write_atomic(
      workdir / "results.md",
      report.results_table(
        {m: {**r, "mean": metrics.mean_over_categories(r)} for m, r in results.items()},
        profiles,
        f"{len(program)} runs in one program; each run's outputs are in its folder",
      ),
    )
  return {"metrics": results, "profiles": profiles, "validation": on_validation}


def _write_run_start(folder: Path, run: runs.Run, category: CategoryFolder, stacked: bool) -> None:
  """What a run records before training: its config (a stacked run's own, as a separate run
  stores it) and which test images it trains on (missing from its metrics)."""
  if stacked:
    folder.mkdir(parents=True, exist_ok=True)
    files.write_atomic(folder / "config.json", run.config.to_json_best_effort(indent=2) + "\n")
  if category.real_anomalies:
    files.write_json(
      folder / "real_anomalies.json",
      {run.category: [sample_name(s) for s in category.real_anomalies]},
    )


def _write_run_outputs(
  folder: Path,
  run: runs.Run,
  test_set: dict,
  evaluations: dict[str, evaluate.Evaluation],
  profiles: dict,
  config: ml_collections.ConfigDict,
  step: int,
  validated: dict[str, evaluate.Evaluation],
) -> None:
  """A run's evaluation outputs: metrics (each row's on the validation set too, from
  `validated`), results table, the main model's thresholds (from its validation evaluation, and
  the test set's as oracle values), scores per test image, heatmaps and curves; its test metrics
  and heatmaps in TensorBoard at `step`, the end of its training."""
  main_name = next(iter(evaluations))
  main, main_validated = evaluations[main_name], validated.get(main_name)
  rows = [["category", "path", "defect", "label", "image_score"]]
  rows += [
    [run.category, path, defect, int(label), f"{score:.9g}"]  # float32 exactly
    for path, defect, label, score in zip(
      test_set["path"], test_set["defect"], test_set["label"], main.scores
    )
  ]
  thresholds = {"oracle": main.thresholds}
  if main_validated is not None:
    thresholds["validation"] = main_validated.thresholds
  # The heatmaps' binary map: at the deployment threshold where there is one.
  pixel = (main_validated or main).thresholds["pixel"]
  panels = report.heatmap_panels(
    test_set,
    main.maps,
    float("nan") if pixel is None else pixel,
    config.eval.num_heatmaps,
    report.map_max(config.eval.error_weight),
  )
  report.write_heatmaps(folder / "heatmaps", panels)
  report.write_evaluation_to_tensorboard(folder, step, main.metrics, panels)
  report.write_curves(folder / "curves", main.curves, main.scores, test_set["label"])
  files.write_json(folder / "thresholds.json", {run.category: thresholds})
  files.write_atomic(folder / "test_scores.csv", report.csv_text(rows))
  write_results(
    folder,
    {name: {run.category: e.metrics} for name, e in evaluations.items()},
    profiles,
    by_defect={name: {run.category: e.by_defect} for name, e in evaluations.items()},
    on_validation={name: {run.category: e} for name, e in validated.items()},
  )


def _trained_predictors(
  config: ml_collections.ConfigDict,
  workdir: Path,
  mode: str,
  mesh: Mesh,
  folders: list,
  include_untrained: bool,
  validate: train.Validator | None = None,
) -> tuple[dict, dict]:
  """Trains (unless mode is eval) or restores; model -> each run's predict function, and the
  model's profile. `validate`: scored during training (train.train)."""
  model, _, initial, _, _ = train.setup(config, [len(f.train) for f in folders])
  if mode == "eval":
    mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
    state = checkpoint.restore_latest(mngr, initial, runs.count(config))
    mngr.close()
    if state is None:
      raise errors.NotFoundError(f"no checkpoint in {workdir}/checkpoints to evaluate; train first")
  else:
    state = train.train(config, workdir, folders, mesh, validate)
    if mode == "train":
      return {}, {}
  # Every process evaluates on its own devices, from host copies of the state.
  variants = {config.model.name: sharding.to_host(state.selected_variables)}
  if include_untrained:  # as training starts: after the prepare stage (PRN's prototypes)
    initial = train.prepared_state(config, model, initial, folders)
    variants[f"{config.model.name}_untrained"] = jax.device_get(initial.variables)
  predictors = {
    name: _run_predictors(config, model, variables, len(folders))
    for name, variables in variants.items()
  }
  # Peers of the trained model's map, beside it: its reconstruction error, its level maps.
  main, peers = variants[config.model.name], {}
  if config.eval.reconstruction_error:
    peers["recon_error"] = "reconstruction_error"
  for level in range(models.get(config.model.name).levels if config.eval.level_maps else 0):
    peers[evaluate.level_source(level)] = evaluate.level_source(level)
  if peers:
    predictors = {
      config.model.name: predictors.pop(config.model.name),
      **{
        f"{config.model.name}_{name}": _run_predictors(config, model, main, len(folders), source)
        for name, source in peers.items()
      },
      **predictors,
    }
  profiles = {
    config.model.name: evaluate.profile(
      model,
      train.run_variables(variants[config.model.name], 0),
      config.data.image_size,
      config.eval.score_filter_size,
      by_part=config.eval.flops_by_part,
    )
  }
  return predictors, profiles


def _run_predictors(
  config: ml_collections.ConfigDict,
  model,
  variables: dict,
  count: int,
  source: str = "",
) -> list[evaluate.PredictFn]:
  """The predict function of each of the program's `count` runs, from (stacked) `variables`;
  `source`: evaluate.MAP_SOURCES (default: the run's, evaluate.map_source)."""
  return [
    evaluate.model_predict_fn(
      model,
      train.run_variables(variables, i),
      config.eval.score_filter_size,
      source or evaluate.map_source(config),
      config.eval.error_weight,
    )
    for i in range(count)
  ]


def _validator(config: ml_collections.ConfigDict, val_sets: list) -> train.Validator:
  """train.Validator scoring each run's variables on its validation set."""

  def validate(model, variables: dict) -> list[dict[str, float]]:
    predictors = _run_predictors(config, model, variables, len(val_sets))
    return [
      evaluate.evaluate(predict, val_set, config.eval.batch_size).metrics
      for predict, val_set in zip(predictors, val_sets)
    ]

  return validate


def _image_level_notes(per_category: dict) -> dict:
  """metrics.json's `notes`: why a category's pixel metrics are null."""
  notes = {
    category: f"null: {report.IMAGE_LEVEL_REASON}"
    for category, values in per_category.items()
    if category != "mean" and values.get("pixel_ap", 0.0) is None
  }
  return {"notes": notes} if notes else {}


def _validation_metrics(per_category: dict[str, evaluate.Evaluation]) -> dict:
  return {
    "validation": {category: e.metrics for category, e in per_category.items()},
    "validation_by_defect": {category: e.by_defect for category, e in per_category.items()},
  }


def write_results(
  workdir: str | Path,
  results: dict,
  profiles: dict,
  caption: str = "",
  by_defect: dict | None = None,
  on_validation: dict | None = None,
) -> None:
  """metrics.json and results.md.

  metrics.json: model -> category (and "mean") -> metric, plus, for models with a profile,
  `params` (reconstructive, discriminative, total), `flops_per_image`, its parts `flops` where
  the model has them, and `latency_ms`; with `by_defect` (model -> category -> defect type ->
  metric) `by_defect`, and with `on_validation` (model -> category -> its evaluation on the
  validation set) `validation` (category -> metric) and `validation_by_defect` (category ->
  kind of validation anomaly -> metric).
  """
  by_defect, on_validation = by_defect or {}, on_validation or {}
  with_means = {
    model: {**per_category, "mean": metrics.mean_over_categories(per_category)}
    for model, per_category in results.items()
  }
  document = {
    model: {
      **per_category,
      **_image_level_notes(per_category),
      **profiles.get(model, {}),
      **({"by_defect": by_defect[model]} if by_defect.get(model) else {}),
      **(_validation_metrics(on_validation[model]) if on_validation.get(model) else {}),
    }
    for model, per_category in with_means.items()
  }
  files.write_json(files.path(workdir) / "metrics.json", document)
  table = report.results_table(with_means, profiles, caption) + report.defect_table(by_defect)
  files.write_atomic(files.path(workdir) / "results.md", table)
