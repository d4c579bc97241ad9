"""Reads an exported model with jax (or ONNX Runtime) and numpy alone (Pillow only to resize
other sizes, etils for gs:// paths).

This file imports nothing else from pouta_jax and nothing of flax or the model code: a
downstream user can copy it next to their evaluation code. An artifact is a folder:

    artifact.json              what the programs expect and return, thresholds (oracle,
                               from the validation set where the run kept one, and
                               calibrated on good images once calibrated), config,
                               metrics, and the sha256 of itself and of every other file
                               (checked at load)
    weights.npz                the variables, keys joined by "/" ("params/encoder/...")
    predict_<size>px.jaxexport serialized jax.export programs, one per image size:
                               (variables, float32 images (B, S, S, 3) in [0, 1])
                               -> (anomaly maps (B, S, S), image scores (B,))
    predict_<size>px.onnx      instead of the two above, in an artifact exported with
                               --format=onnx (manifest "runtime": "onnx"): ONNX models,
                               the weights inside, float32 images (B, S, S, 3) -> the same

    art = artifact.load("exported/bottle")
    maps, scores = art.predict(art.preprocess(uint8_images))
    anomalous = scores >= art.calibration["image_threshold"]  # or validation_thresholds["image"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import zipfile
from typing import Any, Callable

import numpy as np
from etils.epath import Path

FORMAT = "pouta_jax.artifact/1"
MANIFEST = "artifact.json"
WEIGHTS = "weights.npz"


class ArtifactError(ValueError):
  """An artifact that is incomplete, corrupted or of another format; names the file."""


RUNTIMES = ("jax", "onnx")


def program_name(image_size: int, runtime: str = "jax") -> str:
  return f"predict_{image_size}px.{'jaxexport' if runtime == 'jax' else 'onnx'}"


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts of arrays as one level of "/"-joined keys (the weights.npz layout)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


@dataclasses.dataclass(frozen=True)
class Artifact:
  path: Path
  manifest: dict[str, Any]
  variables: dict
  programs: dict[int, Callable]  # image size -> jit-compiled exported program

  @property
  def image_sizes(self) -> tuple[int, ...]:
    return tuple(sorted(self.programs))

  @property
  def thresholds(self) -> dict[str, float | None]:
    """Image-score and pixel thresholds of F1-max on the training run's test set: oracle values,
    chosen on the test labels (see `calibration` for one set on good images)."""
    return self.manifest["thresholds"]

  @property
  def validation_thresholds(self) -> dict[str, float | None] | None:
    """Image-score and pixel thresholds of F1-max on the training run's validation set (no test
    label used: deployment thresholds); None when the run held no validation set out."""
    return self.manifest.get("validation_thresholds")

  @property
  def calibration(self) -> dict[str, Any] | None:
    """The image threshold at a false-positive rate on good images (`image_threshold`,
    `target_fpr`, `observed_fpr`, `num_good`, ...), set by `python -m pouta_jax.calibrate`."""
    return self.manifest.get("calibration")

  def preprocess(self, images: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W[, C]) -> float32 (N, S, S, 3) in [0, 1], as in training:
    grayscale repeated over 3 channels, alpha dropped, Pillow's bilinear resize to S."""
    size = image_size or self.image_sizes[0]
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
      raise ValueError(
        f"expected uint8 images (N, H, W[, 1|3|4]), got {images.dtype} {images.shape}"
      )
    images = images[..., :3] if images.shape[-1] >= 3 else np.repeat(images, 3, axis=-1)
    if images.shape[1:3] != (size, size):
      from PIL import Image  # only needed when the images are not at the program's size

      images = np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images]
      )
    return images.astype(np.float32) / 255.0

  def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (B, S, S) and image scores (B,) of preprocessed images (B, S, S, 3)."""
    size = images.shape[1]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or size not in self.programs:
      raise ValueError(
        f"{self.path}: expected float32 images (B, S, S, 3) with S in "
        f"{self.image_sizes}, got {images.shape}; see Artifact.preprocess"
      )
    batch = self.manifest["batch_size"]
    if batch != "any" and len(images) != batch:
      raise ValueError(
        f"{self.path}: exported for batches of {batch} images, got "
        f"{len(images)}; export again with --batch_size=0 for any batch size"
      )
    maps, scores = self.programs[size](self.variables, np.asarray(images, np.float32))
    return np.asarray(maps), np.asarray(scores)


def sha256(path: str | Path) -> str:
  digest = hashlib.sha256()
  with Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _read_manifest(path: Path) -> dict:
  manifest_path = path / MANIFEST
  if not manifest_path.is_file():
    raise ArtifactError(f"{path}: not an exported artifact (no {MANIFEST})")
  try:
    manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ArtifactError(f"{manifest_path}: not valid JSON ({e}); the file is corrupted") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    raise ArtifactError(f"{manifest_path}: format {found!r}, this reader reads {FORMAT!r}")
  return manifest


def manifest_digest(manifest: dict) -> str:
  """The sha256 of the manifest's own content (all but this digest), as canonical JSON."""
  content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _verify(path: Path, manifest: dict) -> None:
  """Checks the manifest and every file against their sha256 (artifacts written before the
  manifest held them are read unchecked)."""
  if "manifest_sha256" in manifest and manifest["manifest_sha256"] != manifest_digest(manifest):
    raise ArtifactError(
      f"{path / MANIFEST}: its content does not match its manifest_sha256; the file is "
      f"corrupted or was changed after export"
    )
  for name, expected in manifest.get("sha256", {}).items():
    file = path / name
    if not file.is_file():
      raise ArtifactError(f"{file}: missing; the artifact is incomplete")
    if sha256(file) != expected:
      raise ArtifactError(
        f"{file}: its sha256 differs from the one in {MANIFEST}; the file is corrupted or "
        f"was changed after export"
      )


def load(path: str | Path) -> Artifact:
  """Loads an artifact folder written by `python -m pouta_jax.export`; ArtifactError, naming
  the file, if any part is missing, corrupted or of another format."""
  path = Path(path)
  manifest = _read_manifest(path)
  _verify(path, manifest)
  runtime = manifest.get("runtime", "jax")
  if runtime not in RUNTIMES:
    raise ArtifactError(f"{path / MANIFEST}: runtime {runtime!r}, this reader runs {RUNTIMES}")
  load_program = _jax_program if runtime == "jax" else _onnx_program
  programs = {
    int(size): load_program(path / program_name(size, runtime)) for size in manifest["image_sizes"]
  }
  if runtime == "onnx":
    return Artifact(path, manifest, {}, programs)  # the weights are inside the ONNX models
  try:
    with np.load(io.BytesIO((path / WEIGHTS).read_bytes()), allow_pickle=False) as weights:
      variables = unflatten(dict(weights))
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ArtifactError(f"{path / WEIGHTS}: not a readable .npz ({e})") from None
  return Artifact(path, manifest, variables, programs)


def _jax_program(program: Path) -> Callable:
  try:
    import jax  # only for this runtime
  except ImportError as e:
    raise ArtifactError(
      f"{program}: running a JAX artifact needs jax (pip install jax); an artifact exported "
      "with --format=onnx runs without it"
    ) from e
  try:
    exported = jax.export.deserialize(bytearray(program.read_bytes()))
  except Exception as e:  # flatbuffers raises whatever the bytes lead it to
    raise ArtifactError(
      f"{program}: not a serialized jax.export program ({type(e).__name__}: {e})"
    ) from None
  return jax.jit(exported.call)


def _onnx_program(program: Path) -> Callable:
  """An ONNX model as (variables, images) -> (maps, scores), run by ONNX Runtime on the CPU."""
  try:
    import onnxruntime
  except ImportError as e:
    raise ArtifactError(
      f"{program}: running an ONNX artifact needs onnxruntime: pip install onnxruntime"
    ) from e
  try:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not the converter's shape-merging notes
    session = onnxruntime.InferenceSession(
      program.read_bytes(), options, providers=["CPUExecutionProvider"]
    )
  except Exception as e:  # onnxruntime raises its own types for a broken model
    raise ArtifactError(f"{program}: not a readable ONNX model ({type(e).__name__}: {e})") from None
  name = session.get_inputs()[0].name

  def run(variables: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    del variables  # inside the model
    maps, scores = session.run(None, {name: np.asarray(images, np.float32)})
    return maps, scores

  return run
