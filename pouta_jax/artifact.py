"""Reads an exported model with jax and numpy alone (Pillow only to resize other sizes).

This file imports nothing else from pouta_jax and nothing of flax or the model code: a
downstream user can copy it next to their evaluation code. An artifact is a folder:

    artifact.json              what the programs expect and return, thresholds, config, metrics
    weights.npz                the variables, keys joined by "/" ("params/encoder/...")
    predict_<size>px.jaxexport serialized jax.export programs, one per image size:
                               (variables, float32 images (B, S, S, 3) in [0, 1])
                               -> (anomaly maps (B, S, S), image scores (B,))

    art = artifact.load("exported/bottle")
    maps, scores = art.predict(art.preprocess(uint8_images))
    anomalous = scores >= art.thresholds["image"]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

FORMAT = "pouta_jax.artifact/1"
MANIFEST = "artifact.json"
WEIGHTS = "weights.npz"


def program_name(image_size: int) -> str:
  return f"predict_{image_size}px.jaxexport"


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
    """Suggested image-score and pixel thresholds (F1-max on the training run's test set)."""
    return self.manifest["thresholds"]

  def preprocess(self, images: np.ndarray, image_size: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W[, C]) -> float32 (N, S, S, 3) in [0, 1], as in training:
    grayscale repeated over 3 channels, alpha dropped, Pillow's bilinear resize to S."""
    size = image_size or self.image_sizes[0]
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8:
      raise ValueError(f"expected uint8 images (N, H, W[, 1|3|4]), got {images.dtype} "
                       f"{images.shape}")
    images = images[..., :3] if images.shape[-1] >= 3 else np.repeat(images, 3, axis=-1)
    if images.shape[1:3] != (size, size):
      from PIL import Image  # only needed when the images are not at the program's size
      images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                         for im in images])
    return images.astype(np.float32) / 255.0

  def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly maps (B, S, S) and image scores (B,) of preprocessed images (B, S, S, 3)."""
    size = images.shape[1]
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or size not in self.programs:
      raise ValueError(f"{self.path}: expected float32 images (B, S, S, 3) with S in "
                       f"{self.image_sizes}, got {images.shape}; see Artifact.preprocess")
    batch = self.manifest["batch_size"]
    if batch != "any" and len(images) != batch:
      raise ValueError(f"{self.path}: exported for batches of {batch} images, got "
                       f"{len(images)}; export again with --batch_size=0 for any batch size")
    maps, scores = self.programs[size](self.variables, np.asarray(images, np.float32))
    return np.asarray(maps), np.asarray(scores)


def load(path: str | Path) -> Artifact:
  """Loads an artifact folder written by `python -m pouta_jax.export`."""
  path = Path(path)
  manifest_path = path / MANIFEST
  if not manifest_path.is_file():
    raise FileNotFoundError(f"{path}: not an exported artifact (no {MANIFEST})")
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, this reader reads "
                     f"{FORMAT!r}")
  with np.load(path / WEIGHTS) as weights:
    variables = unflatten(dict(weights))
  programs = {}
  for size in manifest["image_sizes"]:
    exported = jax.export.deserialize(bytearray((path / program_name(size)).read_bytes()))
    programs[int(size)] = jax.jit(exported.call)
  return Artifact(path, manifest, variables, programs)
