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
import json
import math
import os
import stat
import zipfile
import zlib
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


# A manifest is a few kilobytes (config, metrics, thresholds); reading more is refused.
MAX_MANIFEST_BYTES = 16 << 20
# Batch sizes and image sizes a manifest may declare: an artifact's programs are padded to its
# batch, so a larger one would allocate without bound.
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 8192


def _is_local(path: Path) -> bool:
  return "://" not in str(path)


def _artifact_file(path: Path, name: object) -> Path:
  """`path / name` for a file name the manifest gives, only where it is a plain regular file
  directly inside the artifact folder: a name with a separator, `..`, a link leading outside,
  a FIFO or a device (a read that blocks or never ends) is refused before anything opens it."""
  if (
    not isinstance(name, str)
    or name in ("", ".", "..")
    or "/" in name
    or "\\" in name
    or "\0" in name
  ):
    raise ArtifactError(f"{path / MANIFEST}: {name!r} is not the name of a file in the artifact")
  file = path / name
  if not _is_local(path):
    if not file.is_file():
      raise ArtifactError(f"{file}: missing; the artifact is incomplete")
    return file
  folder = os.path.realpath(path)
  if os.path.dirname(os.path.realpath(file)) != folder:
    raise ArtifactError(f"{path / MANIFEST}: {name!r} leads outside the artifact folder")
  try:
    mode = os.stat(file).st_mode
  except FileNotFoundError:
    raise ArtifactError(f"{file}: missing; the artifact is incomplete") from None
  except OSError as e:
    raise ArtifactError(f"{file}: cannot be read ({e.strerror})") from None
  if not stat.S_ISREG(mode):
    raise ArtifactError(f"{file}: not a regular file; the artifact is damaged")
  return file


def _read_manifest(path: Path) -> dict:
  if not path.is_dir() or not (path / MANIFEST).exists():
    raise ArtifactError(f"{path}: not an exported artifact (no {MANIFEST})")
  manifest_path = _artifact_file(path, MANIFEST)
  with manifest_path.open("rb") as f:
    content = f.read(MAX_MANIFEST_BYTES + 1)
  if len(content) > MAX_MANIFEST_BYTES:
    raise ArtifactError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
  try:
    manifest = json.loads(content.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ArtifactError(
      f"{manifest_path}: not valid JSON ({type(e).__name__}: {e}); the file is corrupted"
    ) from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    raise ArtifactError(f"{manifest_path}: format {found!r}, this reader reads {FORMAT!r}")
  return manifest


def manifest_digest(manifest: dict) -> str:
  """The sha256 of the manifest's own content (all but this digest), as canonical JSON."""
  content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def runtime_of(manifest: dict) -> str:
  return manifest.get("runtime", "jax")  # artifacts before ONNX export were all jax


def expected_files(manifest: dict) -> list[str]:
  """The files an artifact of this manifest holds besides it: its programs (and weights)."""
  runtime = runtime_of(manifest)
  programs = [program_name(size, runtime) for size in manifest["image_sizes"]]
  return ([WEIGHTS] if runtime == "jax" else []) + programs


def _verify(path: Path, manifest: dict) -> None:
  """Checks the manifest against its own digest and every file against its sha256: exactly the
  files its programs need, each named once. A manifest without its digests is refused (it
  could be edited, or name another model's weights, unnoticed)."""
  where = path / MANIFEST
  digests = manifest.get("sha256")
  if not isinstance(manifest.get("manifest_sha256"), str) or not isinstance(digests, dict):
    raise ArtifactError(
      f"{where}: no manifest_sha256 and sha256 digests; an artifact without them cannot be "
      f"checked and is refused (export it again with python -m pouta_jax.export)"
    )
  if manifest["manifest_sha256"] != manifest_digest(manifest):
    raise ArtifactError(
      f"{where}: its content does not match its manifest_sha256; the file is "
      f"corrupted or was changed after export"
    )
  expected = expected_files(manifest)
  if sorted(digests) != sorted(expected):
    raise ArtifactError(
      f"{where}: sha256 lists {sorted(digests)}; an artifact of this manifest holds exactly "
      f"{sorted(expected)}"
    )
  for name in expected:
    file = _artifact_file(path, name)
    if sha256(file) != digests[name]:
      raise ArtifactError(
        f"{file}: its sha256 differs from the one in {MANIFEST}; the file is corrupted or "
        f"was changed after export"
      )


def _is_count(value: object, low: int, high: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_threshold(value: object) -> bool:
  return value is None or (
    isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  )


def _check_fields(path: Path, manifest: dict) -> None:
  """Every field the reader uses, by type and range, before anything else is read: a NaN
  threshold would call every image normal, a batch of -1 score nothing."""
  where = path / MANIFEST

  def require(ok: bool, key: str, expected: str) -> None:
    if not ok:
      raise ArtifactError(f"{where}: {key}={manifest.get(key)!r}; expected {expected}")

  require(isinstance(manifest.get("model"), str) and manifest["model"], "model", "a model name")
  require(runtime_of(manifest) in RUNTIMES, "runtime", f"one of {RUNTIMES}")
  sizes = manifest.get("image_sizes")
  require(
    isinstance(sizes, list)
    and bool(sizes)
    and all(_is_count(s, 1, MAX_IMAGE_SIZE) for s in sizes)
    and len(set(sizes)) == len(sizes),
    "image_sizes",
    f"a non-empty list of distinct image sizes in [1, {MAX_IMAGE_SIZE}]",
  )
  batch = manifest.get("batch_size")
  require(
    batch == "any" or _is_count(batch, 1, MAX_BATCH),
    "batch_size",
    f'"any" or a batch size in [1, {MAX_BATCH}]',
  )
  for key in ("thresholds", "validation_thresholds"):
    value = manifest.get(key)
    require(
      (value is None and key != "thresholds")
      or (isinstance(value, dict) and all(_is_threshold(value.get(k)) for k in ("image", "pixel"))),
      key,
      '{"image": ..., "pixel": ...}, each a finite number or null',
    )
  calibration = manifest.get("calibration")
  require(
    calibration is None
    or (
      isinstance(calibration, dict)
      and calibration.get("image_threshold") is not None
      and _is_threshold(calibration.get("image_threshold"))
    ),
    "calibration",
    "null or a calibration with a finite image_threshold",
  )
  config = manifest.get("config")
  require(config is None or isinstance(config, dict), "config", "the run's config (an object)")


def load(path: str | Path) -> Artifact:
  """Loads an artifact folder written by `python -m pouta_jax.export`; ArtifactError, naming
  the file, if any part is missing, corrupted, of another format, or holds a value the reader
  cannot use. Only the files the manifest's digests list are opened, each a regular file
  inside `path`; the weights are checked against the programs' inputs before they are read."""
  path = Path(path)
  manifest = _read_manifest(path)
  _check_fields(path, manifest)
  _verify(path, manifest)
  runtime = runtime_of(manifest)
  load_program = _jax_program if runtime == "jax" else _onnx_program
  loaded = {
    size: load_program(path / program_name(size, runtime), size) for size in manifest["image_sizes"]
  }
  programs = {size: program for size, (program, _) in loaded.items()}
  if runtime == "onnx":
    return Artifact(path, manifest, {}, programs)  # the weights are inside the ONNX models
  shapes = {size: spec for size, (_, spec) in loaded.items()}
  first = next(iter(shapes.values()))
  if any(spec != first for spec in shapes.values()):
    raise ArtifactError(f"{path}: its programs take variables of different shapes")
  variables = unflatten(read_weights(path / WEIGHTS, first))
  return Artifact(path, manifest, variables, programs)


def read_weights(file: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> dict:
  """The arrays of an .npz holding exactly the `expected` keys (key -> (shape, dtype)): every
  member's header is checked before its data is read, so memory stays bounded by `expected`
  (a member that declares another shape, or decompresses past its size, is refused)."""
  try:
    with file.open("rb") as f, zipfile.ZipFile(f) as archive:
      members = {info.filename: info for info in archive.infolist()}
      found = {name[: -len(".npy")] for name in members if name.endswith(".npy")}
      problems = [f"missing {k}" for k in sorted(set(expected) - found)]
      problems += [f"extra {k}" for k in sorted(set(members) - {k + ".npy" for k in expected})]
      if problems:
        raise ArtifactError(
          f"{file}: not the variables its programs take ({len(problems)} problems: "
          f"{'; '.join(problems[:10])})"
        )
      arrays = {}
      for key, (shape, dtype) in expected.items():
        with archive.open(members[key + ".npy"]) as member:
          version = np.lib.format.read_magic(member)
          if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{key}: .npy format version {version}")
          read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
          )
          found_shape, fortran, found_dtype = read_header(member)
          if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran:
            raise ArtifactError(
              f"{file}: {key} is {found_dtype} {tuple(found_shape)}; its programs take "
              f"{np.dtype(dtype)} {tuple(shape)}"
            )
          data = member.read(found_dtype.itemsize * math.prod(shape))
          if len(data) != found_dtype.itemsize * math.prod(shape):
            raise ValueError(f"{key}: its data ends early")
          arrays[key] = np.frombuffer(data, found_dtype).reshape(shape).copy()
      return arrays
  except ArtifactError:
    raise
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ArtifactError(f"{file}: not a readable .npz ({type(e).__name__}: {e})") from None


# A loaded program, and the variables it takes (key -> (shape, dtype); {} when it holds them).
Program = tuple[Callable, dict[str, tuple[tuple[int, ...], str]]]


def _jax_program(program: Path, size: int) -> Program:
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
  try:
    (variables, images), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    if tuple(images.shape[1:]) != (size, size, 3):
      raise ValueError(f"it takes images {images.shape}")
    spec = {}
    for keys, aval in jax.tree_util.tree_flatten_with_path(variables)[0]:
      shape = tuple(int(d) for d in aval.shape)
      spec["/".join(str(k.key) for k in keys)] = (shape, aval.dtype.name)
  except Exception as e:  # a program of another signature
    raise ArtifactError(
      f"{program}: not a program of (variables, images ({size}, {size}, 3)) "
      f"({type(e).__name__}: {e})"
    ) from None
  return jax.jit(exported.call), spec


def _onnx_program(program: Path, size: int) -> Program:
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

  del size  # the model's input shape is checked by ONNX Runtime at each call
  return run, {}
