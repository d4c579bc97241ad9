"""`make demo`: DRAEM and POUTA on every embedded category at the tiny size, side by side, each
next to its untrained copy; `make demo-all` adds PRN.

    python -m pouta_jax.demo [--workdir=outputs/demo] [--models=draem,pouta,prn]
        [--categories=weave,pill] [--preset=tiny] [--num_steps=300]
        [--backbone_weights=resnet18.npz] [--jobs=2] [--compilation_cache=DIR]
        [--embedded_seed=1] [--error_weight=1]

The runs (one per model and category) go to `--jobs` worker processes: one tiny run keeps 2
CPU cores only partly busy (small operations, compilation, evaluation), and two at once
finished in 0.79 of the time of one after the other. Each run's log, progress bar included,
goes to <workdir>/<model>/<category>.log; one line per finished run is printed here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import resource
import sys
import time

import jax
import ml_collections
from absl import flags
from etils.epath import Path

from pouta_jax import config as config_lib, errors, experiment, files, models
from pouta_jax.data import category_folder, embedded

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
_VAL_FRACTION = flags.DEFINE_float(
  "val_fraction",
  0.2,
  "data.val_fraction of every run: the training images held out as its validation set, "
  "where the deployment thresholds come from (0: none; thresholds from the test set).",
  lower_bound=0.0,
  upper_bound=0.9,
)
_ERROR_WEIGHT = flags.DEFINE_float(
  "error_weight",
  1.0,
  "eval.error_weight of every model that reconstructs (DRAEM, POUTA), so that the table "
  "compares models, not scorings: the map plus this times the reconstruction error. 1 is the "
  "design study's choice for both (POUTA's default); 0: the maps alone (DRAEM's paper).",
  lower_bound=0.0,
)
_JOBS = flags.DEFINE_integer(
  "jobs", 2, "Runs at once, each in a worker process of its own.", lower_bound=1
)
_EMBEDDED_SEED = flags.DEFINE_integer(
  "embedded_seed",
  0,
  "The embedded dataset's draw. 0 is the one the README reports; another is an independent "
  "draw, a validation set to choose settings on (outputs/data/embedded_seed<N>; the workdir "
  "defaults to outputs/demo_seed<N>).",
  lower_bound=0,
)
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  "outputs/compilation_cache",
  "jax's persistent compilation cache, shared by the runs and kept for the next demo; empty: "
  "none. JAX_COMPILATION_CACHE_DIR, when set, is used instead.",
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
    if models.get(model).reconstructs and config.eval.error_weight:
      notes.append(
        f"{model}: its map plus {config.eval.error_weight:g} x its reconstruction error "
        f"(--error_weight; 0: the map alone)"
      )
    if config.data.num_real_anomalies:
      notes.append(
        f"{model}: trained on {config.data.num_real_anomalies} real defect images "
        f"per category, which are left out of its test set "
        f"(<model>/<category>/real_anomalies.json)"
      )
  return notes


def _thresholds_note(config: ml_collections.ConfigDict) -> str:
  """Where the caption's thresholds come from: the validation set when there is one."""
  if not config.data.val_fraction:
    return "Heatmap threshold: pixel F1-max on the test set (display only)."
  return (
    f"Thresholds from each run's validation set ({100 * config.data.val_fraction:.0f}% of "
    f"the normal training images, held out of training, alone and with synthetic anomalies): "
    f"the heatmaps' binary maps and *_f1_at_val_thr (test F1 at them, what a deployment gets); "
    f"*_f1_max is the test set's best F1, an oracle."
  )


def _config(model: str, category: str) -> ml_collections.ConfigDict:
  config = config_lib.load(model, f"{category},{_PRESET.value}")
  config.data.val_fraction = _VAL_FRACTION.value
  if _NUM_STEPS.value:
    config.train.num_steps = _NUM_STEPS.value
  if models.get(model).reconstructs:
    config.eval.error_weight = _ERROR_WEIGHT.value
  config.data.embedded_seed = _EMBEDDED_SEED.value
  if "backbone" in config:
    config.backbone.weights = _BACKBONE_WEIGHTS.value
    config.backbone.pretrained = bool(_BACKBONE_WEIGHTS.value)
  return config


def _start_worker(compilation_cache: str) -> None:
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags; a spawned process starts unparsed
  # A model's runs differ only in their data, so they compile the same programs: compiling
  # (half a tiny run's time on 2 cores, most of it the initialisers' random numbers) is paid
  # once per model, and not at all by a second demo.
  if compilation_cache and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", compilation_cache)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, log: Path) -> dict:
  """One run, in a worker process, its stderr (logs, progress bar) and stdout into `log`."""
  with log.open("w") as out:
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1), os.dup2(out.fileno(), 2)
    try:
      return experiment.run(config, workdir, include_untrained=True)
    finally:
      sys.stdout.flush(), sys.stderr.flush()
      os.dup2(saved[0], 1), os.dup2(saved[1], 2)
      os.close(saved[0]), os.close(saved[1])


def main(argv: list[str]) -> None:
  del argv
  start = time.perf_counter()
  seed = _EMBEDDED_SEED.value
  workdir = Path(_WORKDIR.value if seed == 0 or _WORKDIR.present else f"outputs/demo_seed{seed}")
  # Models interleaved: the first runs at once are different models, each compiling its own
  # programs; every later run finds them in the compilation cache (two runs of one model
  # starting together would both compile the same programs).
  runs = [(m, c, _config(m, c)) for c in _CATEGORIES.value for m in _MODELS.value]
  for model, category, config in runs:  # every run checked and built before any run starts
    resolved = models.resolve(config, [len(category_folder(config).train)])
    changed = experiment.config_changes(workdir / model / category, resolved)
    if changed:
      raise errors.ConfigError(
        f"{workdir / model / category} holds a demo run with other settings "
        f"({experiment.listed_changes(changed)}): from another version or other flags. Remove "
        f"{workdir}, or give another --workdir (make demo DEMO_DIR=...)"
      )
  finished, results, profiles, configs = {}, {}, {}, {}
  with contextlib.ExitStack() as stack:
    pool = stack.enter_context(
      concurrent.futures.ProcessPoolExecutor(
        _JOBS.value,
        multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(_COMPILATION_CACHE.value,),
      )
    )
    stack.callback(pool.shutdown, cancel_futures=True)  # on a failure: no new runs
    futures = {}
    for model, category, config in runs:
      (workdir / model).mkdir(parents=True, exist_ok=True)
      log = workdir / model / f"{category}.log"
      futures[pool.submit(_train_and_evaluate, config, workdir / model / category, log)] = (
        model,
        category,
        log,
      )
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      model, category, log = futures[future]
      finished[model, category] = future.result()
      metrics = finished[model, category]["metrics"][model][category]
      print(
        f"[{done}/{len(runs)}] {model} {category}: image AUROC "
        f"{100 * metrics['image_auroc']:.1f}, pixel AP {100 * metrics['pixel_ap']:.1f} "
        f"({(time.perf_counter() - start) / 60:.1f} min since the start; log: {log})",
        flush=True,
      )
  for model, category, config in runs:  # merged in the order of the runs, not of their ends
    for name, per_category in finished[model, category]["metrics"].items():
      results.setdefault(name, {}).update(per_category)
    profiles.update(finished[model, category]["profiles"])
    configs[model] = config
  minutes = (time.perf_counter() - start) / 60
  peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  caption = (
    f"Embedded dataset{f' (validation draw, seed {seed})' if seed else ''}, preset "
    f"{_PRESET.value}: {config.data.image_size} px, base width "
    f"{config.model.base_width}, {config.train.num_steps} steps of batch "
    f"{config.data.batch_size} per model and category (a short CPU schedule, not the papers' "
    f"700 epochs). FLOPs from XLA's cost analysis, latency at batch 1 on this machine's CPU "
    f"({_JOBS.value} runs at once). Wall time {minutes:.1f} min, peak memory {peak_gib:.2f} "
    f"GiB (the largest run process). {_thresholds_note(config)}"
    + "".join(f" {note}." for note in _notes(configs))
  )
  experiment.write_results(workdir, results, profiles, caption)
  print((workdir / "results.md").read_text())
  outputs = "metrics.json, results.md, <model>/<category>/heatmaps/*.png"
  print(f"Outputs: {files.absolute(workdir)}/{outputs}")


if __name__ == "__main__":
  errors.run(main)
