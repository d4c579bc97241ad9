"""Exports a trained workdir as a self-contained artifact for downstream evaluation.

    python -m pouta_jax.export --workdir=outputs/bottle --out=exported/bottle \
        [--image_sizes=256,512] [--batch_size=0] [--run=bottle]

The artifact (read by `pouta_jax.artifact` with jax alone) holds one serialized jax.export
program per image size, lowered for CPU, CUDA and TPU, with the batch dimension symbolic unless
--batch_size fixes it; the weights; the preprocessing and image-score rule; suggested thresholds;
the config and the metrics of the run. It is written to a temporary folder and renamed, and an
existing --out is never overwritten.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils.epath import Path

from pouta_jax import (
  artifact,
  checkpoint,
  config as config_lib,
  errors,
  evaluate,
  files,
  models,
  report,
  runs,
  sharding,
  train,
)

PLATFORMS = ("cpu", "cuda", "tpu")


def _state_of(workdir: Path, config) -> train.TrainState:
  """The newest checkpoint's train state; NotFoundError before any work if there is none."""
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  try:
    if mngr.latest_step() is None:
      raise errors.NotFoundError(f"{workdir}/checkpoints: no checkpoint to export; train first")
    # The step count only sets the optimizer's schedule, not the state's shapes.
    template = train.setup(config, [1] * len(runs.runs_of(config))).state
    return checkpoint.restore_latest(mngr, template, runs.count(config))
  finally:
    mngr.close()


class TrainedModel(NamedTuple):
  config: ml_collections.ConfigDict  # the run's (runs.Run.config)
  category: str
  model: nn.Module
  variables: dict  # host arrays of the run's model
  step: int  # the step its variables are from (train.select: the last, or the best validated)
  folder: Path  # the run's outputs (metrics.json, thresholds.json)


def trained_model(
  workdir: Path, run: str = "", config: ml_collections.ConfigDict | None = None
) -> TrainedModel:
  """The newest checkpoint's model of `run` (a runs.Run name such as `bottle` or
  `train.seed=1/bottle`; needed only for a program that trained several runs at once), as
  train.select chose it; ConfigError listing the runs otherwise."""
  config = config or config_lib.from_workdir(workdir)
  program = runs.runs_of(config)
  names = [r.name for r in program]
  if len(program) == 1 and run == program[0].category:
    run = ""  # a single run's category names it too
  if run not in names:
    raise errors.ConfigError(
      f"--run={run!r}: {workdir} trained the runs {names}; choose one of them"
    )
  index = names.index(run)
  model = models.get(config.model.name).build(config)
  state = _state_of(workdir, config)
  variables = train.run_variables(sharding.to_host(state.selected_variables), index)
  step = int(np.asarray(sharding.to_host(state.selected_step)).reshape(-1)[index])
  chosen = program[index]
  return TrainedModel(chosen.config, chosen.category, model, variables, step, workdir / run)


def read_thresholds(folder: Path, category: str) -> dict[str, dict]:
  """A run's thresholds of `category`: source ("oracle": F1-max on the test set; "validation":
  on the validation set, with data.val_fraction) -> {"image": ..., "pixel": ...}; {} when the
  run was never evaluated. Reads the flat test-set thresholds older versions wrote too."""
  found = (_read_json(folder / "thresholds.json") or {}).get(category) or {}
  return {"oracle": found} if "image" in found else found


def _read_json(path: Path) -> dict | None:
  """`path` parsed, None if there is none; a damaged one is named (files.read_json)."""
  return files.read_json(path, hint="; evaluate the run again") if path.is_file() else None


def _map_description(error_weight: float, fuse_levels: bool) -> str:
  probability = "per-pixel anomaly probability" + (
    " (the mean of the final map's and every level's)" if fuse_levels else ""
  )
  if not error_weight:
    return f"float32 (B, S, S) in [0, 1]: {probability}"
  return (
    f"float32 (B, S, S) in [0, {report.map_max(error_weight):g}]: {probability} plus "
    f"{error_weight:g} x the reconstruction error (mean |image - reconstruction| over the channels)"
  )


def export(
  workdir: str | Path,
  out: str | Path,
  image_sizes: tuple[int, ...] = (),
  batch_size: int = 0,
  run: str = "",
  runtime: str = "jax",
) -> Path:
  """Writes the artifact of `workdir`'s newest checkpoint to `out`; returns `out`.

  `image_sizes`: the sizes to compile for (default: the training size); `batch_size` 0 leaves
  the batch dimension symbolic, so one program serves every batch size; `run`: which model
  of a program that trained several runs at once (runs.Run.name); `runtime`: "jax" (jax.export
  programs) or "onnx" (ONNX models, converted by jax2onnx; run by ONNX Runtime).
  """
  workdir, out = Path(workdir), Path(out)
  if out.exists():
    raise errors.ExistsError(f"--out={out} exists; choose another path or delete it")
  config = config_lib.from_workdir(workdir)
  sizes = tuple(image_sizes) or (config.data.image_size,)
  bad = [s for s in sizes if s <= 0 or s % config_lib.SIZE_MULTIPLE]
  if bad:
    raise errors.ConfigError(
      f"--image_sizes={list(sizes)}: {bad} not positive multiples of {config_lib.SIZE_MULTIPLE}"
    )
  if models.get(config.model.name).size_bound and sizes != (config.data.image_size,):
    raise errors.ConfigError(
      f"--image_sizes={list(sizes)}: a {config.model.name} model runs at its "
      f"training size only ({config.data.image_size}: its prepared variables, "
      f"e.g. prototypes, have that size's shapes)"
    )
  if runtime not in artifact.RUNTIMES:
    raise errors.ConfigError(f"--format={runtime!r}: expected one of {artifact.RUNTIMES}")
  if runtime == "onnx" and importlib.util.find_spec("jax2onnx") is None:
    raise errors.ConfigError("--format=onnx needs jax2onnx: pip install -e '.[onnx]'")
  if batch_size < 0:
    raise errors.ConfigError(
      f"--batch_size={batch_size}: expected 0 (any) or a positive batch size"
    )
  trained = trained_model(workdir, run, config)
  category, model, variables = trained.category, trained.model, trained.variables
  # Scored as the run's config (the manifest's) says, as predict.from_workdir scores it.
  scoring = trained.config.eval
  predict_fn = evaluate.make_predict_fn(
    model, scoring.score_filter_size, evaluate.map_source(trained.config), scoring.error_weight
  )
  programs = {}
  if runtime == "jax":
    variables_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    batch = batch_size or jax.export.symbolic_shape("batch")[0]
    for size in sizes:
      images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
      exported = jax.export.export(predict_fn, platforms=PLATFORMS)(variables_spec, images)
      programs[size] = exported.serialize()

  metrics = _read_json(trained.folder / "metrics.json") or {}
  thresholds = read_thresholds(trained.folder, category)
  manifest = {
    "format": artifact.FORMAT,
    "model": config.model.name,
    "category": category,
    "step": trained.step,
    "image_sizes": list(sizes),
    "batch_size": batch_size or "any",
    "runtime": runtime,
    "platforms": list(PLATFORMS) if runtime == "jax" else ["onnxruntime"],
    "inputs": "float32 images (B, S, S, 3), NHWC, RGB, values in [0, 1]",
    "preprocessing": {
      "color": "RGB; grayscale repeated over 3 channels",
      "resize": f"Pillow bilinear to S x S (the training size: {config.data.image_size})",
      "scale": "uint8 / 255",
    },
    "outputs": {
      "anomaly_map": _map_description(scoring.error_weight, scoring.fuse_levels),
      "image_score": f"float32 (B,): max of the {scoring.score_filter_size}x"
      f"{scoring.score_filter_size} mean-filtered map (zero "
      "padding)",
    },
    "thresholds": thresholds.get("oracle") or {"image": None, "pixel": None},
    "thresholds_rule": "oracle: F1-max on the run's test set, chosen on the test labels (null: "
    "the run was never evaluated); python -m pouta_jax.calibrate sets one on good images",
    "validation_thresholds": thresholds.get("validation"),
    "validation_thresholds_rule": "F1-max on the run's validation set (the image threshold's "
    "with both classes weighed alike): held-out normal training images and the same images "
    "with a synthesised anomaly (null: no data.val_fraction)",
    "metrics": metrics.get(config.model.name, {}).get(category),
    "config": trained.config.to_dict(),
    "versions": {"jax": jax.__version__}
    | ({"jax2onnx": importlib.metadata.version("jax2onnx")} if runtime == "onnx" else {}),
  }

  if runtime == "onnx":
    metadata = {k: manifest[k] for k in ONNX_METADATA if manifest.get(k) is not None}
    for size in sizes:
      programs[size] = _onnx_bytes(predict_fn, variables, size, batch_size, metadata)
  with files.atomic_folder(out, index=artifact.MANIFEST) as staging:
    if runtime == "jax":  # an ONNX model holds its weights
      files.write_atomic(staging / artifact.WEIGHTS, _npz_bytes(artifact.flatten(variables)))
    for size, program in programs.items():
      files.write_atomic(staging / artifact.program_name(size, runtime), program)
    manifest["sha256"] = {p.name: artifact.sha256(p) for p in sorted(staging.iterdir())}
    manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
    files.write_json(staging / artifact.MANIFEST, manifest)
  return out


# What an ONNX model carries of its artifact.json (as JSON strings in its metadata_props), so a
# user holding only the .onnx file knows its inputs, preprocessing and thresholds.
ONNX_METADATA = (
  "format",
  "model",
  "category",
  "step",
  "inputs",
  "preprocessing",
  "outputs",
  "thresholds",
  "thresholds_rule",
  "validation_thresholds",
  "versions",
)


def _onnx_bytes(
  predict_fn: Callable, variables: dict, size: int, batch_size: int, metadata: dict
) -> bytes:
  """The predict function at `size` as an ONNX model (the variables as its constants)."""
  # jax2onnx 0.13 logs a traceback for each plugin of a package it cannot load (dm_pix, against
  # this jax): about operations these models do not use.
  logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
  import jax2onnx  # only at export time, found by `export`
  import onnx

  with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx 0.13 prints its debugging lines
    model = jax2onnx.to_onnx(
      lambda images: predict_fn(variables, images),
      [(batch_size or "batch", size, size, 3)],
      model_name=f"pouta_jax_{size}px",
    )
  onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in metadata.items()})
  return model.SerializeToString()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  sizes = tuple(int(s) for s in f.image_sizes)
  out = export(f.workdir, f.out, sizes, f.batch_size, f.run, f.format)
  print(f"Artifact in {out}: load it with pouta_jax.artifact.load({str(out)!r})")


if __name__ == "__main__":
  # Defined here, not at import: main.py has its own --workdir.
  flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
  flags.DEFINE_string(
    "out", None, "Folder to write the artifact to (must not exist).", required=True
  )
  flags.DEFINE_list("image_sizes", [], "Image sizes to compile for (default: the training size).")
  flags.DEFINE_integer("batch_size", 0, "Fixed batch size; 0: any batch size.")
  flags.DEFINE_enum(
    "format", "jax", list(artifact.RUNTIMES), "jax (jax.export programs) or onnx (ONNX Runtime)."
  )
  flags.DEFINE_string(
    "run", "", "Which run, for a program that trained several (e.g. bottle, train.seed=1/bottle)."
  )
  errors.run(main)
