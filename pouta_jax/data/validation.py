"""The validation set: normal training images held out of training (`data.val_fraction`,
folder.hold_out_validation), each as it is and with one anomaly of every kind in
`data.val_defects`.

It uses no test label, so settings, checkpoints and deployment thresholds chosen on it are
fair (MVTec AD has no validation split; anomalib synthesises one with the training synthesis).
The training synthesis alone makes a poor judge: its large Perlin blobs of foreign texture are
what every model was trained to find (image AUROC saturates at 100), and it never removes
structure or makes a defect a few pixels wide, which is where the models differ on real defects
(holes, missing pieces, the tiny defects of lenses). So besides `synthetic` (DRAEM's synthesis)
three kinds the training never draws are made here: `removed` (a patch of the object or texture
gone: background colour on objects, a heavy blur on textures), `misplaced` (a patch of the same
image from elsewhere, turned: CutPaste's idea) and `spot` (a tiny darker or brighter spot).

The set is a function of the held-out files, the image size, `data.val_defects` and
`data.val_seed` alone: the synthetic anomalies come from DRAEM's default synthesis with
procedural textures, whatever synthesis settings or anomaly source the run trains with, so every
seed and sweep point of a category is scored on the same images.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import numpy as np
from scipy import ndimage

from pouta_jax.data.folder import CategoryFolder, DataError, load_image_cached
from pouta_jax.data.synthesis import (
  SynthesisConfig,
  background_colour,
  foreground_mask,
  synthesize,
)
from pouta_jax.data.textures import ProceduralTextures

# The random stream of data.val_seed that draws the validation anomalies.
ANOMALY_STREAM = 2
# Draws tried for an anomaly before giving up: a draw is redone while it changes too little.
MAX_DRAWS = 100
# Every image gets an anomaly; none is rotated (test images are not).
SYNTHESIS = SynthesisConfig(anomaly_prob=1.0, rotate_prob=0.0)
# A drawn anomaly must change its pixels on average (largest channel) by this share of the
# image's own contrast (the standard deviation of its pixels), and by at least 2 grey levels: a
# patch removed from a flat area, or moved within a uniform texture, is no defect.
VISIBLE = 0.25

Array = np.ndarray


def _ellipse(rng: np.random.Generator, foreground: Array, radius: tuple[float, float]) -> Array:
  """(H, W) bool: an ellipse with a radius in `radius` x the image size, axes ratio in
  [0.4, 1] and any angle, centred on a random pixel of `foreground` ((H, W) bool)."""
  size = foreground.shape[0]
  candidates = np.argwhere(foreground)
  cy, cx = candidates[rng.integers(len(candidates))]
  r = max(rng.uniform(*radius) * size, 1.0)
  angle = rng.uniform(0, np.pi)
  y, x = np.mgrid[:size, :size] - np.array([cy, cx])[:, None, None]
  u = x * np.cos(angle) + y * np.sin(angle)
  v = -x * np.sin(angle) + y * np.cos(angle)
  return (u / r) ** 2 + (v / (r * rng.uniform(0.4, 1.0))) ** 2 <= 1


def _synthetic(rng: np.random.Generator, image: Array) -> tuple[Array, Array]:
  size = image.shape[0]
  sample = synthesize(rng, image, ProceduralTextures().sample(rng, size), SYNTHESIS)
  return sample["augmented"], sample["mask"] > 0.5


def _removed(rng: np.random.Generator, image: Array) -> tuple[Array, Array]:
  clean = image.astype(np.float32) / 255.0
  foreground = foreground_mask(clean)
  mask = _ellipse(rng, foreground, (0.04, 0.12))
  if foreground.all():  # a texture: its structure smoothed away
    fill = ndimage.gaussian_filter(clean, sigma=(clean.shape[0] / 16, clean.shape[0] / 16, 0))
  else:  # an object: the background shows through
    fill = np.broadcast_to(background_colour(clean), clean.shape)
  return np.where(mask[..., None], fill, clean), mask


def _misplaced(rng: np.random.Generator, image: Array) -> tuple[Array, Array]:
  clean = image.astype(np.float32) / 255.0
  mask = _ellipse(rng, foreground_mask(clean), (0.04, 0.12))
  size = clean.shape[0]
  shift = rng.integers(size // 4, 3 * size // 4, size=2)
  source = np.roll(np.rot90(clean, int(rng.integers(1, 4))), tuple(shift), axis=(0, 1))
  return np.where(mask[..., None], source, clean), mask


def _spot(rng: np.random.Generator, image: Array) -> tuple[Array, Array]:
  clean = image.astype(np.float32) / 255.0
  mask = _ellipse(rng, foreground_mask(clean), (0.01, 0.03))
  shift = rng.uniform(0.25, 0.5) * rng.choice([-1.0, 1.0])
  spot = np.clip(clean[mask].mean(axis=0) + shift, 0.0, 1.0)
  return np.where(mask[..., None], spot, clean), mask


# Each kind: (rng, uint8 image) -> (float32 image in [0, 1], bool mask).
DEFECTS: dict[str, Callable[[np.random.Generator, Array], tuple[Array, Array]]] = {
  "synthetic": _synthetic,
  "removed": _removed,
  "misplaced": _misplaced,
  "spot": _spot,
}


def _anomaly(rng: np.random.Generator, image: Array, kind: str, path) -> tuple[Array, Array]:
  """A visible anomaly of `kind` on `image`, redrawn up to MAX_DRAWS times."""
  clean = image.astype(np.float32) / 255.0
  visible = max(VISIBLE * float(clean.std()), 2 / 255)
  for _ in range(MAX_DRAWS):
    augmented, mask = DEFECTS[kind](rng, image)
    if mask.any() and np.abs(augmented - clean).max(axis=-1)[mask].mean() >= visible:
      return augmented, mask
  raise DataError(f"{path}: no visible {kind!r} validation anomaly in {MAX_DRAWS} draws")


def validation_set(
  config: ml_collections.ConfigDict, folder: CategoryFolder
) -> dict[str, np.ndarray]:
  """The run's validation set in `folder.load_test_set`'s format: each held-out image as it is
  (good) and with one anomaly of each kind in `data.val_defects` (the kind as its defect type,
  its mask), as uint8 at the config's image size."""
  size, kinds = config.data.image_size, tuple(config.data.val_defects)
  images, masks, defects, paths = [], [], [], []
  for index, path in enumerate(folder.val):
    image = load_image_cached(path, size)
    images.append(image)
    masks.append(np.zeros((size, size), bool))
    for kind in kinds:
      # One stream per image and kind: the kinds listed do not change each other's draws.
      rng = np.random.default_rng(
        (config.data.val_seed, ANOMALY_STREAM, index, list(DEFECTS).index(kind))
      )
      augmented, mask = _anomaly(rng, image, kind, path)
      images.append(np.round(augmented * 255).astype(np.uint8))
      masks.append(mask)
    defects += ["good", *kinds]
    paths += [str(path)] * (1 + len(kinds))
  stems = [p.stem for p in folder.val for _ in range(1 + len(kinds))]
  return {
    "image": np.stack(images),
    "mask": np.stack(masks),
    "label": np.array([d != "good" for d in defects], np.int32),
    "defect": np.array(defects),
    "name": np.array([f"{d}/{s}" for d, s in zip(defects, stems)]),
    "path": np.array(paths),
  }


def validation_sets(
  config: ml_collections.ConfigDict, folders: list[CategoryFolder]
) -> list[dict[str, np.ndarray]] | None:
  """Each run's validation set (runs.runs_of; `folders` one per run), or None when the
  program holds nothing out (`data.val_fraction` 0)."""
  if not any(f.val for f in folders):
    return None
  return [validation_set(config, folder) for folder in folders]
