"""Exports a trained workdir as a self-contained artifact for downstream evaluation.

    python -m pouta_jax.export --workdir=outputs/bottle --out=exported/bottle \
        [--image_sizes=256,512] [--batch_size=0] [--category=bottle]

The artifact (read by `pouta_jax.artifact` with jax alone) holds one serialized jax.export
program per image size, lowered for CPU, CUDA and TPU, with the batch dimension symbolic unless
--batch_size fixes it; the weights; the preprocessing and image-score rule; suggested thresholds;
the config and the metrics of the run. It is written to a temporary folder and renamed, and an
existing --out is never overwritten.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from pouta_jax import (
  artifact,
  checkpoint,
  config as config_lib,
  errors,
  evaluate,
  files,
  models,
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
    template = train.setup(config, [1] * len(config_lib.categories_of(config))).state
    return checkpoint.restore_latest(mngr, template)
  finally:
    mngr.close()


class TrainedModel(NamedTuple):
  config: ml_collections.ConfigDict
  category: str
  model: nn.Module
  variables: dict  # host arrays of `category`'s model
  state: train.TrainState  # the whole (possibly stacked) newest state


def trained_model(
  workdir: Path, category: str = "", config: ml_collections.ConfigDict | None = None
) -> TrainedModel:
  """The newest checkpoint's model of `category` (needed only for a run that trained several
  categories at once); ConfigError listing the categories otherwise."""
  config = config or config_lib.from_workdir(workdir)
  categories = config_lib.categories_of(config)
  if not config_lib.is_stacked(config):
    category = category or config.data.category  # a single-category run needs no --category
  if category not in categories:
    raise errors.ConfigError(
      f"--category={category!r}: {workdir} trained {list(categories)}; choose one of them"
    )
  model = models.get(config.model.name).build(config)
  state = _state_of(workdir, config)
  variables = train.category_variables(
    config, sharding.to_host(state.variables), categories.index(category)
  )
  return TrainedModel(config, category, model, variables, state)


def read_thresholds(workdir: Path, category: str) -> dict | None:
  """The run's test-set F1-max thresholds of `category` (None: never evaluated)."""
  return (_read_json(workdir / "thresholds.json") or {}).get(category)


def _read_json(path: Path) -> dict | None:
  return json.loads(path.read_text()) if path.is_file() else None


def export(
  workdir: str | Path,
  out: str | Path,
  image_sizes: tuple[int, ...] = (),
  batch_size: int = 0,
  category: str = "",
) -> Path:
  """Writes the artifact of `workdir`'s newest checkpoint to `out`; returns `out`.

  `image_sizes`: the sizes to compile for (default: the training size); `batch_size` 0 leaves
  the batch dimension symbolic, so one program serves every batch size; `category`: which
  model of a run that trained several categories at once.
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
  if batch_size < 0:
    raise errors.ConfigError(
      f"--batch_size={batch_size}: expected 0 (any) or a positive batch size"
    )
  _, category, model, variables, state = trained_model(workdir, category, config)

  predict_fn = evaluate.make_predict_fn(model, config.eval.score_filter_size)
  variables_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  batch = batch_size or jax.export.symbolic_shape("batch")[0]
  programs = {}
  for size in sizes:
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    programs[size] = jax.export.export(predict_fn, platforms=PLATFORMS)(variables_spec, images)

  metrics = _read_json(workdir / "metrics.json") or {}
  thresholds = read_thresholds(workdir, category)
  manifest = {
    "format": artifact.FORMAT,
    "model": config.model.name,
    "category": category,
    "step": train.current_step(state),
    "image_sizes": list(sizes),
    "batch_size": batch_size or "any",
    "platforms": list(PLATFORMS),
    "inputs": "float32 images (B, S, S, 3), NHWC, RGB, values in [0, 1]",
    "preprocessing": {
      "color": "RGB; grayscale repeated over 3 channels",
      "resize": f"Pillow bilinear to S x S (the training size: {config.data.image_size})",
      "scale": "uint8 / 255",
    },
    "outputs": {
      "anomaly_map": "float32 (B, S, S) in [0, 1]: per-pixel anomaly probability",
      "image_score": f"float32 (B,): max of the {config.eval.score_filter_size}x"
      f"{config.eval.score_filter_size} mean-filtered map (zero "
      "padding)",
    },
    "thresholds": thresholds or {"image": None, "pixel": None},
    "thresholds_rule": "oracle: F1-max on the run's test set, chosen on the test labels (null: "
    "the run was never evaluated); python -m pouta_jax.calibrate sets one on good images",
    "metrics": metrics.get(config.model.name, {}).get(category),
    "config": config.to_dict(),
    "versions": {"jax": jax.__version__},
  }

  with files.atomic_folder(out) as staging:
    files.write_atomic(staging / artifact.WEIGHTS, _npz_bytes(artifact.flatten(variables)))
    for size, exported in programs.items():
      files.write_atomic(staging / artifact.program_name(size), exported.serialize())
    manifest["sha256"] = {p.name: artifact.sha256(p) for p in sorted(staging.iterdir())}
    manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
    files.write_json(staging / artifact.MANIFEST, manifest)
  return out


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  out = export(f.workdir, f.out, tuple(int(s) for s in f.image_sizes), f.batch_size, f.category)
  print(f"Artifact in {out}: load it with pouta_jax.artifact.load({str(out)!r})")


if __name__ == "__main__":
  # Defined here, not at import: main.py has its own --workdir.
  flags.DEFINE_string("workdir", None, "A trained run's workdir.", required=True)
  flags.DEFINE_string(
    "out", None, "Folder to write the artifact to (must not exist).", required=True
  )
  flags.DEFINE_list("image_sizes", [], "Image sizes to compile for (default: the training size).")
  flags.DEFINE_integer("batch_size", 0, "Fixed batch size; 0: any batch size.")
  flags.DEFINE_string("category", "", "Which category, for a run that trained several at once.")
  errors.run(main)
