"""Data: dataset folders, the embedded dataset, anomaly sources, synthesis and grain pipelines."""

from __future__ import annotations

import ml_collections

from pouta_jax.data import embedded
from pouta_jax.data.folder import CategoryFolder, DataError, few_shot, scan


def category_folder(config: ml_collections.ConfigDict) -> CategoryFolder:
  """The configured category's files (or its few-shot subset); builds the embedded dataset first
  when no root is given."""
  root = config.data.root
  if not root:
    if config.data.category not in embedded.CATEGORIES:
      raise DataError(f"config.data.category={config.data.category!r} is not an embedded "
                      f"category (expected one of {sorted(embedded.CATEGORIES)}); set "
                      f"config.data.root to use another dataset")
    root = embedded.build(config.data.embedded_dir, categories=(config.data.category,))
  folder = scan(root, config.data.category)
  if config.data.few_shot:
    folder = few_shot(folder, config.data.few_shot, config.train.seed)
  return folder
