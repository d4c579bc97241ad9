"""TFDS builders: `mvtec_ad` (one config per category, plus `all`, each at the original
resolution and at 256 px), `anomaly_folder` (any MVTec-AD-layout folder), `visa` (its 12
categories, split by its CSV) and `dtd_textures` (DTD, the anomaly-source textures).

All are manual-download builders: the user's extracted copy is the manual dir, checked (layout,
masks, readable 8-bit images) before anything is written. Records hold the encoded image and
mask bytes, so no TensorFlow is needed to build or read them.
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from etils.epath import Path
from PIL import Image

from pouta_jax.config import MVTEC_AD_CATEGORIES
from pouta_jax.data import folder as folder_lib

THIRD_PARTY = Path(__file__).resolve().parents[3] / "third_party"
STORED_SIZES = (0, 256)  # 0: the original resolution


@dataclasses.dataclass(eq=False)
class AnomalyConfig(tfds.core.BuilderConfig):
  """Which categories a dataset holds and the size its images are stored at (0: original)."""

  categories: tuple[str, ...] = ()
  image_size: int = 0


def _configs(categories: tuple[str, ...]) -> list[AnomalyConfig]:
  configs = []
  for size in STORED_SIZES:
    suffix = f"_{size}" if size else ""
    configs += [
      AnomalyConfig(
        name=f"{c}{suffix}",
        categories=(c,),
        image_size=size,
        description=f"{c}, {'original size' if not size else f'{size} px'}",
      )
      for c in categories
    ]
    configs.append(
      AnomalyConfig(
        name=f"all{suffix}", categories=categories, image_size=size, description="every category"
      )
    )
  return configs


def _png(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _stored_image(path: Path, size: int) -> bytes:
  if not size:
    return path.read_bytes()
  with Image.open(path) as image:
    image.load()
    mode = "L" if image.mode == "L" else "RGB"
    return _png(image.convert(mode).resize((size, size), Image.BILINEAR))


def _stored_mask(path: Path, image_path: Path, size: int, nonzero_is_defect: bool = False) -> bytes:
  """A mask as stored: the file's own bytes at the original size, else a 0/255 PNG at `size`
  (0: the image's size) binarised as the folder reader does. `nonzero_is_defect`: any nonzero
  pixel is defective (VisA's masks are not 0/255)."""
  if not size and not nonzero_is_defect:
    return path.read_bytes()
  with Image.open(path) as mask, Image.open(image_path) as header:
    folder_lib.check_mask_size(path, mask.size, header.size)
    mask = mask.convert("L")
  if nonzero_is_defect:
    mask = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
  if size:
    mask = Image.fromarray(folder_lib.resize_mask(mask, size).astype(np.uint8) * 255)
  return _png(mask)


class _ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared by every builder here: array_record files, version, the licence print."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  LICENCE_FILE = ""  # printed when a dataset is first built

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    # array_record: written and read without TensorFlow (TFRecord needs it).
    super().__init__(file_format=file_format, **kwargs)

  def _print_licence(self) -> None:
    if self.LICENCE_FILE:
      print((THIRD_PARTY / self.LICENCE_FILE).read_text())


class _AnomalyBuilder(_ArrayRecordBuilder):
  """Shared by the anomaly datasets: their features."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
          "mask": tfds.features.Tensor(shape=(), dtype=np.object_),  # b"" for good images
          "label": tfds.features.Tensor(shape=(), dtype=np.int64),  # 1: defective
          "defect": tfds.features.Text(),
          "category": tfds.features.Text(),
          "name": tfds.features.Text(),  # <category>/<path under the category folder>
        }
      ),
      supervised_keys=None,
    )


class _MVTecLayout(_AnomalyBuilder):
  """Splits and examples of an MVTec-AD-layout folder."""

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    folders = [folder_lib.scan(root, c) for c in self.builder_config.categories]
    self._print_licence()
    return {
      "train": self._generate_examples(folders, "train"),
      "test": self._generate_examples(folders, "test"),
    }

  def _generate_examples(self, folders: list[folder_lib.CategoryFolder], split: str):
    size = self.builder_config.image_size
    for folder in folders:
      category_dir = folder.root / folder.category
      samples = (
        [folder_lib.TestSample(p, None, "good") for p in folder.train]
        if split == "train"
        else folder.test
      )
      for sample in samples:
        name = f"{folder.category}/{sample.image.relative_to(category_dir).as_posix()}"
        yield (
          name,
          {
            "image": _stored_image(sample.image, size),
            "mask": b"" if sample.mask is None else _stored_mask(sample.mask, sample.image, size),
            "label": sample.label,
            "defect": sample.defect,
            "category": folder.category,
            "name": name,
          },
        )


class MvtecAd(_MVTecLayout):
  """MVTec AD (Bergmann et al.): 15 categories of industrial images with pixel masks."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad (CC BY-NC-SA"
    " 4.0), extract it and pass the folder holding bottle/, cable/, ... as the manual dir."
  )
  BUILDER_CONFIGS = _configs(MVTEC_AD_CATEGORIES)
  LICENCE_FILE = "MVTEC_AD.md"


class AnomalyFolder(_MVTecLayout):
  """Any MVTec-AD-layout folder; name its categories in the config:
  `AnomalyFolder(config=AnomalyConfig(name="mine", categories=("part",)), data_dir=...)`."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder holding <category>/train/good as the manual dir."
  BUILDER_CONFIGS = [AnomalyConfig(name="default", description="set categories yourself")]


VISA_CATEGORIES = (
  "candle",
  "capsules",
  "cashew",
  "chewinggum",
  "fryum",
  "macaroni1",
  "macaroni2",
  "pcb1",
  "pcb2",
  "pcb3",
  "pcb4",
  "pipe_fryum",
)
VISA_SPLIT_CSV = "split_csv/1cls.csv"


@dataclasses.dataclass(frozen=True)
class _VisaRow:
  category: str
  split: str
  image: Path
  mask: Path | None
  name: str


def _visa_rows(root: Path, categories: tuple[str, ...]) -> list[_VisaRow]:
  """The split CSV's rows of `categories`, every file checked; DataError names the row."""
  table = root / VISA_SPLIT_CSV
  if not table.is_file():
    raise folder_lib.DataError(
      f"{root}: no {VISA_SPLIT_CSV} (VisA's split file; the manual dir "
      f"is the folder holding it and candle/, capsules/, ...)"
    )
  rows = []
  with io.StringIO(table.read_text(), newline="") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      if row["object"] not in categories:
        continue
      where = f"{table}:{line}"
      if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
        raise folder_lib.DataError(
          f"{where}: split {row['split']!r} / label {row['label']!r}; "
          f"expected train|test and normal|anomaly"
        )
      image = root / row["image"]
      mask = root / row["mask"] if row.get("mask") else None
      if row["label"] == "anomaly" and mask is None:
        raise folder_lib.DataError(f"{where}: anomalous image {image} without a mask")
      for path in (image, mask):
        if path is not None and not path.is_file():
          raise folder_lib.DataError(f"{where}: {path} does not exist")
        if path is not None:
          folder_lib.check_readable(path)
      rows.append(_VisaRow(row["object"], row["split"], image, mask, row["image"]))
  missing = sorted(set(categories) - {r.category for r in rows})
  if missing:
    raise folder_lib.DataError(f"{table}: no rows for {missing}")
  return rows


class Visa(_AnomalyBuilder):
  """VisA (Zou et al., ECCV 2022): 12 categories, split by its `split_csv/1cls.csv`."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download VisA (CC BY 4.0) from https://github.com/amazon-science/spot-diff, extract it "
    "and pass the folder holding split_csv/ and candle/, capsules/, ... as the manual dir."
  )
  BUILDER_CONFIGS = _configs(VISA_CATEGORIES)
  LICENCE_FILE = "VISA.md"

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    rows = _visa_rows(Path(dl_manager.manual_dir), self.builder_config.categories)
    self._print_licence()
    return {
      split: self._generate_examples([r for r in rows if r.split == split])
      for split in ("train", "test")
    }

  def _generate_examples(self, rows: list[_VisaRow]):
    size = self.builder_config.image_size
    for row in rows:
      yield (
        row.name,
        {
          "image": _stored_image(row.image, size),
          "mask": (
            b""
            if row.mask is None
            else _stored_mask(row.mask, row.image, size, nonzero_is_defect=True)
          ),
          "label": int(row.mask is not None),
          "defect": "good" if row.mask is None else "anomaly",
          "category": row.category,
          "name": row.name,
        },
      )


class DtdTextures(_ArrayRecordBuilder):
  """DTD (Cimpoi et al., CVPR 2014) as anomaly-source textures: every image, one split."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download DTD from https://www.robots.ox.ac.uk/~vgg/data/dtd/, extract it and pass the "
    "folder holding images/<class>/*.jpg as the manual dir."
  )
  LICENCE_FILE = "DTD.md"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(), dtype=np.object_),
          "label": tfds.features.Text(),  # the texture class
          "name": tfds.features.Text(),  # <class>/<file>
        }
      )
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    images = Path(dl_manager.manual_dir) / "images"
    if not images.is_dir():
      raise folder_lib.DataError(
        f"{dl_manager.manual_dir}: no images/ folder (DTD's layout images/<class>/*.jpg expected)"
      )
    paths = [
      p
      for d in sorted(images.iterdir())
      if d.is_dir()
      for p in folder_lib.images_in(d, skip_others=True)
    ]
    if not paths:
      raise folder_lib.DataError(f"{images}: no images in <class>/ subfolders")
    for path in paths:
      folder_lib.check_readable(path)
    self._print_licence()
    return {"train": self._generate_examples(paths)}

  def _generate_examples(self, paths: list[Path]):
    for path in paths:
      name = f"{path.parent.name}/{path.name}"
      yield name, {"image": path.read_bytes(), "label": path.parent.name, "name": name}
