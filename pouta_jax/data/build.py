"""Builds a TFDS dataset from a local copy (nothing is downloaded), without TensorFlow.

    python -m pouta_jax.data.build --dataset=mvtec_ad --manual_dir=/data/mvtec_ad \
        [--categories=bottle,grid] [--image_size=256] [--data_dir=~/tensorflow_datasets]
    python -m pouta_jax.data.build --dataset=visa --manual_dir=/data/visa [--categories=candle]
    python -m pouta_jax.data.build --dataset=dtd --manual_dir=/data/dtd
    python -m pouta_jax.data.build --dataset=anomaly_folder --name=mine \
        --categories=part_a,part_b --manual_dir=/data/mine

mvtec_ad and visa build one config per category (`bottle`, or `bottle_256` at 256 px), or `all`
without --categories; dtd builds `dtd_textures` (use it with
`--config.data.anomaly_source=tfds:dtd_textures`); anomaly_folder builds config --name from the
given categories. The copy is checked first (layout, masks, readable 8-bit images), leftovers
of an interrupted build are removed, and a summary of counts per category and defect type
follows, checked against the official counts when the whole of MVTec AD was built. Train with
`--config.data.tfds_dataset=mvtec_ad/all --config.data.tfds_data_dir=DIR`.
"""

from __future__ import annotations

import collections
import os
import shutil

import tensorflow_datasets as tfds
from absl import flags
from etils.epath import Path

from pouta_jax import errors, files
from pouta_jax.data.tfds import AnomalyConfig, AnomalyFolder, DtdTextures, MvtecAd, Visa, reader

# MVTec AD's published totals (Bergmann et al.): training images, good and defective test images.
MVTEC_AD_COUNTS = {"train": 3629, "test_good": 467, "test_defective": 1258}


def builders(
  dataset: str, categories: list[str], image_size: int, data_dir: str, name: str = ""
) -> list[tfds.core.GeneratorBasedBuilder]:
  """The builders to prepare for a build command; ValueError for unknown names."""
  suffix = f"_{image_size}" if image_size else ""
  if dataset in ("mvtec_ad", "visa"):
    cls = {"mvtec_ad": MvtecAd, "visa": Visa}[dataset]
    if image_size not in (0, 256):
      raise errors.ConfigError(f"--image_size={image_size}: {dataset} stores 0 (original) or 256")
    known = {c.name for c in cls.BUILDER_CONFIGS}
    unknown = [c for c in categories if f"{c}{suffix}" not in known]
    if unknown:
      raise errors.ConfigError(f"--categories: {unknown} are not {dataset} categories")
    names = [f"{c}{suffix}" for c in categories] or [f"all{suffix}"]
    return [cls(config=n, data_dir=data_dir) for n in names]
  if dataset == "dtd":
    return [DtdTextures(data_dir=data_dir)]
  if dataset == "anomaly_folder":
    if not categories or not name:
      raise errors.ConfigError("--dataset=anomaly_folder needs --name and --categories")
    config = AnomalyConfig(name=name, categories=tuple(categories), image_size=image_size)
    return [AnomalyFolder(config=config, data_dir=data_dir)]
  raise errors.ConfigError(f"--dataset={dataset!r}: expected mvtec_ad, visa, dtd or anomaly_folder")


def prepare(builder: tfds.core.GeneratorBasedBuilder, manual_dir: str) -> None:
  """Builds unless already built; an interrupted earlier build's temporary folders go first."""
  config_dir = Path(builder.data_dir).parent
  for leftover in config_dir.glob("incomplete.*"):
    shutil.rmtree(leftover)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def counts(builder: tfds.core.GeneratorBasedBuilder) -> dict[str, collections.Counter]:
  """category -> Counter of "train" and "test/<defect>" over the built records."""
  path = str(builder.data_dir)
  table: dict[str, collections.Counter] = {}
  if isinstance(builder, DtdTextures):
    source = reader.open_source(path, "train")
    for i in range(len(source)):
      table.setdefault(source[i]["label"].decode(), collections.Counter())["train"] += 1
    return table
  for split in ("train", "test"):
    for category, _, defect, _, _ in reader.record_index(path, split):
      key = "train" if split == "train" else f"test/{defect}"
      table.setdefault(category, collections.Counter())[key] += 1
  return table


def summary(table: dict[str, collections.Counter], dataset: str) -> str:
  lines = [f"{'category':<14} {'train':>6} {'test':>6}  test by defect type"]
  for category, counter in sorted(table.items()):
    tests = {k[5:]: v for k, v in sorted(counter.items()) if k.startswith("test/")}
    lines.append(
      f"{category:<14} {counter['train']:>6} {sum(tests.values()):>6}  "
      + ", ".join(f"{k} {v}" for k, v in tests.items())
    )
  if dataset == "mvtec_ad" and len(table) == 15:
    totals = {
      "train": sum(c["train"] for c in table.values()),
      "test_good": sum(c["test/good"] for c in table.values()),
      "test_defective": sum(
        v
        for c in table.values()
        for k, v in c.items()
        if k.startswith("test/") and k != "test/good"
      ),
    }
    verdict = (
      "match the official counts"
      if totals == MVTEC_AD_COUNTS
      else f"DIFFER from the official counts {MVTEC_AD_COUNTS}: is the copy complete?"
    )
    lines.append(f"totals {totals} {verdict}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  data_dir = str(Path(f.data_dir).expanduser())
  existing = _folders(data_dir)
  try:
    chosen = builders(f.dataset, f.categories, f.image_size, data_dir, f.name)
    if not files.is_dir(f.manual_dir, "--manual_dir") or not any(Path(f.manual_dir).iterdir()):
      raise errors.NotFoundError(
        f"--manual_dir={f.manual_dir!r}: not a folder holding the extracted dataset"
      )
    table = {}
    for builder in chosen:
      prepare(builder, f.manual_dir)
      table.update(counts(builder))
      print(f"built {builder.info.full_name} in {builder.data_dir}")
  except BaseException:
    _remove_new_folders(data_dir, existing)  # a failed build leaves no dataset folder behind
    raise
  print(summary(table, f.dataset))


# How deep tfds lays out a dataset under its data_dir: <name>/<config>/<version>.
DATASET_DEPTH = 3


def _folders(root: str) -> set[str]:
  """The folders under `root` down to a dataset's version folders (not the data inside)."""
  found = set()
  for folder, children, _ in os.walk(root) if not files.is_remote(root) else ():
    found.add(folder)
    if os.path.relpath(folder, root).count(os.sep) + 1 >= DATASET_DEPTH:
      children.clear()
  return found


def _remove_new_folders(root: str, existing: set[str]) -> None:
  """Removes the folders under `root` (itself included) that were not in `existing`: what this
  build created (tfds makes a dataset's folders and metadata before it reads a file)."""
  new = _folders(root) - existing
  for folder in new:
    if os.path.dirname(folder) not in new:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
  flags.DEFINE_string("dataset", None, "mvtec_ad, visa, dtd or anomaly_folder.", required=True)
  flags.DEFINE_string("manual_dir", None, "The extracted local copy.", required=True)
  flags.DEFINE_list("categories", [], "Categories (mvtec_ad, visa default: all of them).")
  flags.DEFINE_integer("image_size", 0, "Stored size: 0 keeps the original resolution.")
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "Where TFDS datasets are written.")
  flags.DEFINE_string("name", "", "anomaly_folder: the config name of this dataset.")
  errors.run(main)
