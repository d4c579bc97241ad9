"""Anomaly-source textures: a DTD-style folder given by path, or a procedural generator.

Both are small picklable objects with `sample(rng, size) -> uint8 (size, size, 3)`, so they travel
to grain worker processes and draw with the per-sample generator they are handed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from etils.epath import Path
from scipy import ndimage

from pouta_jax import files
from pouta_jax.data.folder import IMAGE_SUFFIXES, DataError, load_image_cached


@dataclasses.dataclass(frozen=True)
class FolderTextures:
  """Images of a DTD-like folder: `<root>/images/<class>/*.jpg` or `<root>/<class>/*.jpg`."""

  paths: tuple  # file paths, or records of a built TFDS dataset

  @classmethod
  def from_root(cls, root: str | Path) -> "FolderTextures":
    root = Path(root)
    if not files.is_dir(root, "anomaly source folder"):
      raise DataError(f"anomaly source folder {root} does not exist")
    base = root / "images" if (root / "images").is_dir() else root
    paths = sorted(str(p) for p in base.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for path in paths:  # a FIFO or a device would block the synthesis's read forever
      if why := files.not_a_file(path):
        raise DataError(f"{path}: {why}; expected texture image files in {base}")
    if not paths:
      raise DataError(
        f"{base}: no texture images in <class>/ subfolders (DTD layout "
        f"images/<class>/*.jpg expected)"
      )
    return cls(tuple(paths))

  def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
    return load_image_cached(self.paths[rng.integers(len(self.paths))], size)


def _stripes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  angle, period = rng.uniform(0, np.pi), rng.uniform(3, 24)
  t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
  return 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * t)) * rng.uniform(0.3, 1)


def _checker(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  period = rng.uniform(4, 32)
  return ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float64)


def _cells(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  """Voronoi-like cells with random tones."""
  n = int(rng.integers(8, 64))
  seeds = rng.uniform(0, yy.shape[0], size=(n, 2))
  d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
  return rng.random(n)[np.argmin(d, axis=-1)]


def _noise(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
  n = ndimage.gaussian_filter(rng.standard_normal(yy.shape), rng.uniform(0.5, 6), mode="wrap")
  return (n - n.min()) / (np.ptp(n) + 1e-8)


@dataclasses.dataclass(frozen=True)
class ProceduralTextures:
  """Random stripes, checkers, cells and noise, mixed and coloured; nothing to download."""

  def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    patterns = (_stripes, _checker, _cells, _noise)
    picks = rng.choice(len(patterns), size=2, replace=False)
    a, b = (patterns[i](rng, yy, xx) for i in picks)
    mix = rng.uniform(0.2, 0.8)
    tone = mix * a + (1 - mix) * b
    palette = rng.random((2, 3))
    rgb = palette[0] * (1 - tone[..., None]) + palette[1] * tone[..., None]
    return np.round(255 * np.clip(rgb, 0, 1)).astype(np.uint8)


TFDS_PREFIX = "tfds:"


def texture_source(
  path: str | None, tfds_data_dir: str = ""
) -> FolderTextures | ProceduralTextures:
  """A DTD-layout folder, `tfds:<dataset>` (a built `dtd_textures`, read from `tfds_data_dir`),
  or, without a path, procedural textures."""
  if not path:
    return ProceduralTextures()
  if path.startswith(TFDS_PREFIX):
    from pouta_jax.data.tfds import reader  # tensorflow-datasets only when asked for

    if not tfds_data_dir:
      raise DataError(f"config.data.anomaly_source={path!r} needs config.data.tfds_data_dir")
    return FolderTextures(reader.texture_refs(tfds_data_dir, path[len(TFDS_PREFIX) :]))
  return FolderTextures.from_root(path)
