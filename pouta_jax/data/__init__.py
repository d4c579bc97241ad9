"""Data: dataset folders, the embedded dataset, anomaly sources, synthesis and grain pipelines."""

from __future__ import annotations

import ml_collections

from pouta_jax.data import embedded
from pouta_jax.data.folder import (
  CategoryFolder,
  DataError,
  check_masks,
  few_shot,
  hold_out_real_anomalies,
  hold_out_validation,
  scan,
)


def category_folder(
  config: ml_collections.ConfigDict, category: str | None = None
) -> CategoryFolder:
  """A category's files (default: the configured one): without its validation images
  (data.val_fraction), then its few-shot subset of the rest, without the real anomalies held
  out for training; builds the embedded dataset first when no root is given."""
  category = category or config.data.category
  root = config.data.root
  if config.data.tfds_dataset:
    from pouta_jax.data.tfds import reader  # tensorflow-datasets only when asked for

    if not config.data.tfds_data_dir:
      raise DataError(
        f"config.data.tfds_dataset={config.data.tfds_dataset!r} needs "
        f"config.data.tfds_data_dir, the folder it was built into"
      )
    folder = reader.category_folder(config.data.tfds_data_dir, config.data.tfds_dataset, category)
    check_masks(folder, config.data.require_masks)
  elif not root:
    if category not in embedded.CATEGORIES:
      key = "data.categories" if config.data.categories else "data.category"
      raise DataError(
        f"config.{key}: {category!r} is not an embedded category (expected one "
        f"of {sorted(embedded.CATEGORIES)}); set config.data.root to use another "
        f"dataset"
      )
    seed = config.data.embedded_seed
    built = embedded.build(
      config.data.embedded_dir + (f"_seed{seed}" if seed else ""),
      embedded.BuildSpec(seed=seed),
      categories=(category,),
    )
    folder = scan(built, category)
  else:
    folder = scan(root, category, require_masks=config.data.require_masks)
  if config.data.val_fraction:
    folder = hold_out_validation(folder, config.data.val_fraction, config.data.val_seed)
  if config.data.few_shot:
    folder = few_shot(folder, config.data.few_shot, config.train.seed)
  if config.data.num_real_anomalies:
    folder = hold_out_real_anomalies(folder, config.data.num_real_anomalies, config.train.seed)
  return folder
