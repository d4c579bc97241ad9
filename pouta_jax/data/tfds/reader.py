"""Reads a dataset built by these builders as a `CategoryFolder` whose files are records.

A `RecordRef` stands where a file path stands elsewhere (training list, test samples); the
folder reader's loaders open either, so the grain pipelines yield identical samples for a folder
and for its TFDS copy. Each process (grain workers included) opens the array_record files once.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import PurePosixPath

import tensorflow_datasets as tfds
from etils.epath import Path

from pouta_jax.data.folder import CategoryFolder, DataError, TestSample


@dataclasses.dataclass(frozen=True)
class RecordRef:
  """One image or mask of a built dataset: `field` of record `index` of `split`."""

  dataset_dir: str  # <data_dir>/<name>/<config>/<version>
  split: str
  index: int
  field: str
  name: str  # <category>/<path under the category folder>

  @property
  def stem(self) -> str:
    return PurePosixPath(self.name).stem

  def read_bytes(self) -> bytes:
    return open_source(self.dataset_dir, self.split)[self.index][self.field]

  def __str__(self) -> str:
    return f"{self.dataset_dir}:{self.split}/{self.name}"


def dataset_dir(data_dir: str | Path, dataset: str) -> Path:
  """The newest prepared version of `dataset` ("<name>/<config>") under `data_dir`."""
  parent = Path(data_dir) / dataset
  versions = sorted(
    (p for p in parent.glob("*.*.*") if (p / "dataset_info.json").is_file()),
    key=lambda p: tuple(int(x) for x in p.name.split(".")),
  )
  if not versions:
    raise DataError(
      f"no prepared TFDS dataset {dataset!r} under {data_dir} (expected "
      f"{parent}/<version>/dataset_info.json); build it with python -m "
      f"pouta_jax.data.build"
    )
  return versions[-1]


@functools.lru_cache(maxsize=16)
def open_source(path: str, split: str):
  return tfds.builder_from_directory(path).as_data_source(split=split)


@functools.lru_cache(maxsize=16)
def record_index(path: str, split: str) -> tuple[tuple[str, str, str, int, bool], ...]:
  """(category, name, defect, index, has mask) of every record, sorted by name."""
  source = open_source(path, split)
  rows = []
  for index in range(len(source)):
    record = source[index]
    rows.append(
      (
        record["category"].decode(),
        record["name"].decode(),
        record["defect"].decode(),
        index,
        bool(record["mask"]),
      )
    )
  return tuple(sorted(rows, key=lambda r: r[1]))


def category_folder(data_dir: str | Path, dataset: str, category: str) -> CategoryFolder:
  """`category` of a built dataset, in the file order of the folder it was built from."""
  path = str(dataset_dir(data_dir, dataset))
  train = [r for r in record_index(path, "train") if r[0] == category]
  if not train:
    found = sorted({r[0] for r in record_index(path, "train")})
    raise DataError(f"no category {category!r} in {path} (categories: {', '.join(found)})")
  test = [r for r in record_index(path, "test") if r[0] == category]
  return CategoryFolder(
    root=Path(path),
    category=category,
    train=tuple(RecordRef(path, "train", i, "image", name) for _, name, _, i, _ in train),
    test=tuple(
      TestSample(
        RecordRef(path, "test", i, "image", name),
        RecordRef(path, "test", i, "mask", name) if has_mask else None,
        defect,
      )
      for _, name, defect, i, has_mask in test
    ),
  )


def texture_refs(data_dir: str | Path, dataset: str) -> tuple[RecordRef, ...]:
  """Every image of a built texture dataset (dtd_textures), in the order of its folder."""
  path = str(dataset_dir(data_dir, dataset))
  source = open_source(path, "train")
  names = sorted((source[i]["name"].decode(), i) for i in range(len(source)))
  return tuple(RecordRef(path, "train", i, "image", name) for name, i in names)
