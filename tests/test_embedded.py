import hashlib
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pouta_jax import config as config_lib
from pouta_jax.data import category_folder, embedded
from pouta_jax.errors import ConfigError
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
  assert not [p for p in dataset_root.glob(".*") if p.is_dir()], "no temporary folders left"


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


def test_builds_started_together_build_once(tmp_path, monkeypatch):
  """Two runs starting on a dataset not built yet (a study's first round): one builds, the
  other waits for it and finds the category built, instead of replacing a folder in use."""
  write, inside, most, calls = embedded._write_category, [], [0], []

  def slow_write(folder, category, spec):
    inside.append(1)
    most[0] = max(most[0], len(inside))
    calls.append(category)
    time.sleep(0.5)  # long enough for the other thread to arrive while this one builds
    write(folder, category, spec)
    inside.pop()

  monkeypatch.setattr(embedded, "_write_category", slow_write)
  threads = [
    threading.Thread(target=embedded.build, args=(tmp_path, SMALL, ("pill",))) for _ in range(2)
  ]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert most[0] == 1 and calls == ["pill"]
  assert len(list((tmp_path / "pill" / "train" / "good").glob("*.png"))) == SMALL.num_train


def test_embedded_seed_is_an_independent_draw_in_its_own_folder(tmp_path):
  """data.embedded_seed=N: the same categories drawn anew under embedded_dir + "_seed<N>"."""
  config = config_lib.load("draem", "pill,tiny")
  config.data.embedded_dir = str(tmp_path / "embedded")
  first = category_folder(config).train
  config.data.embedded_seed = 1
  other = category_folder(config).train
  assert other[0].parent == tmp_path / "embedded_seed1" / "pill" / "train" / "good"
  assert first[0].parent == tmp_path / "embedded" / "pill" / "train" / "good"
  assert len(first) == len(other) and first[0].read_bytes() != other[0].read_bytes()
  # It draws the embedded dataset: refused beside another dataset's root, before any work.
  config.data.root = str(tmp_path / "mvtec")
  with pytest.raises(ConfigError, match="config.data.embedded_seed=1: expected a draw >= 0"):
    config_lib.validate(config)
