"""Scores new images with a trained model: an exported artifact or a workdir's newest checkpoint.

    python -m pouta_jax.predict --artifact=exported/bottle --input='line3/*.png' --out=scored
    python -m pouta_jax.predict --workdir=runs/bottle --input=images/ --out=scored \
        [--threshold=0.62] [--map_format=npy] [--batch_size=16] [--overwrite]

`--input` is an image file, a folder (searched recursively) or a glob pattern; PNG, JPEG, BMP
and TIFF of any size, grayscale, RGB or RGBA, preprocessed as in training (RGB, Pillow's
bilinear resize to the training size). 16-bit and float images are refused as in training
(their range is not known; convert them first) and listed in errors.csv. `--out` gets:

    scores.csv            path, image score, decision (anomalous / normal at the threshold)
    maps/<name>.png       the anomaly map at the image's own size: 16-bit, value / 65535 is the
                          per-pixel anomaly probability, times 1 + eval.error_weight for a
                          model scored with its reconstruction error (or maps/<name>.npy, float32)
    overlays/<name>.png   the map over the image, with the score and the decision written in
    errors.csv            every file not scored, and why: unreadable images, and what the
                          input names that is no image (each also said in a warning line)
    predict.json          the model, the threshold and where it came from, the counts

`<name>` is the file's path below the input folder, its folders kept (`sub/x.png` gives
`maps/sub/x.png.png`), so names never collide. The folder is written whole or not at all. An
existing `--out` is replaced only with `--overwrite`, and only if it is an earlier output of
predict (it holds predict.json); an `--out` that is, holds or lies inside an input is refused.
Scoring nothing (every file unreadable) is an error and writes nothing.

`--threshold` picks the image threshold: `calibrated` (set on known-good images by
`python -m pouta_jax.calibrate`, artifacts only), `validation` (the run's F1-max on its
validation split, data.val_fraction: no test label used), `oracle` (the run's test-set F1-max:
chosen on the test labels, so its decisions there are optimistic), or a number. The default is
the first of calibrated, validation and oracle that the model has; predict.json says which was
used.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from typing import Callable, Iterator, Sequence

import numpy as np
from absl import flags, logging
from etils.epath import Path
from PIL import Image, ImageDraw
from tqdm import tqdm

from pouta_jax import artifact as artifact_lib, errors, files, report
from pouta_jax.data.folder import IMAGE_SUFFIXES, check_readable, open_image, resize_image

MAP_FORMATS = ("png16", "npy")
ORACLE_RULE = "oracle: F1-max on the training run's test set (chosen on the test labels)"
VALIDATION_RULE = (
  "validation: F1-max on the training run's validation set, its two classes weighed alike (no "
  "test label used)"
)
THRESHOLD_SOURCES = ("calibrated", "validation", "oracle")
# The file that marks a folder as predict's output (the last one written).
PREDICT_JSON = "predict.json"


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model ready to score images: float32 (B, S, S, 3) in [0, 1] -> maps (B, S, S) in
  [0, map_max] and image scores (B,), with the image thresholds it carries."""

  source: str  # what was loaded, for predict.json
  model: str
  image_size: int
  batch_size: int  # the program's fixed batch; 0: any
  fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  thresholds: dict[str, tuple[float, str]]  # source (THRESHOLD_SOURCES) -> (value, rule)
  map_max: float = 1.0  # 1 + eval.error_weight: a probability plus the weighted error

  def threshold(self, choice: str = "") -> tuple[float | None, str]:
    """The image threshold and how it was set, for `--threshold=choice`: a source, a number, or
    "" (the first source of THRESHOLD_SOURCES the model has; None when it has none)."""
    if not choice:
      for source in THRESHOLD_SOURCES:
        if source in self.thresholds:
          return self.thresholds[source]
      return None, "none: no decisions"
    if choice in THRESHOLD_SOURCES:
      if choice not in self.thresholds:
        has = ", ".join(self.thresholds) or "none"
        raise errors.ConfigError(
          f"--threshold={choice}: {self.source} has no {choice} threshold (it has: {has})"
          + ("; set one with python -m pouta_jax.calibrate" if choice == "calibrated" else "")
        )
      return self.thresholds[choice]
    try:
      value = float(choice)
    except ValueError:
      value = float("nan")
    if not np.isfinite(value):
      raise errors.ConfigError(
        f"--threshold={choice}: expected {', '.join(THRESHOLD_SOURCES)} or a finite number"
      )
    return value, "given (--threshold)"

  def score(self, images: Sequence[Image.Image], batch_size: int) -> list[tuple[np.ndarray, float]]:
    """(anomaly map at each image's own size, image score) of decoded RGB images, in batches
    padded to one shape (one compilation)."""
    batch = self.batch_size or batch_size
    out: list[tuple[np.ndarray, float]] = []
    for start in range(0, len(images), batch):
      chunk = images[start : start + batch]
      pixels = np.stack([resize_image(im, self.image_size) for im in chunk])
      pixels = pixels.astype(np.float32) / 255.0
      padded = np.concatenate([pixels, np.zeros((batch - len(chunk),) + pixels.shape[1:], "f4")])
      maps, scores = (np.asarray(a) for a in self.fn(padded))
      for image, m, s in zip(chunk, maps, scores):
        full = Image.fromarray(np.asarray(m, np.float32), mode="F").resize(
          image.size, Image.BILINEAR
        )
        out.append((np.clip(np.asarray(full), 0.0, self.map_max), float(s)))
    return out


def from_artifact(path: str | Path) -> Predictor:
  art = artifact_lib.load(path)
  batch = art.manifest["batch_size"]
  thresholds = {}
  if art.calibration is not None:  # its image_threshold checked by the reader
    c = art.calibration
    rate = c.get("observed_fpr")
    rate = f"{rate:.4g}" if isinstance(rate, (int, float)) else "?"
    thresholds["calibrated"] = (
      c["image_threshold"],
      f"calibrated: false-positive rate {rate} (target {c.get('target_fpr')}) "
      f"on {c.get('num_good')} good images ({c.get('good')})",
    )
  thresholds.update(
    _run_thresholds({"validation": art.validation_thresholds, "oracle": art.thresholds})
  )
  config = art.manifest.get("config")
  evaluation = config.get("eval") if isinstance(config, dict) else None
  weight = evaluation.get("error_weight", 0.0) if isinstance(evaluation, dict) else 0.0
  if not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
    raise artifact_lib.ArtifactError(
      f"{path}/{artifact_lib.MANIFEST}: config.eval.error_weight {weight!r} is not a weight >= 0"
    )
  return Predictor(
    source=f"artifact {files.absolute(path)}",
    model=art.manifest["model"],
    image_size=art.image_sizes[0],
    batch_size=0 if batch == "any" else int(batch),
    fn=art.predict,
    thresholds=thresholds,
    map_max=report.map_max(weight),
  )


def from_workdir(workdir: str | Path, run: str = "") -> Predictor:
  try:
    from pouta_jax import evaluate, export  # the training code (and jax): only for workdirs
  except ImportError as e:
    raise errors.ConfigError(
      f"--workdir={workdir}: scoring with a workdir's checkpoint needs the training install "
      f"({e}); an artifact exported with --format=onnx needs only onnxruntime"
    ) from e
  workdir = files.path(workdir)
  trained = export.trained_model(workdir, run)
  config = trained.config
  return Predictor(
    source=f"workdir {files.absolute(workdir)} (run {run or trained.category}, "
    f"step {trained.step})",
    model=config.model.name,
    image_size=config.data.image_size,
    batch_size=0,
    fn=evaluate.model_predict_fn(
      trained.model,
      trained.variables,
      config.eval.score_filter_size,
      evaluate.map_source(config),
      config.eval.error_weight,
    ),
    thresholds=_run_thresholds(export.read_thresholds(trained.folder, trained.category)),
    map_max=report.map_max(config.eval.error_weight),
  )


def _run_thresholds(found: dict[str, dict]) -> dict[str, tuple[float, str]]:
  """The image thresholds of a training run's evaluation (export.read_thresholds' format), in
  THRESHOLD_SOURCES order."""
  rules = {"validation": VALIDATION_RULE, "oracle": ORACLE_RULE}
  return {
    source: (found[source]["image"], rule)
    for source, rule in rules.items()
    if (found.get(source) or {}).get("image") is not None
  }


def _refuse(path: Path, why: str) -> None:
  raise errors.DataError(f"{path}: {why}; every file named must be a readable image")


def input_files(spec: str, skipped: files.Skipped | None = None) -> tuple[list[Path], Path]:
  """The image files `--input` names, and the folder their output names are relative to.
  Anything it names that is not a regular image file (a FIFO, a folder that cannot be listed,
  a text file) goes to `skipped`, or, without it, raises a DataError naming it."""
  skipped = skipped or _refuse
  path = files.path(spec)
  if files.is_dir(path, "input"):
    found, root = files.files_in(path, skipped), path
  elif _exists(path):  # a file, a FIFO, a device, a broken link
    if why := files.not_a_file(path):
      raise errors.DataError(f"--input={spec}: {why}; expected an image file, a folder or a glob")
    found, root = [path], path.parent
  elif files.is_remote(spec) and any(c in spec for c in "*?["):
    parts = spec.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = files.path("/".join(parts[:fixed]))
    found = [p for p in root.glob("/".join(parts[fixed:])) if p.is_file()]
  elif any(c in spec for c in "*?["):
    found = []
    for name in glob.glob(spec, recursive=True):
      if os.path.isdir(name):
        continue  # a folder the pattern matches holds no file it names
      if why := files.not_a_file(name):
        skipped(Path(name), why)
      else:
        found.append(Path(name).absolute())
    root = Path(os.path.commonpath([p.parent for p in found])) if found else path
  else:
    raise errors.NotFoundError(f"--input={spec}: no such file or folder, and not a glob pattern")
  images = []
  for p in sorted(found):
    if p.suffix.lower() in IMAGE_SUFFIXES:
      images.append(p)
    else:
      skipped(p, f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
  if not images:
    raise errors.NotFoundError(f"--input={spec}: no image files ({', '.join(IMAGE_SUFFIXES)})")
  return images, root


def scored(
  predictor: Predictor,
  paths: Sequence[Path],
  batch_size: int,
  unreadable: Callable[[Path, errors.DataError], None] | None = None,
  desc: str = "predict",
) -> Iterator[tuple[Path, Image.Image, np.ndarray, float]]:
  """(path, RGB image, anomaly map at its size, image score) of each of `paths`, scored in
  batches under a progress bar. A file that cannot be read as in training (16-bit and float
  images included) goes to `unreadable`, or, without it, raises its DataError."""
  # A batch of any size pads to no more images than there are.
  batch = predictor.batch_size or max(1, min(batch_size, len(paths)))
  with tqdm(total=len(paths), desc=desc, unit="image", dynamic_ncols=True) as bar:
    for start in range(0, len(paths), batch):
      readable = []
      for path in paths[start : start + batch]:
        try:
          check_readable(path)
          readable.append((path, open_image(path, "RGB")))
        except errors.DataError as e:
          if unreadable is None:
            raise
          unreadable(path, e)
      results = predictor.score([image for _, image in readable], batch)
      for (path, image), (anomaly_map, score) in zip(readable, results):
        yield path, image, anomaly_map, score
      bar.update(len(paths[start : start + batch]))


def output_name(path: Path, root: Path) -> str:
  """The outputs' name of an input file: its path below the input folder, folders kept, so
  names never collide and lead back to the file."""
  return path.relative_to(root).as_posix()


def _exists(path: Path) -> bool:
  """Whether anything is at `path`, a broken link included."""
  return path.exists() if files.is_remote(path) else os.path.lexists(path)


def _real(path: Path) -> str:
  return os.fspath(path).rstrip("/") if files.is_remote(path) else os.path.realpath(path)


def _within(inner: str, outer: str) -> bool:
  """Whether path `inner` is `outer` or lies inside it (both `_real`)."""
  return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_out(
  out: Path, overwrite: bool, images: Sequence[Path], input_folder: Path | None
) -> None:
  """Refuses an `--out` that would destroy what it must not: an input (the folder scanned, an
  image, or a folder holding one), a file, or a folder predict did not write; `--overwrite`
  replaces only an earlier output of predict (its predict.json)."""
  real = _real(out)
  inputs = [_real(p) for p in images]
  clash = next((p for p in inputs if _within(p, real)), None)
  if clash is None and input_folder is not None and _within(real, _real(input_folder)):
    clash = os.fspath(input_folder)
  if clash is not None:
    raise errors.ConfigError(
      f"--out={out}: it is, holds or lies inside an input ({clash}); write the outputs elsewhere"
    )
  if not _exists(out):
    return
  if not out.is_dir():
    raise errors.ExistsError(f"--out={out} is a file, not an output folder; choose another path")
  if not overwrite:
    raise errors.ExistsError(f"--out={out} exists; choose another path or add --overwrite")
  if not (out / PREDICT_JSON).is_file():
    raise errors.ExistsError(
      f"--out={out} holds no {PREDICT_JSON}: not an output of predict, and --overwrite replaces "
      f"only those; choose another path"
    )


def _overlay(image: Image.Image, anomaly_map: np.ndarray, score: float, decision: str) -> bytes:
  picture = Image.fromarray(report.overlaid(np.asarray(image), anomaly_map))
  draw = ImageDraw.Draw(picture)
  text = f"score {score:.4f}" + (f" {decision}" if decision else "")
  box = draw.textbbox((2, 2), text)
  draw.rectangle(box, fill=(0, 0, 0))
  draw.text((2, 2), text, fill=(255, 80, 80) if decision == "anomalous" else (255, 255, 255))
  return report.png_bytes(picture)


def _map_bytes(anomaly_map: np.ndarray, map_format: str, map_max: float) -> bytes:
  if map_format == "npy":
    out = io.BytesIO()
    np.save(out, anomaly_map.astype(np.float32))
    return out.getvalue()
  levels = np.round(anomaly_map / map_max * 65535).astype(np.uint16)
  return report.png_bytes(Image.fromarray(levels))


def predict(
  predictor: Predictor,
  input_spec: str,
  out: str | Path,
  threshold: str = "",
  batch_size: int = 16,
  map_format: str = "png16",
  overwrite: bool = False,
) -> dict:
  """Scores every image `input_spec` names and writes the outputs (module docstring) to `out`;
  returns predict.json's content. `threshold`: as `Predictor.threshold`."""
  out = files.path(out)
  if map_format not in MAP_FORMATS:
    raise errors.ConfigError(f"--map_format={map_format!r}: expected one of {MAP_FORMATS}")
  if not 0 < batch_size <= artifact_lib.MAX_BATCH:
    raise errors.ConfigError(
      f"--batch_size={batch_size}: expected a batch size in [1, {artifact_lib.MAX_BATCH}]"
    )
  threshold, rule = predictor.threshold(threshold)
  rows, failures = [["path", "image_score", "decision"]], [["path", "error"]]

  def not_used(path: Path, why: str) -> None:  # said and listed; the others are scored
    logging.warning("Not scored: %s: %s", path, why)
    failures.append([str(path), why])

  paths, root = input_files(input_spec, not_used)
  scanned = root if files.path(input_spec).is_dir() else None  # a folder searched recursively
  check_out(out, overwrite, paths, scanned)
  suffix = ".npy" if map_format == "npy" else ".png"
  with files.atomic_folder(out, index=PREDICT_JSON, replace=overwrite) as staging:
    (staging / "maps").mkdir()
    (staging / "overlays").mkdir()

    def unreadable(path: Path, e: errors.DataError) -> None:  # listed; the batch goes on
      not_used(path, str(e))

    for path, image, anomaly_map, score in scored(predictor, paths, batch_size, unreadable):
      decision = "" if threshold is None else ("anomalous" if score >= threshold else "normal")
      name = output_name(path, root)
      rows.append([str(path), f"{score:.6f}", decision])
      files.write_atomic(
        staging / "maps" / f"{name}{suffix}", _map_bytes(anomaly_map, map_format, predictor.map_max)
      )
      files.write_atomic(
        staging / "overlays" / f"{name}.png",
        _overlay(image, anomaly_map / predictor.map_max, score, decision),
      )
    summary = {
      "source": predictor.source,
      "model": predictor.model,
      "image_size": predictor.image_size,
      "input": input_spec,
      "images": len(paths),
      "scored": len(rows) - 1,
      "unreadable": len(failures) - 1,  # every file not scored: errors.csv
      "threshold": threshold,
      "threshold_rule": rule,
      "maps": f"{map_format}: "
      + ("float32" if map_format == "npy" else f"uint16, value / 65535 x {predictor.map_max:g}"),
    }
    if not summary["scored"]:
      raise errors.DataError(
        f"--input={input_spec}: none of its {len(paths)} images could be scored, e.g. "
        f"{failures[-1][0]}: {failures[-1][1]}"
      )
    files.write_atomic(staging / "scores.csv", report.csv_text(rows))
    files.write_atomic(staging / "errors.csv", report.csv_text(failures))
    files.write_json(staging / PREDICT_JSON, summary)
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if bool(f.artifact) == bool(f.workdir):
    raise errors.ConfigError("give one of --artifact=DIR (exported) or --workdir=DIR (trained)")
  predictor = from_artifact(f.artifact) if f.artifact else from_workdir(f.workdir, f.run)
  summary = predict(predictor, f.input, f.out, f.threshold, f.batch_size, f.map_format, f.overwrite)
  print(json.dumps(summary, indent=2))
  print(f"Outputs: {files.absolute(f.out)}/scores.csv, maps/, overlays/, errors.csv")


if __name__ == "__main__":
  flags.DEFINE_string("artifact", "", "An exported artifact folder.")
  flags.DEFINE_string("workdir", "", "A trained run's workdir (its newest checkpoint).")
  flags.DEFINE_string("run", "", "Which run, for a workdir that trained several (e.g. bottle).")
  flags.DEFINE_string("input", None, "An image file, a folder or a glob pattern.", required=True)
  flags.DEFINE_string("out", None, "Folder for the outputs.", required=True)
  flags.DEFINE_string(
    "threshold",
    "",
    "calibrated, oracle, validation or a number (default: calibrated if the artifact has one, "
    "else oracle).",
  )
  flags.DEFINE_integer("batch_size", 16, "Images per program call.")
  flags.DEFINE_enum("map_format", "png16", list(MAP_FORMATS), "How anomaly maps are written.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  errors.run(main)
