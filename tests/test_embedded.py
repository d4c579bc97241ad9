import hashlib

import numpy as np
import pytest
from PIL import Image

from pouta_jax.data import embedded
from tests.conftest import SMALL


def _digest(root):
  h = hashlib.sha256()
  for path in sorted(p for p in root.rglob("*.png")):
    h.update(str(path.relative_to(root)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()


def test_layout_and_counts(dataset_root):
  assert len(embedded.CATEGORIES) >= 4
  textures = [c for c, v in embedded.CATEGORIES.items() if v.texture]
  assert len(textures) >= 2 and len(embedded.CATEGORIES) - len(textures) >= 2
  for name, category in embedded.CATEGORIES.items():
    folder = dataset_root / name
    assert len(category.defects) >= 3
    assert len(list((folder / "train" / "good").glob("*.png"))) == SMALL.num_train
    assert len(list((folder / "test" / "good").glob("*.png"))) == SMALL.num_test_good
    assert not (folder / "ground_truth" / "good").exists()
    for defect in category.defects:
      images = sorted((folder / "test" / defect).glob("*.png"))
      assert len(images) == SMALL.num_test_per_defect
      for image in images:
        mask = np.asarray(Image.open(folder / "ground_truth" / defect / f"{image.stem}_mask.png"))
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).sum() >= 4
  assert not list(dataset_root.glob(".*")), "no temporary folders left behind"


def test_grayscale_category_is_stored_as_one_channel(dataset_root):
  gray = [c for c, v in embedded.CATEGORIES.items() if v.grayscale]
  assert gray
  assert Image.open(next((dataset_root / gray[0] / "train" / "good").glob("*.png"))).mode == "L"
  rgb = next(c for c, v in embedded.CATEGORIES.items() if not v.grayscale)
  assert Image.open(next((dataset_root / rgb / "train" / "good").glob("*.png"))).mode == "RGB"


def test_build_is_deterministic_and_seeded(tmp_path):
  a = embedded.build(tmp_path / "a", SMALL, categories=("pill",))
  b = embedded.build(tmp_path / "b", SMALL, categories=("pill",))
  c = embedded.build(
    tmp_path / "c", embedded.BuildSpec(**{**SMALL.__dict__, "seed": 1}), categories=("pill",)
  )
  assert _digest(a) == _digest(b) != _digest(c)


def test_rebuild_skips_same_spec_and_replaces_other(tmp_path):
  embedded.build(tmp_path, SMALL, categories=("weave",))
  marker = tmp_path / "weave" / "train" / "good" / "000.png"
  mtime = marker.stat().st_mtime_ns
  embedded.build(tmp_path, SMALL, categories=("weave",))
  assert marker.stat().st_mtime_ns == mtime
  bigger = embedded.BuildSpec(**{**SMALL.__dict__, "num_train": SMALL.num_train + 1})
  embedded.build(tmp_path, bigger, categories=("weave",))
  assert len(list((tmp_path / "weave" / "train" / "good").glob("*.png"))) == bigger.num_train


def test_defects_are_small_valid_regions():
  for name, category in embedded.CATEGORIES.items():
    for defect in category.defects:
      image, mask = embedded.render_defect(name, defect, seed=0, index=0, size=64)
      assert image.shape[:2] == mask.shape and mask.dtype == bool
      assert 0 < mask.mean() < 0.25, (name, defect)
      assert image.min() >= 0 and image.max() <= 1


def test_unknown_category_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="'nope'"):
    embedded.build(tmp_path, SMALL, categories=("nope",))
