"""Data: dataset folders, the embedded dataset, anomaly sources, synthesis and grain pipelines."""

from __future__ import annotations

import ml_collections

from pouta_jax.data import embedded
from pouta_jax.data.folder import CategoryFolder, DataError, few_shot, scan


def category_folder(config: ml_collections.ConfigDict,
                    category: str | None = None) -> CategoryFolder:
  """A category's files (default: the configured one; or its few-shot subset); builds the
  embedded dataset first when no root is given."""
  category = category or config.data.category
  root = config.data.root
  if not root:
    if category not in embedded.CATEGORIES:
      key = "data.categories" if config.data.categories else "data.category"
      raise DataError(f"config.{key}: {category!r} is not an embedded category (expected one "
                      f"of {sorted(embedded.CATEGORIES)}); set config.data.root to use another "
                      f"dataset")
    root = embedded.build(config.data.embedded_dir, categories=(category,))
  folder = scan(root, category)
  if config.data.few_shot:
    folder = few_shot(folder, config.data.few_shot, config.train.seed)
  return folder
