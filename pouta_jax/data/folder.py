"""Reader for MVTec-AD-layout folders (the real dataset and the embedded one alike).

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png                       (no masks: all normal)
    <root>/<category>/test/<defect>/<name>.png
    <root>/<category>/ground_truth/<defect>/<name>_mask.png  (or <name>.png)

`scan` checks the layout and every file's header up front, so a broken copy fails before any
training starts, with the offending path in the message. A dataset without any masks is
image-level (pixel metrics n/a); one with masks for some defect images and not others is
refused unless `require_masks` is off (`check_masks`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os

import numpy as np
from absl import logging
from etils.epath import Path
from PIL import Image

from pouta_jax import files
from pouta_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# Where a file is: a Path, or a record of a built TFDS dataset (data/tfds/reader.py) that the
# loaders below open the same way.
@dataclasses.dataclass(frozen=True)
class TestSample:
  image: Path
  mask: Path | None  # None for `good` images
  defect: str

  @property
  def label(self) -> int:
    return int(self.defect != "good")


@dataclasses.dataclass(frozen=True)
class CategoryFolder:
  root: Path
  category: str
  train: tuple[Path, ...]
  test: tuple[TestSample, ...]
  # Defect images with masks taken out of `test` to train on ("seen" anomalies, PRN).
  real_anomalies: tuple[TestSample, ...] = ()
  # Normal images taken out of `train` for validation (`hold_out_validation`).
  val: tuple[Path, ...] = ()

  @property
  def has_masks(self) -> bool:
    """Whether every defect test image has its mask: pixel metrics need them all."""
    return all(s.mask is not None for s in self.test if s.label)


def images_in(folder: Path, skip_others: bool = False) -> list[Path]:
  """Image files of `folder`, sorted. Anything else is refused, naming it: a dataset that
  silently lost a file (a FIFO would block its read forever) trains and scores on less than it
  claims. Hidden files (`.DS_Store`) are skipped with a warning, and so are other regular files
  with `skip_others` (a texture source: DTD's release holds more than images)."""
  images = []
  try:
    listed = files.listdir(folder)
  except OSError as e:
    raise DataError(f"{folder}: cannot be listed ({e.strerror})") from None
  for path in listed:
    if path.name.startswith("."):
      logging.warning("Skipping %s: a hidden file", path)
      continue
    why = files.not_a_file(path)
    if not why and skip_others and path.suffix.lower() not in IMAGE_SUFFIXES:
      logging.warning("Skipping %s: not an image file", path)
      continue
    if why or path.suffix.lower() not in IMAGE_SUFFIXES:
      raise DataError(
        f"{path}: {why or 'not an image file'}; expected only image files "
        f"({', '.join(IMAGE_SUFFIXES)}) in {folder}: remove or move it"
      )
    images.append(path)
  return images


# Pillow modes of 16-bit and float images: converting them to 8 bits would clip, not scale.
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


# Images of more pixels than this are refused before they are decoded: Pillow's own guard against
# decompression bombs (it only warns below twice this), about 89 megapixels, 9459 x 9459.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def _check_pixels(path, image: Image.Image) -> None:
  width, height = image.size
  if width * height > MAX_IMAGE_PIXELS:
    raise DataError(
      f"{path}: {width}x{height} = {width * height} pixels, more than the limit of "
      f"{MAX_IMAGE_PIXELS} (pouta_jax.data.folder.MAX_IMAGE_PIXELS); resize it first"
    )


def check_readable(path: Path) -> None:
  try:
    with Image.open(_file(path)) as image:
      _check_pixels(path, image)
      mode = image.mode
      if image.format in ("JPEG", "MPO"):
        image.load()  # verify() skips JPEG scan data: a truncated file would pass it
      else:
        image.verify()
  except DataError:
    raise
  except Exception as e:  # PIL raises many types for broken files
    raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
  if mode in WIDE_MODES:
    raise DataError(
      f"{path}: a {mode} (16-bit or float) image; expected 8-bit grayscale or "
      f"RGB (convert it first: its range is not known here)"
    )
  if mode in ("RGBA", "LA", "PA"):
    logging.warning("%s: %s image, its alpha channel is ignored", path, mode)


def _find_mask(category_dir: Path, defect: str, image: Path) -> Path | None:
  masks = category_dir / "ground_truth" / defect
  for name in (f"{image.stem}_mask{image.suffix}", f"{image.stem}_mask.png", image.name):
    if (masks / name).is_file():
      return masks / name
  return None


def check_masks(folder: CategoryFolder, require: bool = True) -> None:
  """Refuses a category whose defect images have masks but for some (a copy that lost files,
  most likely), naming one of each, unless `require` is False; warns where defect images go
  without masks (image metrics only)."""
  defects = [s for s in folder.test if s.label]
  missing = [s for s in defects if s.mask is None]
  masked = [s for s in defects if s.mask is not None]
  if not missing:
    return
  if masked and require:
    raise DataError(
      f"{folder.root / folder.category}: {len(missing)} of {len(defects)} defect images have no "
      f"mask, e.g. {missing[0].image} (expected one in ground_truth/{missing[0].defect}/), while "
      f"e.g. {masked[0].image} has {masked[0].mask}; add the missing masks, or set "
      f"config.data.require_masks=False to score images only (pixel metrics n/a)"
    )
  logging.warning(
    "%s: %d of %d defect images have no mask: image metrics only (pixel metrics n/a)",
    folder.root / folder.category,
    len(missing),
    len(defects),
  )


def scan(
  root: str | Path, category: str, check_files: bool = True, require_masks: bool = True
) -> CategoryFolder:
  """Lists a category's files and checks the layout (and, by default, each file's header);
  `require_masks`: see `check_masks`."""
  root = files.path(root)
  if not files.is_dir(root, "dataset root"):
    raise DataError(f"dataset root {root} does not exist or is not a folder")
  category_dir = root / category
  if not category_dir.is_dir():
    if (root / "train").is_dir():
      raise DataError(
        f"{root} looks like a category folder itself; pass its parent as the dataset root"
      )
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    raise DataError(
      f"no category {category!r} under {root} (categories found: {', '.join(found) or 'none'})"
    )
  train_dir, test_dir = category_dir / "train" / "good", category_dir / "test"
  if not train_dir.is_dir():
    raise DataError(f"{category_dir}: missing train/good folder of defect-free images")
  train = tuple(images_in(train_dir))
  if not train:
    raise DataError(f"{train_dir}: no training images")
  if not test_dir.is_dir():
    raise DataError(f"{category_dir}: missing test folder")

  test = []
  for defect_dir in _defect_folders(test_dir):
    defect = defect_dir.name
    for image in images_in(defect_dir):
      mask = None if defect == "good" else _find_mask(category_dir, defect, image)
      test.append(TestSample(image, mask, defect))
  if not test:
    raise DataError(f"{test_dir}: no test images")
  used = {s.mask for s in test}
  ground_truth = category_dir / "ground_truth"
  for masks in _defect_folders(ground_truth) if ground_truth.is_dir() else ():
    for mask in images_in(masks):
      if mask not in used:
        raise DataError(
          f"{mask}: mask without its image (expected it in "
          f"{test_dir / masks.name}); is the copy complete?"
        )

  folder = CategoryFolder(root, category, train, tuple(test))
  check_masks(folder, require_masks)
  if check_files:
    for path in train + tuple(p for s in test for p in (s.image, s.mask) if p is not None):
      check_readable(path)
    for sample in (s for s in test if s.mask is not None):
      with Image.open(_file(sample.image)) as image, Image.open(_file(sample.mask)) as mask:
        check_mask_size(sample.mask, mask.size, image.size)
  return folder


def _defect_folders(folder: Path) -> list[Path]:
  """The subfolders of test/ or ground_truth/, one per defect type; a file there is refused."""
  found = []
  for path in files.listdir(folder):
    if path.name.startswith("."):
      logging.warning("Skipping %s: a hidden file", path)
    elif not path.is_dir():
      raise DataError(f"{path}: expected only folders (one per defect type) in {folder}")
    else:
      found.append(path)
  return found


# The stream of data.val_seed that picks the validation images.
VALIDATION_STREAM = 1


def hold_out_validation(folder: CategoryFolder, fraction: float, seed: int) -> CategoryFolder:
  """The same category with round(`fraction` x its training images), chosen by `seed`, moved
  to `val` (both kept in file order): never trained on."""
  total = len(folder.train)
  count = round(fraction * total)
  if not 0 < count < total:
    raise DataError(
      f"config.data.val_fraction={fraction}: holds out {count} of the {total} training images "
      f"in {folder.root / folder.category / 'train' / 'good'}, leaving {total - count} to train "
      f"on; expected at least 1 of each"
    )
  chosen = set(
    np.random.default_rng((seed, VALIDATION_STREAM)).choice(total, count, False).tolist()
  )
  return dataclasses.replace(
    folder,
    train=tuple(p for i, p in enumerate(folder.train) if i not in chosen),
    val=tuple(p for i, p in enumerate(folder.train) if i in chosen),
  )


def few_shot(folder: CategoryFolder, count: int, seed: int) -> CategoryFolder:
  """The same category with `count` training images chosen by `seed` (kept in file order), of
  those not held out for validation."""
  if count > len(folder.train):
    held = f" after {len(folder.val)} held out (data.val_fraction)" if folder.val else ""
    raise DataError(
      f"config.data.few_shot={count}: only {len(folder.train)} training images "
      f"in {folder.root / folder.category / 'train' / 'good'}{held}"
    )
  chosen = np.random.default_rng(seed).choice(len(folder.train), count, replace=False)
  return dataclasses.replace(folder, train=tuple(folder.train[i] for i in sorted(chosen)))


# The stream of train.seed that picks the real anomalies (few_shot draws from the seed itself).
REAL_ANOMALY_STREAM = 1


def hold_out_real_anomalies(folder: CategoryFolder, count: int, seed: int) -> CategoryFolder:
  """The same category with `count` defect images (and masks), chosen by `seed` among all
  defect types, moved from the test set to `real_anomalies`: trained on, never scored."""
  if not folder.has_masks:
    raise DataError(
      f"config.data.num_real_anomalies={count}: pasting real anomalies needs their masks, and "
      f"defect images of {folder.category} in {folder.root} have none"
    )
  defects = [s for s in folder.test if s.label]
  if count > len(defects):
    raise DataError(
      f"config.data.num_real_anomalies={count}: the test set of "
      f"{folder.category} in {folder.root} has only {len(defects)} defect images"
    )
  chosen = np.random.default_rng((seed, REAL_ANOMALY_STREAM)).choice(
    len(defects), count, replace=False
  )
  real = tuple(defects[i] for i in sorted(chosen))
  return dataclasses.replace(
    folder, test=tuple(s for s in folder.test if s not in real), real_anomalies=real
  )


def sample_name(sample: TestSample) -> str:
  """`<defect>/<file stem>`: how outputs name a test image."""
  return f"{sample.defect}/{sample.image.stem}"


def _file(path):
  """What Pillow opens: a local file path, or the bytes of an object (gs://) or of a record
  (anything with read_bytes that is not a path, e.g. a TFDS RecordRef)."""
  if isinstance(path, (str, os.PathLike)):
    return io.BytesIO(files.path(path).read_bytes()) if files.is_remote(path) else os.fspath(path)
  return io.BytesIO(path.read_bytes())


def open_image(path, mode: str) -> Image.Image:
  """The decoded image converted to `mode`; DataError naming the file if it cannot be read."""
  try:
    with Image.open(_file(path)) as image:
      _check_pixels(path, image)
      image.load()
      return image.convert(mode)
  except DataError:
    raise
  except Exception as e:
    raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def load_image(path, size: int) -> np.ndarray:
  """An image as uint8 RGB (size, size, 3); grayscale is repeated over 3 channels."""
  return resize_image(open_image(path, "RGB"), size)


def resize_image(image: Image.Image, size: int) -> np.ndarray:
  """What the models see of an image: Pillow's bilinear resize to (size, size), uint8."""
  return np.asarray(image.resize((size, size), Image.BILINEAR))


@functools.lru_cache(maxsize=2048)
def load_image_cached(path, size: int) -> np.ndarray:
  """`load_image`, remembered per process: training reads each image many times."""
  return load_image(path, size)


def check_mask_size(path, mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
  if mask_size != image_size:
    raise DataError(
      f"{path}: mask is {mask_size[0]}x{mask_size[1]} but its image is "
      f"{image_size[0]}x{image_size[1]}"
    )


def load_mask(path, size: int, image_size: tuple[int, int]) -> np.ndarray:
  """A binary mask (size, size) bool; it must have the size of its image."""
  mask = open_image(path, "L")
  check_mask_size(path, mask.size, image_size)
  return resize_mask(mask, size)


def resize_mask(mask: Image.Image, size: int) -> np.ndarray:
  """A mode-L mask resized bilinearly to (size, size) and binarised at half intensity."""
  return np.asarray(mask.resize((size, size), Image.BILINEAR), np.float32) >= 127.5


def load_test_sample(sample: TestSample, size: int) -> tuple[np.ndarray, np.ndarray]:
  """A test image (uint8 RGB) and its mask (bool; all False for `good` and for defect images
  without a mask), at (size, size)."""
  image = load_image(sample.image, size)
  if sample.mask is None:
    return image, np.zeros((size, size), bool)
  with Image.open(_file(sample.image)) as header:
    return image, load_mask(sample.mask, size, header.size)


@functools.lru_cache(maxsize=256)
def load_test_sample_cached(sample: TestSample, size: int) -> tuple[np.ndarray, np.ndarray]:
  """`load_test_sample`, remembered per process (real anomalies are pasted many times)."""
  return load_test_sample(sample, size)


def load_test_set(folder: CategoryFolder, size: int) -> dict[str, np.ndarray]:
  """All test images (uint8), masks (bool), labels, defect names, names and paths, in order,
  and `has_masks` (False: image-level, the masks are not ground truth)."""
  images, masks = zip(*(load_test_sample(sample, size) for sample in folder.test))
  return {
    "image": np.stack(images),
    "mask": np.stack(masks),
    "label": np.array([s.label for s in folder.test], np.int32),
    "defect": np.array([s.defect for s in folder.test]),
    "name": np.array([sample_name(s) for s in folder.test]),
    "path": np.array([str(s.image) for s in folder.test]),
    "has_masks": np.bool_(folder.has_masks),
  }
