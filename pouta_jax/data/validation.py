"""The validation set: normal training images held out of training (`data.val_fraction`,
folder.hold_out_validation) and the same images with an anomaly made by the training synthesis.

It uses no test label, so settings, checkpoints and deployment thresholds chosen on it are
fair (MVTec AD has no validation split; anomalib synthesises one the same way). It is a function
of the held-out files, the image size and `data.val_seed` alone: the anomalies come from DRAEM's
default synthesis with procedural textures, whatever synthesis settings or anomaly source the
run trains with, so every seed and sweep point of a category is scored on the same images.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from pouta_jax.data.folder import CategoryFolder, DataError, load_image_cached
from pouta_jax.data.synthesis import SynthesisConfig, synthesize
from pouta_jax.data.textures import ProceduralTextures

# The defect type of the synthesised validation anomalies (test sets name real ones).
SYNTHETIC = "synthetic"
# The random stream of data.val_seed that draws the validation anomalies.
ANOMALY_STREAM = 2
# Draws tried for an anomaly before giving up: a Perlin mask is rarely empty.
MAX_DRAWS = 100
# Every image gets an anomaly; none is rotated (test images are not).
SYNTHESIS = SynthesisConfig(anomaly_prob=1.0, rotate_prob=0.0)


def validation_set(
  config: ml_collections.ConfigDict, folder: CategoryFolder
) -> dict[str, np.ndarray]:
  """The run's validation set in `folder.load_test_set`'s format: each held-out image as it is
  (good) and with one synthesised anomaly (`SYNTHETIC`, its mask), as uint8 at the config's
  image size."""
  size = config.data.image_size
  textures = ProceduralTextures()
  good, defective, masks = [], [], []
  for index, path in enumerate(folder.val):
    image = load_image_cached(path, size)
    rng = np.random.default_rng((config.data.val_seed, ANOMALY_STREAM, index))
    for _ in range(MAX_DRAWS):
      sample = synthesize(rng, image, textures.sample(rng, size), SYNTHESIS)
      if sample["mask"].any():
        break
    else:
      raise DataError(f"{path}: no validation anomaly in {MAX_DRAWS} draws of the synthesis")
    good.append(image)
    defective.append(np.round(sample["augmented"] * 255).astype(np.uint8))
    masks.append(sample["mask"] > 0.5)
  count = len(folder.val)
  names = [f"{kind}/{p.stem}" for kind in ("good", SYNTHETIC) for p in folder.val]
  return {
    "image": np.stack(good + defective),
    "mask": np.concatenate([np.zeros((count, size, size), bool), np.stack(masks)]),
    "label": np.repeat(np.array([0, 1], np.int32), count),
    "defect": np.array(["good"] * count + [SYNTHETIC] * count),
    "name": np.array(names),
    "path": np.array([str(p) for p in folder.val] * 2),
  }


def validation_sets(
  config: ml_collections.ConfigDict, folders: list[CategoryFolder]
) -> list[dict[str, np.ndarray]] | None:
  """Each run's validation set (runs.runs_of; `folders` one per run), or None when the
  program holds nothing out (`data.val_fraction` 0)."""
  if not any(f.val for f in folders):
    return None
  return [validation_set(config, folder) for folder in folders]
