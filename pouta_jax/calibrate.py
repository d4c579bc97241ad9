"""Sets an artifact's image threshold at a target false-positive rate on known-good images.

    python -m pouta_jax.calibrate --artifact=exported/bottle --good='line3/good/*.png' --fpr=0.01

`--good` is an image file, a folder (searched recursively) or a glob pattern, read as `predict`
reads its input. The threshold is set just above the score of the good image ranked
floor(fpr * N) + 1 from the top, so that at most that fraction of these N images (their
observed rate) scores at or above it; with N images no rate below 1/N can be resolved, and the
command says so. The result goes into the artifact's manifest (`calibration`, its digest
updated, the file replaced atomically), where `predict --threshold=calibrated` and predict's
default find it. Calibrating again replaces it. Every file `--good` names must be a readable
image (a text file, a FIFO or a folder that cannot be listed is an error, naming it): a
threshold set on a silently smaller set would claim a rate it was not measured on.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags
from etils.epath import Path

from pouta_jax import artifact as artifact_lib, errors, files, predict


def threshold_at_fpr(scores: np.ndarray, fpr: float) -> tuple[float, float]:
  """The image threshold (compared as score >= threshold) that flags at most a fraction `fpr`
  of these good images' `scores`, just above the highest score it lets pass; and the fraction
  it flags. Exact on float32 scores: scoring these images again reproduces the fraction."""
  if not 0 <= fpr < 1:
    raise errors.ConfigError(f"--fpr={fpr}: expected a false-positive rate in [0, 1)")
  ranked = np.sort(np.asarray(scores, np.float32))[::-1]
  allowed = int(np.floor(fpr * len(ranked) + 1e-9))  # false positives allowed among them
  threshold = np.nextafter(ranked[allowed], np.float32(np.inf))
  return float(threshold), float(np.mean(ranked >= threshold))


def good_scores(
  predictor: predict.Predictor, good: str, batch_size: int
) -> tuple[list, np.ndarray]:
  """The paths `good` names and their image scores; DataError naming the first unreadable one."""
  paths, _ = predict.input_files(good)
  scores = [s for *_, s in predict.scored(predictor, paths, batch_size, desc="calibrate")]
  return paths, np.asarray(scores, np.float32)


def calibrate(path: str | Path, good: str, fpr: float, batch_size: int = 16) -> dict:
  """Scores the good images with the artifact at `path`, stores the threshold in its manifest
  and returns the stored `calibration` entry."""
  path = Path(path)
  threshold_at_fpr(np.zeros(1), fpr)  # the rate checked before any image is read
  if not 0 < batch_size <= artifact_lib.MAX_BATCH:
    raise errors.ConfigError(
      f"--batch_size={batch_size}: expected a batch size in [1, {artifact_lib.MAX_BATCH}]"
    )
  predictor = predict.from_artifact(path)
  paths, scores = good_scores(predictor, good, batch_size)
  threshold, observed = threshold_at_fpr(scores, fpr)
  calibration = {
    "image_threshold": threshold,
    "target_fpr": fpr,
    "observed_fpr": observed,
    "num_good": len(paths),
    "good": good,
    "good_scores": {
      "min": float(scores.min()),
      "median": float(np.median(scores)),
      "max": float(scores.max()),
    },
  }
  manifest = json.loads((path / artifact_lib.MANIFEST).read_text())
  manifest["calibration"] = calibration
  manifest["manifest_sha256"] = artifact_lib.manifest_digest(manifest)
  try:
    files.write_json(path / artifact_lib.MANIFEST, manifest)
  except OSError as e:
    if isinstance(e, errors.Error):  # a full disk, said as such
      raise
    raise errors.WorkdirError(
      f"{path}: cannot write its {artifact_lib.MANIFEST} ({e.strerror}); the artifact is "
      f"unchanged. Calibrate a copy you may write (cp -r)"
    ) from None
  return calibration


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  calibration = calibrate(f.artifact, f.good, f.fpr, f.batch_size)
  print(json.dumps(calibration, indent=2))
  if f.fpr and f.fpr * calibration["num_good"] < 1:
    print(
      f"Note: {calibration['num_good']} good images resolve false-positive rates down to "
      f"1/{calibration['num_good']} only; the threshold lies above every one of them."
    )
  print(f"Stored in {files.absolute(f.artifact) / artifact_lib.MANIFEST} (calibration)")


if __name__ == "__main__":
  flags.DEFINE_string("artifact", None, "An exported artifact folder.", required=True)
  flags.DEFINE_string("good", None, "Known-good images: a file, a folder or a glob.", required=True)
  flags.DEFINE_float("fpr", None, "Target false-positive rate on good images.", required=True)
  flags.DEFINE_integer("batch_size", 16, "Images per program call.")
  errors.run(main)
