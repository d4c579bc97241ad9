"""TFDS builders built from tiny fake copies in the official layout, read back without
TensorFlow, and equal to reading the folders themselves."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pouta_jax.data import build, folder, pipeline, synthesis, textures
from pouta_jax.data.tfds import AnomalyConfig, AnomalyFolder, MvtecAd, builders, reader

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mvtec_copy(dataset_root, tmp_path_factory):
  """MVTec AD's layout with two categories: bottle (RGB) and grid (grayscale PNGs)."""
  root = tmp_path_factory.mktemp("mvtec_ad")
  shutil.copytree(dataset_root / "weave", root / "bottle")
  shutil.copytree(dataset_root / "granite", root / "grid")
  return root


@pytest.fixture(scope="module")
def built(mvtec_copy, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  for builder in build.builders("mvtec_ad", ["bottle", "grid"], 0, str(data_dir)):
    build.prepare(builder, str(mvtec_copy))
  return data_dir


def _assert_same_test_set(got: dict, want: dict) -> None:
  """Equal arrays; the paths differ by design: records of the built dataset, named after the
  files they came from."""
  for key in want.keys() - {"path"}:
    np.testing.assert_array_equal(got[key], want[key])
  assert [p.rsplit("/", 2)[-2:] for p in got["path"]] == [
    p.rsplit("/", 2)[-2:] for p in want["path"]
  ]


@pytest.mark.parametrize("category", ["bottle", "grid"])
def test_tfds_copy_reads_like_the_folder(mvtec_copy, built, category):
  from_folder = folder.scan(mvtec_copy, category)
  from_tfds = reader.category_folder(built, f"mvtec_ad/{category}", category)
  assert len(from_tfds.train) == len(from_folder.train)
  assert [s.defect for s in from_tfds.test] == [s.defect for s in from_folder.test]
  want, got = folder.load_test_set(from_folder, 32), folder.load_test_set(from_tfds, 32)
  _assert_same_test_set(got, want)

  # The training stream: identical batches, synthesised in a grain worker process.
  def stream(train, workers):
    sample = pipeline.SynthesizedSample(
      tuple(train), textures.ProceduralTextures(), 32, synthesis.SynthesisConfig(), seed=0
    )
    return list(
      pipeline.train_batches(pipeline.BatchBlock((sample,), 4, 0, 4), 3, num_workers=workers)
    )

  for a, b in zip(stream(from_folder.train, 0), stream(from_tfds.train, 1)):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_built_without_tensorflow_and_with_counts(built):
  assert "tensorflow" not in sys.modules
  table = build.counts(MvtecAd(config="grid", data_dir=str(built)))
  assert table["grid"]["train"] == 8 and table["grid"]["test/good"] == 4
  text = build.summary(table, "mvtec_ad")
  assert text.splitlines()[1].startswith("grid") and "good 4" in text
  # 15 categories with the official totals are recognised as complete (and a deficit flagged).
  full = {f"c{i}": {"train": 0, "test/good": 0, "test/x": 0} for i in range(15)}
  full["c0"] = {"train": 3629, "test/good": 467, "test/x": 1258}
  assert "match the official counts" in build.summary(full, "mvtec_ad")
  full["c0"]["train"] -= 1
  assert "DIFFER from the official counts" in build.summary(full, "mvtec_ad")


def test_stored_at_256_reads_like_the_folder_at_256(mvtec_copy, tmp_path):
  builder = MvtecAd(config="grid_256", data_dir=str(tmp_path))
  build.prepare(builder, str(mvtec_copy))
  from_tfds = reader.category_folder(tmp_path, "mvtec_ad/grid_256", "grid")
  with Image.open(folder._file(from_tfds.train[0])) as stored:
    assert stored.size == (256, 256) and stored.mode == "L"
  want = folder.load_test_set(folder.scan(mvtec_copy, "grid"), 256)
  got = folder.load_test_set(from_tfds, 256)
  _assert_same_test_set(got, want)


def test_anomaly_folder_and_the_command_line(dataset_root, tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pouta_jax.data.build",
      "--dataset=anomaly_folder",
      "--name=emb",
      "--categories=pill,washer",
      f"--manual_dir={dataset_root}",
      f"--data_dir={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "built anomaly_folder/emb/1.0.0" in result.stdout
  lines = result.stdout.splitlines()
  assert any(x.startswith("pill") for x in lines) and any(x.startswith("washer") for x in lines)
  pill = reader.category_folder(tmp_path, "anomaly_folder/emb", "pill")
  assert len(pill.train) == len(folder.scan(dataset_root, "pill").train)
  with pytest.raises(folder.DataError, match=r"no category 'weave' in .*pill, washer"):
    reader.category_folder(tmp_path, "anomaly_folder/emb", "weave")
  with pytest.raises(folder.DataError, match="no prepared TFDS dataset 'anomaly_folder/other'"):
    reader.category_folder(tmp_path, "anomaly_folder/other", "pill")


def test_mvtec_build_prints_the_licence_once(mvtec_copy, tmp_path):
  command = [
    sys.executable,
    "-m",
    "pouta_jax.data.build",
    "--dataset=mvtec_ad",
    "--categories=bottle",
    f"--manual_dir={mvtec_copy}",
    f"--data_dir={tmp_path}",
  ]
  first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "CC BY-NC-SA 4.0" in first.stdout
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "CC BY-NC-SA 4.0" not in again.stdout


def test_bad_copies_fail_before_anything_is_built(mvtec_copy, tmp_path):
  data_dir = tmp_path / "tfds"
  # A missing category: the whole `all` config refuses, naming it.
  with pytest.raises(folder.DataError, match="no category 'cable'"):
    build.prepare(MvtecAd(config="all", data_dir=str(data_dir)), str(mvtec_copy))
  assert not list(data_dir.rglob("dataset_info.json"))
  with pytest.raises(ValueError, match=r"\['carpets'\] are not mvtec_ad categories"):
    build.builders("mvtec_ad", ["carpets"], 0, str(data_dir))

  broken = tmp_path / "broken"
  shutil.copytree(mvtec_copy / "bottle", broken / "bottle")
  good = sorted((broken / "bottle" / "train" / "good").iterdir())
  sixteen = np.full((8, 8), 40000, np.uint16)
  Image.fromarray(sixteen).save(good[0])
  with pytest.raises(folder.DataError, match=r"000\.png: a I;16 \(16-bit or float\) image"):
    build.prepare(MvtecAd(config="bottle", data_dir=str(data_dir)), str(broken))
  good[0].write_bytes(good[1].read_bytes()[:100])  # truncated
  with pytest.raises(folder.DataError, match="not a readable image"):
    build.prepare(MvtecAd(config="bottle", data_dir=str(data_dir)), str(broken))
  assert not list(data_dir.rglob("dataset_info.json"))


def test_interrupted_build_restarts_cleanly(mvtec_copy, tmp_path, monkeypatch):
  calls = {"n": 0}
  real = builders._stored_image

  def dies_midway(path, size):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt
    return real(path, size)

  monkeypatch.setattr(builders, "_stored_image", dies_midway)
  with pytest.raises(KeyboardInterrupt):
    build.prepare(MvtecAd(config="bottle", data_dir=str(tmp_path)), str(mvtec_copy))
  monkeypatch.setattr(builders, "_stored_image", real)
  builder = MvtecAd(config="bottle", data_dir=str(tmp_path))
  build.prepare(builder, str(mvtec_copy))
  assert not list((tmp_path / "mvtec_ad" / "bottle").glob("incomplete.*"))
  assert len(reader.category_folder(tmp_path, "mvtec_ad/bottle", "bottle").train) == 8


def test_custom_configs_name_their_categories():
  config = AnomalyConfig(name="x", categories=("a",), image_size=0)
  assert AnomalyFolder(config=config, data_dir="/nonexistent").builder_config.categories == ("a",)


def _visa_copy(root: Path, mask_values: int = 1) -> Path:
  """VisA's layout: <object>/Data/Images/{Normal,Anomaly}/*.JPG, masks 0/1 PNGs, the CSV."""
  rng = np.random.default_rng(0)
  lines = ["object,split,label,image,mask"]
  for category in ("candle", "pcb1"):
    for kind, count in (("Normal", 6), ("Anomaly", 2)):
      for i in range(count):
        image = f"{category}/Data/Images/{kind}/{i:04d}.JPG"
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / image)
        if kind == "Normal":
          lines.append(f"{category},{'train' if i < 4 else 'test'},normal,{image},")
        else:
          mask = f"{category}/Data/Masks/Anomaly/{i:04d}.png"
          (root / mask).parent.mkdir(parents=True, exist_ok=True)
          values = np.zeros((40, 48), np.uint8)
          values[5:20, 10:30] = mask_values
          Image.fromarray(values).save(root / mask)
          lines.append(f"{category},test,anomaly,{image},{mask}")
  (root / "split_csv").mkdir()
  (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
  return root


def test_visa_split_by_its_csv_with_binarised_masks(tmp_path):
  copy = _visa_copy(tmp_path / "visa")
  data_dir = tmp_path / "tfds"
  (builder,) = build.builders("visa", ["pcb1"], 0, str(data_dir))
  build.prepare(builder, str(copy))
  pcb1 = reader.category_folder(data_dir, "visa/pcb1", "pcb1")
  assert len(pcb1.train) == 4 and [s.defect for s in pcb1.test] == ["anomaly"] * 2 + ["good"] * 2
  test_set = folder.load_test_set(pcb1, 32)
  want = (
    np.asarray(
      Image.fromarray(np.pad(np.ones((15, 20), np.uint8), ((5, 20), (10, 18))) * 255).resize(
        (32, 32), Image.BILINEAR
      ),
      np.float32,
    )
    >= 127.5
  )
  np.testing.assert_array_equal(test_set["mask"][0], want)  # a 0/1 mask, read as defective
  assert test_set["label"].tolist() == [1, 1, 0, 0]


def test_visa_row_pointing_at_a_missing_file(tmp_path):
  copy = _visa_copy(tmp_path / "visa")
  (copy / "candle" / "Data" / "Images" / "Normal" / "0002.JPG").unlink()
  with pytest.raises(folder.DataError, match=r"1cls\.csv:4: .*0002\.JPG does not exist"):
    build.prepare(build.builders("visa", ["candle"], 0, str(tmp_path / "tfds"))[0], str(copy))
  with pytest.raises(folder.DataError, match=r"no split_csv/1cls\.csv"):
    build.prepare(build.builders("visa", ["candle"], 0, str(tmp_path / "tfds"))[0], str(tmp_path))
  assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


def test_dtd_textures_read_like_the_folder(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  for texture in ("banded", "dotted"):
    for i in range(3):
      path = tmp_path / "dtd" / "images" / texture / f"{texture}_{i:04d}.jpg"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(path)
  (tmp_path / "dtd" / "images" / "banded" / "notes.txt").write_text("not an image")
  (builder,) = build.builders("dtd", [], 0, str(tmp_path / "tfds"))
  build.prepare(builder, str(tmp_path / "dtd"))
  assert build.counts(builder) == {"banded": {"train": 3}, "dotted": {"train": 3}}
  from_folder = textures.texture_source(str(tmp_path / "dtd"))
  from_tfds = textures.texture_source("tfds:dtd_textures", str(tmp_path / "tfds"))
  for seed in range(4):
    np.testing.assert_array_equal(
      from_tfds.sample(np.random.default_rng(seed), 32),
      from_folder.sample(np.random.default_rng(seed), 32),
    )
  with pytest.raises(folder.DataError, match="needs config.data.tfds_data_dir"):
    textures.texture_source("tfds:dtd_textures")


def test_training_and_evaluation_from_tfds(built, dataset_root, tmp_path):
  from pouta_jax import experiment
  from tests.conftest import make_tiny_config

  config = make_tiny_config("draem", dataset_root)
  config.data.category = "grid"
  config.data.tfds_dataset = "mvtec_ad/grid"
  config.data.tfds_data_dir = str(built)
  results = experiment.run(config, tmp_path)
  assert set(results["metrics"]["draem"]) == {"grid"}
  assert (tmp_path / "metrics.json").is_file()


def test_an_image_level_folder_builds_and_reads_without_masks(dataset_root, tmp_path):
  source = tmp_path / "source"
  shutil.copytree(
    dataset_root / "weave", source / "weave", ignore=shutil.ignore_patterns("ground*")
  )
  [builder] = build.builders("anomaly_folder", ["weave"], 0, str(tmp_path / "tfds"), name="lines")
  build.prepare(builder, str(source))
  from_tfds = reader.category_folder(tmp_path / "tfds", "anomaly_folder/lines", "weave")
  assert not from_tfds.has_masks
  want = folder.load_test_set(folder.scan(source, "weave"), 32)
  _assert_same_test_set(folder.load_test_set(from_tfds, 32), want)
