import os
import re
import shutil
import socket
import struct
import zlib

import numpy as np
import pytest
from absl import logging
from PIL import Image

from pouta_jax.data.folder import (
  DataError,
  hold_out_real_anomalies,
  load_image,
  load_test_set,
  scan,
)
from tests.conftest import unlistable


@pytest.fixture
def copy(dataset_root, tmp_path):
  """A private copy of two categories to break."""
  for name in ("weave", "granite"):
    shutil.copytree(dataset_root / name, tmp_path / name)
  return tmp_path


def test_scan_lists_train_and_test(copy):
  folder = scan(copy, "weave")
  assert len(folder.train) == 8
  defects = {s.defect for s in folder.test}
  assert defects == {"good", "scratch", "hole", "stain"}
  assert all((s.mask is None) == (s.defect == "good") for s in folder.test)
  assert all(s.label == int(s.defect != "good") for s in folder.test)


def test_test_set_is_rgb_resized_and_binarised(copy):
  test = load_test_set(scan(copy, "granite"), 32)  # granite is stored grayscale
  assert test["image"].shape[1:] == (32, 32, 3) and test["image"].dtype == np.uint8
  np.testing.assert_array_equal(test["image"][..., 0], test["image"][..., 2])
  assert test["mask"].dtype == bool and test["mask"].shape[1:] == (32, 32)
  good = test["label"] == 0
  assert not test["mask"][good].any() and test["mask"][~good].any(axis=(1, 2)).all()


def test_missing_root(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    scan(tmp_path / "nowhere", "weave")


def test_category_folder_given_as_root(copy):
  with pytest.raises(DataError, match="looks like a category folder"):
    scan(copy / "weave", "weave")


def test_unknown_category_lists_what_is_there(copy):
  with pytest.raises(DataError, match="granite, weave"):
    scan(copy, "bottle")


def test_missing_or_empty_train_good(copy):
  for path in (copy / "weave" / "train" / "good").iterdir():
    path.unlink()
  with pytest.raises(DataError, match="no training images"):
    scan(copy, "weave")
  shutil.rmtree(copy / "weave" / "train")
  with pytest.raises(DataError, match="missing train/good"):
    scan(copy, "weave")


def test_a_defect_image_without_its_mask_beside_others_with_masks(copy):
  (copy / "weave" / "ground_truth" / "hole" / "001_mask.png").unlink()
  expected = (
    r"1 of 6 defect images have no mask, e\.g\. \S+hole/001\.png \(expected one in "
    r"ground_truth/hole/\), while e\.g\. \S+hole/000\.png has \S+hole/000_mask\.png; .*"
    r"config\.data\.require_masks=False"
  )
  with pytest.raises(DataError, match=expected):
    scan(copy, "weave")
  folder = scan(copy, "weave", require_masks=False)  # scored on images only
  assert not folder.has_masks
  assert not load_test_set(folder, 32)["has_masks"]


def test_a_dataset_without_masks_is_image_level(copy, monkeypatch):
  shutil.rmtree(copy / "weave" / "ground_truth")
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  folder = scan(copy, "weave")
  assert any("6 of 6 defect images have no mask: image metrics only" in w for w in warnings)
  assert not folder.has_masks and scan(copy, "granite").has_masks
  test = load_test_set(folder, 32)
  assert not test["has_masks"] and not test["mask"].any()
  np.testing.assert_array_equal(test["label"], [s.defect != "good" for s in folder.test])
  with pytest.raises(DataError, match=r"num_real_anomalies=2: pasting real anomalies needs"):
    hold_out_real_anomalies(folder, 2, seed=0)


def test_mask_of_another_size(copy):
  Image.new("L", (10, 10)).save(copy / "weave" / "ground_truth" / "hole" / "000_mask.png")
  message = "000_mask.png: mask is 10x10 but its image is 64x64"
  with pytest.raises(DataError, match=message):  # before training, and before a TFDS build
    scan(copy, "weave")
  with pytest.raises(DataError, match=message):
    load_test_set(scan(copy, "weave", check_files=False), 32)


def test_truncated_image_is_named(copy):
  path = copy / "weave" / "train" / "good" / "003.png"
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(DataError, match="003.png: not a readable image"):
    scan(copy, "weave")
  with pytest.raises(DataError, match="003.png: cannot decode image"):
    load_image(path, 32)


def test_a_file_the_dataset_would_not_use_is_refused_by_name(copy):
  notes = copy / "weave" / "train" / "good" / "notes.txt"
  notes.write_text("hello")
  with pytest.raises(DataError, match=re.escape(f"{notes}: not an image file")):
    scan(copy, "weave")
  notes.unlink()
  stray = copy / "weave" / "test" / "README"
  stray.write_text("hello")
  with pytest.raises(DataError, match=re.escape(f"{stray}: expected only folders")):
    scan(copy, "weave")


def test_a_hidden_file_is_skipped_with_a_warning(copy, monkeypatch):
  (copy / "weave" / "train" / "good" / ".DS_Store").write_text("hello")
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  assert len(scan(copy, "weave").train) == 8
  assert any(".DS_Store" in w for w in warnings)


@pytest.mark.parametrize("kind", ["fifo", "socket", "folder"])
def test_a_file_that_is_not_a_regular_file_is_refused_before_it_is_opened(copy, kind):
  """A FIFO blocked the scan's open forever; a socket and a folder named like an image too."""
  path = copy / "weave" / "train" / "good" / "x.png"
  if kind == "fifo":
    os.mkfifo(path)
  elif kind == "socket":
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
  else:
    path.mkdir()
  expected = {"fifo": "a FIFO", "socket": "a socket", "folder": "a folder"}[kind]
  with pytest.raises(DataError, match=re.escape(f"{path}: {expected}")):
    scan(copy, "weave")


def test_a_folder_that_cannot_be_listed_is_refused(copy, monkeypatch):
  folder = copy / "weave" / "train" / "good"
  unlistable(monkeypatch, folder)
  with pytest.raises(DataError, match=re.escape(f"{folder}: cannot be listed")):
    scan(copy, "weave")


def test_a_file_named_as_a_backup_is_not_dropped(copy):
  backup = copy / "weave" / "train" / "good" / "000.png~"
  backup.write_text("hello")
  with pytest.raises(DataError, match=re.escape(f"{backup}: not an image file")):
    scan(copy, "weave")


def test_mask_without_its_image(copy):
  (copy / "weave" / "test" / "hole" / "001.png").unlink()
  with pytest.raises(DataError, match=r"hole/001_mask\.png: mask without its image"):
    scan(copy, "weave")


def test_sixteen_bit_image_is_refused_and_rgba_warned(copy, monkeypatch):
  path = copy / "weave" / "train" / "good" / "002.png"
  Image.fromarray(np.full((64, 64), 1000, np.uint16)).save(path)
  with pytest.raises(DataError, match=r"002\.png: a I;16 \(16-bit or float\) image"):
    scan(copy, "weave")
  Image.new("RGBA", (64, 64), (10, 20, 30, 128)).save(path)
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  scan(copy, "weave")
  assert any("002.png: RGBA image, its alpha channel is ignored" in w for w in warnings)
  np.testing.assert_array_equal(load_image(path, 4)[0, 0], [10, 20, 30])


def test_truncated_jpeg_is_named(copy):
  path = copy / "weave" / "train" / "good" / "100.jpg"
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  path.write_bytes(path.read_bytes()[:-300])  # headers intact, scan data cut
  with pytest.raises(DataError, match=r"100\.jpg: not a readable image"):
    scan(copy, "weave")


def _png_header(width: int, height: int) -> bytes:
  """A PNG that declares `width` x `height` and holds no pixels: Pillow reads its size from the
  header without decoding."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", zlib.compress(b""))
    + chunk(b"IEND", b"")
  )


def test_an_image_over_the_pixel_limit_is_refused_stating_the_limit(copy):
  """144 megapixels passed with only Pillow's warning (it refuses from twice its limit)."""
  path = copy / "weave" / "train" / "good" / "000.png"
  path.write_bytes(_png_header(12000, 12000))
  with pytest.raises(DataError, match=r"12000x12000 = 144000000 pixels, more than the limit"):
    scan(copy, "weave")
