"""Scoring new images: inputs of any format, size and mode; outputs at each image's size; bad
files listed and skipped; outputs written whole and never over an existing folder unasked."""

import csv
import json
import os

import numpy as np
import pytest
from absl import logging
from PIL import Image

from pouta_jax import calibrate, errors, predict
from tests.conftest import unlistable

SIZE = 32


def _brightness(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A stand-in model with a known answer: the map is the pixel brightness."""
  maps = images.mean(axis=-1)
  return maps, maps.max(axis=(1, 2))


def _predictor(batch_size: int = 0, threshold: float | None = 0.5) -> predict.Predictor:
  thresholds = {} if threshold is None else {"oracle": (threshold, predict.ORACLE_RULE)}
  return predict.Predictor("test", "brightness", SIZE, batch_size, _brightness, thresholds)


def _images(folder):
  """Files of every accepted kind, each with its own size, mode and brightness."""
  rng = np.random.default_rng(0)
  (folder / "sub").mkdir(parents=True)
  specs = {
    "dark.png": ("L", (40, 30), 0.2),
    "bright.jpg": ("RGB", (64, 48), 0.9),
    "sub/alpha.png": ("RGBA", (20, 20), 0.6),
    "photo.bmp": ("RGB", (33, 17), 0.4),
    "scan.tiff": ("L", (50, 50), 0.7),
  }
  for name, (mode, size, level) in specs.items():
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.clip(level * 255 + rng.normal(0, 3, (size[1], size[0], channels)), 0, 255)
    pixels = pixels.astype(np.uint8)
    if mode == "RGBA":
      pixels[..., 3] = 255
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / name)
  return specs


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_every_image_is_scored_at_its_own_size(tmp_path):
  specs = _images(tmp_path / "in")
  summary = predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "out", batch_size=2)
  assert summary["scored"] == 5 and summary["unreadable"] == 0
  assert summary["threshold"] == 0.5 and summary["threshold_rule"].startswith("oracle")
  rows = {r["path"].split("/in/")[1]: r for r in _rows(tmp_path / "out" / "scores.csv")}
  assert sorted(rows) == sorted(specs)
  for name, (_, size, _) in specs.items():
    # What the model saw: the image read as in training (RGB, bilinear to 32 x 32).
    image = Image.open(tmp_path / "in" / name).convert("RGB")
    seen = np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR))
    want_map = seen.astype(np.float32).mean(axis=-1) / 255
    assert float(rows[name]["image_score"]) == pytest.approx(want_map.max(), abs=1e-6)
    assert rows[name]["decision"] == ("anomalous" if want_map.max() >= 0.5 else "normal")
    stored = np.asarray(Image.open(tmp_path / "out" / "maps" / f"{name}.png"))
    assert stored.dtype == np.uint16 and stored.shape == (size[1], size[0])
    full = Image.fromarray(want_map, "F").resize(size, Image.BILINEAR)
    np.testing.assert_allclose(stored / 65535, np.asarray(full), atol=1 / 65535 + 1e-6)
    overlay = Image.open(tmp_path / "out" / "overlays" / f"{name}.png")
    assert overlay.size == size and overlay.mode == "RGB"
  assert json.loads((tmp_path / "out" / "predict.json").read_text()) == summary


def test_maps_of_a_model_scored_with_its_reconstruction_error_are_not_clipped_at_one(tmp_path):
  _images(tmp_path / "in")

  def wide(images):  # maps in [0, 1.5], as with eval.error_weight=0.5
    maps, scores = _brightness(images)
    return 1.5 * maps, 1.5 * scores

  predictor = predict.Predictor("test", "wide", SIZE, 0, wide, {}, map_max=1.5)
  summary = predict.predict(predictor, str(tmp_path / "in" / "scan.tiff"), tmp_path / "out")
  assert summary["maps"] == "png16: uint16, value / 65535 x 1.5"
  stored = np.asarray(Image.open(tmp_path / "out" / "maps" / "scan.tiff.png")) / 65535 * 1.5
  seen = (
    Image.open(tmp_path / "in" / "scan.tiff").convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
  )
  want = Image.fromarray(1.5 * np.asarray(seen, np.float32).mean(-1) / 255, "F").resize(
    (50, 50), Image.BILINEAR
  )
  assert stored.max() > 1  # brightness 0.7 x 1.5
  np.testing.assert_allclose(stored, np.asarray(want), atol=1.5 / 65535 + 1e-6)


def test_a_fixed_batch_program_and_npy_maps(tmp_path):
  _images(tmp_path / "in")
  predictor = _predictor(batch_size=3)
  out = tmp_path / "out"
  predict.predict(predictor, str(tmp_path / "in" / "*.png"), out, threshold="0", map_format="npy")
  rows = _rows(out / "scores.csv")
  assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["dark.png"]  # the glob: not sub/
  assert [r["decision"] for r in rows] == ["anomalous"]
  assert np.load(out / "maps" / "dark.png.npy").shape == (30, 40)


def test_unreadable_files_are_listed_and_the_rest_scored(tmp_path, monkeypatch):
  _images(tmp_path / "in")
  (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  (tmp_path / "in" / "notes.txt").write_text("not an image file, not looked at")
  wide = np.full((8, 8), 40000, np.uint16)  # 16 bits: its range is unknown, as in training
  Image.fromarray(wide).save(tmp_path / "in" / "wide.png")
  os.mkfifo(tmp_path / "in" / "pipe.png")  # never opened: a read would block forever
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  summary = predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "out")
  assert (summary["scored"], summary["unreadable"]) == (5, 4)
  rows = {r["path"].rsplit("/", 1)[1]: r["error"] for r in _rows(tmp_path / "out" / "errors.csv")}
  assert sorted(rows) == ["broken.png", "notes.txt", "pipe.png", "wide.png"]
  assert "not a readable image" in rows["broken.png"] and "16-bit or float" in rows["wide.png"]
  assert rows["notes.txt"].startswith("not an image file") and rows["pipe.png"] == "a FIFO"
  for name in rows:  # each said as it happened, too
    assert sum(f"/{name}: " in w for w in warnings) == 1, warnings


def test_nothing_is_written_when_nothing_could_be_scored(tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  with pytest.raises(errors.DataError, match=r"none of its 1 images could be scored, e\.g\. .*br"):
    predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["in"]


def test_names_mirror_the_input_tree_and_never_collide(tmp_path):
  _images(tmp_path / "in")
  (tmp_path / "in" / "sub__alpha.png").write_bytes((tmp_path / "in" / "dark.png").read_bytes())
  summary = predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "out")
  maps = sorted(
    str(p.relative_to(tmp_path / "out" / "maps")) for p in (tmp_path / "out" / "maps").rglob("*.*")
  )
  assert summary["scored"] == 6 and len(maps) == 6
  assert "sub/alpha.png.png" in maps and "sub__alpha.png.png" in maps


def test_a_batch_is_never_larger_than_the_images(tmp_path):
  _images(tmp_path / "in")
  seen = []

  def model(images):
    seen.append(len(images))
    return _brightness(images)

  predictor = predict.Predictor("test", "m", SIZE, 0, model, {})
  predict.predict(predictor, str(tmp_path / "in"), tmp_path / "out", batch_size=4096)
  assert seen == [5]
  with pytest.raises(errors.ConfigError, match=r"--batch_size=100000000: expected a batch size"):
    predict.predict(predictor, str(tmp_path / "in"), tmp_path / "o2", batch_size=100_000_000)


@pytest.mark.parametrize("where", ["the input", "inside the input", "holding an input"])
def test_an_out_that_is_holds_or_lies_in_an_input_is_refused(tmp_path, where):
  _images(tmp_path / "in")
  out = {
    "the input": tmp_path / "in",
    "inside the input": tmp_path / "in" / "scored",
    "holding an input": tmp_path,
  }[where]
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  with pytest.raises(errors.ConfigError, match=r"is, holds or lies inside an input"):
    predict.predict(_predictor(), str(tmp_path / "in"), out, overwrite=True)
  with pytest.raises(errors.ConfigError, match=r"is, holds or lies inside an input"):
    predict.predict(_predictor(), str(tmp_path / "in" / "dark.png"), tmp_path, overwrite=True)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_only_an_output_of_predict(tmp_path):
  _images(tmp_path / "in")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "thesis.tex").write_text("years of work")
  with pytest.raises(errors.ExistsError, match=r"--out=.*mine holds no predict\.json"):
    predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "mine", overwrite=True)
  (tmp_path / "file").write_text("a file")
  with pytest.raises(errors.ExistsError, match=r"--out=.*file is a file"):
    predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "file", overwrite=True)
  assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
  assert (tmp_path / "file").read_text() == "a file"


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
  _images(tmp_path / "in")
  (tmp_path / "a_file").write_text("not a folder")  # unwritable for root too
  with pytest.raises(errors.WorkdirError, match=r"a_file/out: cannot write in .*a_file"):
    predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "a_file" / "out")


def test_outputs_are_never_overwritten_unasked_and_never_half_written(tmp_path, monkeypatch):
  _images(tmp_path / "in")
  out = tmp_path / "out"
  predict.predict(_predictor(), str(tmp_path / "in"), out)
  before = (out / "scores.csv").read_text()
  with pytest.raises(errors.ExistsError, match=r"--out=.*out exists; .* --overwrite"):
    predict.predict(_predictor(threshold=0.95), str(tmp_path / "in"), out)
  assert (out / "scores.csv").read_text() == before

  def fail(*args):
    raise RuntimeError("the model failed")

  with pytest.raises(RuntimeError):  # a failure half-way keeps the old outputs, whole
    predict.predict(
      predict.Predictor("t", "m", SIZE, 0, fail, {}), str(tmp_path / "in"), out, overwrite=True
    )
  assert (out / "scores.csv").read_text() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
  predict.predict(_predictor(threshold=0.95), str(tmp_path / "in"), out, overwrite=True)
  assert {r["decision"] for r in _rows(out / "scores.csv")} == {"normal"}


@pytest.mark.parametrize(
  "spec,message",
  [
    ("missing", "no such file or folder, and not a glob pattern"),
    ("empty/*.png", "no image files"),
  ],
)
def test_inputs_that_name_no_image_are_refused(tmp_path, spec, message):
  (tmp_path / "empty").mkdir()
  with pytest.raises(errors.NotFoundError, match=message):
    predict.predict(_predictor(), str(tmp_path / spec), tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_threshold_sources_calibrated_first_then_the_oracle():
  both = predict.Predictor(
    "art", "m", SIZE, 0, _brightness, {"calibrated": (0.7, "cal"), "oracle": (0.5, "orc")}
  )
  assert both.threshold() == (0.7, "cal")
  assert both.threshold("oracle") == (0.5, "orc")
  assert both.threshold("0.25") == (0.25, "given (--threshold)")
  assert _predictor().threshold() == (0.5, predict.ORACLE_RULE)
  assert _predictor(threshold=None).threshold() == (None, "none: no decisions")
  with pytest.raises(errors.ConfigError, match=r"--threshold=validation: art has no validation "):
    both.threshold("validation")
  with pytest.raises(errors.ConfigError, match=r"no calibrated threshold \(it has: oracle\); set"):
    _predictor().threshold("calibrated")
  for bad in ("high", "nan", "inf"):
    with pytest.raises(errors.ConfigError, match=rf"--threshold={bad}: expected calibrated, "):
      both.threshold(bad)


def test_a_folder_that_cannot_be_listed_is_said_and_listed(tmp_path, monkeypatch):
  _images(tmp_path / "in")
  unlistable(monkeypatch, tmp_path / "in" / "sub")
  summary = predict.predict(_predictor(), str(tmp_path / "in"), tmp_path / "out")
  assert (summary["scored"], summary["unreadable"]) == (4, 1)
  (row,) = _rows(tmp_path / "out" / "errors.csv")
  assert row["path"].endswith("/in/sub") and "cannot be listed" in row["error"]


def test_calibration_refuses_any_file_it_would_not_use(tmp_path, monkeypatch):
  """A threshold set on a silently smaller set would claim a rate it was not measured on."""
  _images(tmp_path / "in")
  (tmp_path / "in" / "notes.txt").write_text("hello")
  with pytest.raises(errors.DataError, match=r"notes.txt: not an image file"):
    calibrate.good_scores(_predictor(), str(tmp_path / "in"), 4)
  (tmp_path / "in" / "notes.txt").unlink()
  unlistable(monkeypatch, tmp_path / "in" / "sub")
  with pytest.raises(errors.DataError, match=r"in/sub: a folder that cannot be listed"):
    calibrate.good_scores(_predictor(), str(tmp_path / "in"), 4)
