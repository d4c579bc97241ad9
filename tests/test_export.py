"""Exported artifacts: equal to the in-process model, loadable without flax or the model code,
evaluable like a checkpoint, and never written from bad input."""

import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from pouta_jax import (
  artifact,
  calibrate,
  errors,
  evaluate,
  experiment,
  export,
  files,
  models,
  predict,
  train,
)
from pouta_jax.data import DataError
from pouta_jax.data.folder import load_image
from tests.conftest import make_tiny_config, npz_bomb

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(85)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(dataset_root, tmp_path_factory):
  """A tiny POUTA run, trained and evaluated: (config, workdir, final variables, results)."""
  config = make_tiny_config("pouta", dataset_root)
  workdir = tmp_path_factory.mktemp("run")
  results = experiment.run(config, workdir)
  state = export._state_of(workdir, config)
  return config, workdir, train.run_variables(state.variables, 0), results


def test_artifact_predicts_as_the_model_for_any_batch(trained, tmp_path):
  config, workdir, variables, results = trained
  assert config.eval.error_weight == 1.0  # POUTA's default: its map plus the error
  out = export.export(workdir, tmp_path / "art", image_sizes=(32, 64))
  art = artifact.load(out)
  model = models.get("pouta").build(config)
  predict_fn = evaluate.model_predict_fn(
    model, variables, config.eval.score_filter_size, error_weight=config.eval.error_weight
  )
  rng = np.random.default_rng(0)
  for batch, size in ((3, 32), (5, 32), (2, 64)):  # one program per size serves every batch
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    maps, scores = art.predict(images)
    want_maps, want_scores = jax.device_get(predict_fn(images))
    assert maps.shape == (batch, size, size) and scores.shape == (batch,)
    np.testing.assert_allclose(maps, want_maps, atol=1e-6)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)

  manifest = art.manifest
  assert manifest["model"] == "pouta" and manifest["step"] == config.train.num_steps
  assert manifest["image_sizes"] == [32, 64] and manifest["batch_size"] == "any"
  assert set(manifest["platforms"]) == {"cpu", "cuda", "tpu"}
  assert (
    manifest["thresholds"]
    == json.loads((workdir / "thresholds.json").read_text())["weave"]["oracle"]
  )
  assert manifest["validation_thresholds"] is None  # no data.val_fraction
  assert manifest["metrics"] == pytest.approx(results["metrics"]["pouta"]["weave"], nan_ok=True)
  assert manifest["config"]["model"] == json.loads(config.model.to_json())
  with pytest.raises(ValueError, match=r"S in \(32, 64\)"):
    art.predict(np.zeros((1, 48, 48, 3), np.float32))


def test_onnx_artifact_matches_the_jax_program_and_carries_its_metadata(trained, tmp_path):
  config, workdir, variables, _ = trained
  out = export.export(workdir, tmp_path / "onnx", runtime="onnx")
  assert sorted(p.name for p in out.iterdir()) == ["artifact.json", "predict_32px.onnx"]
  art = artifact.load(out)
  assert art.manifest["runtime"] == "onnx" and "jax2onnx" in art.manifest["versions"]
  model = models.get("pouta").build(config)
  predict_fn = evaluate.model_predict_fn(
    model, variables, config.eval.score_filter_size, error_weight=config.eval.error_weight
  )
  images = np.random.default_rng(1).random((3, 32, 32, 3), dtype=np.float32)
  maps, scores = art.predict(images)  # ONNX Runtime, any batch size
  want_maps, want_scores = jax.device_get(predict_fn(images))
  np.testing.assert_allclose(maps, want_maps, atol=1e-4)
  np.testing.assert_allclose(scores, want_scores, atol=1e-4)
  assert art.predict(images[:1])[0].shape == (1, 32, 32)
  good = f"{config.data.root}/weave/test/good"
  summary = predict.predict(predict.from_artifact(out), good, tmp_path / "scored")
  assert summary["scored"] == summary["images"] > 0
  # The predict command in an interpreter where jax (and the rest of the training install) cannot
  # be imported, as on a machine with onnxruntime only: calibrated there, the same scores.
  calibrated = _blocked_run(
    JAX_STACK, "pouta_jax.calibrate", f"--artifact={out}", f"--good={good}", "--fpr=0.1"
  )
  assert calibrated.returncode == 0, calibrated.stderr[-3000:]
  without_jax = _blocked_run(
    JAX_STACK,
    "pouta_jax.predict",
    f"--artifact={out}",
    f"--input={good}",
    f"--out={tmp_path / 'no_jax'}",
    cwd=REPO,
  )
  assert without_jax.returncode == 0, without_jax.stderr[-3000:]
  assert _scores(tmp_path / "no_jax") == pytest.approx(_scores(tmp_path / "scored"), abs=1e-6)
  used = json.loads((tmp_path / "no_jax" / "predict.json").read_text())
  assert used["threshold"] == artifact.load(out).calibration["image_threshold"]
  for flag, expected in [
    (f"--artifact={export.export(workdir, tmp_path / 'jax')}", "running a JAX artifact needs jax"),
    (f"--workdir={workdir}", "needs the training install"),
  ]:
    failed = _blocked_run(JAX_STACK, "pouta_jax.predict", flag, f"--input={good}", "--out=x")
    assert failed.returncode == 1 and expected in failed.stderr, failed.stderr[-3000:]

  import onnx

  props = {p.key: json.loads(p.value) for p in onnx.load(out / "predict_32px.onnx").metadata_props}
  assert props["preprocessing"] == art.manifest["preprocessing"]
  assert props["thresholds"] == art.manifest["thresholds"] and props["category"] == "weave"
  with pytest.raises(errors.ConfigError, match="--format='tflite'"):
    export.export(workdir, tmp_path / "other", runtime="tflite")


# What a machine that only runs ONNX artifacts lacks.
JAX_STACK = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorflow_datasets", "jax2onnx")


def _blocked_run(blocked: tuple[str, ...], module: str, *args: str, cwd: Path = REPO):
  """`python -m module args` in a fresh interpreter where the `blocked` packages fail to import."""
  script = f"""
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.argv = [{module!r}] + {list(args)!r}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
  return subprocess.run(
    [sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300
  )


def _scores(out: Path) -> dict[str, float]:
  with open(out / "scores.csv") as f:
    return {row["path"]: float(row["image_score"]) for row in csv.DictReader(f)}


def test_preprocess_matches_the_training_reader(trained, tmp_path):
  _, workdir, _, _ = trained
  art = artifact.load(export.export(workdir, tmp_path / "art"))
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (2, 50, 70), dtype=np.uint8)
  from PIL import Image

  want = (
    np.stack(
      [np.asarray(Image.fromarray(g).convert("RGB").resize((32, 32), Image.BILINEAR)) for g in gray]
    ).astype(np.float32)
    / 255
  )
  np.testing.assert_allclose(art.preprocess(gray), want)
  with pytest.raises(ValueError, match="expected uint8 images"):
    art.preprocess(gray.astype(np.float32))


def test_cli_export_loads_without_flax_or_model_code(trained, tmp_path):
  _, workdir, _, _ = trained
  out = tmp_path / "art"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pouta_jax.export",
      f"--workdir={workdir}",
      f"--out={out}",
      "--batch_size=2",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  images = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
  np.save(tmp_path / "images.npy", images)
  # A fresh interpreter where flax and every pouta_jax module are unimportable; the reader
  # file is loaded by path, as a user who copied it would.
  script = f"""
import importlib.util, sys
import numpy as np
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flax", "pouta_jax", "optax", "orbax", "grain"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("reader", {str(REPO / "pouta_jax" / "artifact.py")!r})
reader = sys.modules["reader"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reader)
art = reader.load({str(out)!r})
maps, scores = art.predict(np.load({str(tmp_path / "images.npy")!r}))
np.savez({str(tmp_path / "standalone.npz")!r}, maps=maps, scores=scores)
"""
  subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True)
  standalone = np.load(tmp_path / "standalone.npz")
  maps, scores = artifact.load(out).predict(images)
  np.testing.assert_array_equal(standalone["maps"], maps)
  np.testing.assert_array_equal(standalone["scores"], scores)
  with pytest.raises(ValueError, match="exported for batches of 2 images"):
    artifact.load(out).predict(images[:1])


def test_evaluation_runs_from_an_artifact(trained, tmp_path):
  config, workdir, _, results = trained
  out = export.export(workdir, tmp_path / "art")
  evaluated = experiment.run(config, tmp_path / "eval", "eval", artifact_path=out)
  assert evaluated["metrics"]["pouta"]["weave"] == pytest.approx(
    results["metrics"]["pouta"]["weave"], abs=1e-6, nan_ok=True
  )
  assert (tmp_path / "eval" / "metrics.json").is_file()
  assert list((tmp_path / "eval" / "heatmaps").glob("*.png"))
  with pytest.raises(ValueError, match="use --mode=eval"):
    experiment.run(config, tmp_path / "eval", "train_and_eval", artifact_path=out)
  # Its programs score as the run did: another scoring beside it is refused, not ignored.
  for key, value, baked in (
    ("error_weight", 0.0, 1.0),
    ("fuse_levels", True, False),
    ("score_filter_size", 5, 3),
  ):
    other = config.copy_and_resolve_references()
    other.eval[key] = value
    with pytest.raises(
      errors.ConfigError, match=rf"config.eval.{key}={value}: .* scores with {baked}"
    ):
      experiment.run(other, tmp_path / "refused", "eval", artifact_path=out)
  with pytest.raises(errors.ConfigError, match="config.model.name='draem': .* is a 'pouta' model"):
    experiment.run(
      make_tiny_config("draem", config.data.root), tmp_path / "refused", "eval", artifact_path=out
    )
  assert not (tmp_path / "refused").exists()
  other = config.copy_and_resolve_references()
  other.data.image_size = 64
  with pytest.raises(ValueError, match=r"programs for \(32,\) only"):
    experiment.run(other, tmp_path / "eval", "eval", artifact_path=out)


def test_bad_exports_fail_before_writing(trained, tmp_path):
  config, workdir, _, _ = trained
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="exists"):
    export.export(workdir, existing)
  assert [p.name for p in existing.iterdir()] == ["keep.txt"]

  untrained = tmp_path / "untrained"
  with experiment.claimed_workdir(untrained, config):
    pass
  with pytest.raises(FileNotFoundError, match="no checkpoint to export"):
    export.export(untrained, tmp_path / "out1")
  with pytest.raises(FileNotFoundError, match="not a pouta_jax workdir"):
    export.export(tmp_path / "nowhere", tmp_path / "out2")
  with pytest.raises(ValueError, match="--image_sizes"):
    export.export(workdir, tmp_path / "out3", image_sizes=(48,))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "untrained"]
  with pytest.raises(artifact.ArtifactError, match="not an exported artifact"):
    artifact.load(workdir)


def _corrupt(art: Path, name: str, how: str) -> None:
  path = art / name
  data = path.read_bytes()
  if how == "truncate":
    path.write_bytes(data[: len(data) // 2])
  elif how == "flip":
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
  else:  # random bytes of the same length
    path.write_bytes(np.random.default_rng(0).bytes(len(data)))


@pytest.mark.parametrize("how", ["truncate", "flip", "random"])
def test_corrupted_artifact_files_are_named(trained, tmp_path, how):
  _, workdir, _, _ = trained
  exported = export.export(workdir, tmp_path / "art")
  names = sorted(p.name for p in exported.iterdir())
  manifest = json.loads((exported / artifact.MANIFEST).read_text())
  assert set(manifest["sha256"]) == set(names) - {artifact.MANIFEST}
  for name in names:
    damaged = tmp_path / f"damaged_{name}"
    damaged.mkdir()
    for other in names:
      (damaged / other).write_bytes((exported / other).read_bytes())
    _corrupt(damaged, name, how)
    # The manifest names what is wrong with itself; every other file is caught by its sha256.
    problem = "not valid JSON|format|manifest_sha256" if name == artifact.MANIFEST else "sha256"
    with pytest.raises(artifact.ArtifactError, match=rf"{damaged / name}: .*({problem})"):
      artifact.load(damaged)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
  """The trained run's artifact, exported once: tests change copies of it."""
  return export.export(trained[1], tmp_path_factory.mktemp("exported") / "art")


def _copy(art: Path, to: Path) -> Path:
  to.mkdir()
  for path in art.iterdir():
    (to / path.name).write_bytes(path.read_bytes())
  return to


def _resign(art: Path, change, *, files_too: bool = False) -> None:
  """Changes the manifest with `change(manifest)` and signs it again, as a forger would (with
  `files_too`, the files' digests as well)."""
  manifest = json.loads((art / artifact.MANIFEST).read_text())
  change(manifest)
  if files_too:
    manifest["sha256"] = {
      p.name: artifact.sha256(p) for p in sorted(art.iterdir()) if p.name != artifact.MANIFEST
    }
  manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
  (art / artifact.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("removed", [("manifest_sha256",), ("manifest_sha256", "sha256")])
def test_an_artifact_without_its_digests_is_refused(exported, tmp_path, removed):
  """Without its digest a manifest can be edited; without both, another model's weights load."""
  art = _copy(exported, tmp_path / "art")
  manifest = json.loads((art / artifact.MANIFEST).read_text())
  for key in removed:
    del manifest[key]
  manifest["thresholds"]["image"] = 1e9  # the edit the digest would have caught
  (art / artifact.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(artifact.ArtifactError, match=r"no manifest_sha256 and sha256 digests"):
    artifact.load(art)


def _set(key: str, value):
  def change(manifest: dict) -> None:
    node = manifest
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    if value is DELETE:
      del node[leaf]
    else:
      node[leaf] = value

  return change


DELETE = object()
BAD_FIELDS = {
  "nan_threshold": ("thresholds.image", float("nan"), "thresholds="),
  "inf_threshold": ("thresholds.pixel", float("inf"), "thresholds="),
  "text_threshold": ("validation_thresholds", {"image": "x", "pixel": 0.1}, "validation_thres"),
  "nan_calibration": ("calibration", {"image_threshold": float("nan")}, "calibration="),
  "negative_batch": ("batch_size", -1, "batch_size=-1"),
  "zero_batch": ("batch_size", 0, "batch_size=0"),
  "text_batch": ("batch_size", "abc", "batch_size='abc'"),
  "huge_batch": ("batch_size", 100_000_000, "batch_size=100000000"),
  "text_size": ("image_sizes", ["x"], "image_sizes=['x']"),
  "no_size": ("image_sizes", [], "image_sizes=[]"),
  "no_model": ("model", DELETE, "model=None"),
  "runtime": ("runtime", "pickle", "runtime='pickle'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_every_manifest_field_is_validated_before_use(exported, tmp_path, case):
  """Signed again after the change: the digest cannot tell, the field check does."""
  key, value, named = BAD_FIELDS[case]
  art = _copy(exported, tmp_path / "art")
  _resign(art, _set(key, value))
  with pytest.raises(artifact.ArtifactError, match=re.escape(named)):
    artifact.load(art)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/hostname", "sub/weights.npz"])
def test_manifest_file_names_never_leave_the_artifact(exported, tmp_path, name):
  art = _copy(exported, tmp_path / "art")
  _resign(art, lambda m: m["sha256"].__setitem__(name, "0" * 64))
  with pytest.raises(artifact.ArtifactError, match=r"exactly \[") as raised:
    artifact.load(art)
  assert "etc" not in str(raised.value).split("exactly")[1]  # nothing outside is named


@pytest.mark.parametrize("kind", ["outside_link", "fifo", "device"])
def test_only_regular_files_inside_the_artifact_are_opened(exported, tmp_path, kind):
  """A link out of the artifact, a FIFO or /dev/zero as weights.npz: refused before any read
  (a FIFO or /dev/zero read until killed)."""
  art = _copy(exported, tmp_path / "art")
  weights = art / artifact.WEIGHTS
  weights.unlink()
  if kind == "outside_link":
    (tmp_path / "elsewhere.npz").write_bytes((exported / artifact.WEIGHTS).read_bytes())
    weights.symlink_to(tmp_path / "elsewhere.npz")
    expected = "leads outside the artifact folder"
  elif kind == "fifo":
    os.mkfifo(weights)
    expected = "not a regular file"
  else:
    weights.symlink_to("/dev/zero")
    expected = "leads outside the artifact folder"
  with pytest.raises(artifact.ArtifactError, match=expected):
    artifact.load(art)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


@pytest.mark.parametrize("how", ["bomb", "missing_key", "other_shape", "other_dtype"])
def test_weights_are_checked_against_the_programs_before_they_are_read(exported, tmp_path, how):
  art = _copy(exported, tmp_path / "art")
  with np.load(art / artifact.WEIGHTS) as stored:
    arrays = dict(stored)
  key = sorted(arrays)[0]
  if how == "bomb":
    content = npz_bomb(arrays, key)
    expected = rf"{re.escape(key)} is float32 \(1073741824,\)"
  else:
    if how == "missing_key":
      del arrays[key]
      expected = rf"missing {re.escape(key)}"
    elif how == "other_shape":
      arrays[key] = np.zeros(arrays[key].shape + (2,), arrays[key].dtype)
      expected = rf"{re.escape(key)} is float32 \("
    else:
      arrays[key] = arrays[key].astype(np.float64)
      expected = rf"{re.escape(key)} is float64"
    content = _npz(arrays)
  (art / artifact.WEIGHTS).write_bytes(content)
  _resign(art, lambda m: None, files_too=True)
  with pytest.raises(artifact.ArtifactError, match=expected):
    artifact.load(art)


def test_a_deeply_nested_manifest_is_named_not_a_recursion_error(exported, tmp_path):
  art = _copy(exported, tmp_path / "art")
  (art / artifact.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(artifact.ArtifactError, match=r"artifact.json: not valid JSON"):
    artifact.load(art)


def test_calibrating_a_read_only_artifact_names_it_and_changes_nothing(
  exported, dataset_root, tmp_path, monkeypatch
):
  art = _copy(exported, tmp_path / "art")
  before = (art / artifact.MANIFEST).read_bytes()

  def read_only(path, data):  # root writes anywhere: refuse as a read-only folder would
    raise PermissionError(13, "Read-only file system", str(path))

  monkeypatch.setattr(files, "write_atomic", read_only)
  good = dataset_root / "weave" / "test" / "good"
  with pytest.raises(errors.WorkdirError, match=rf"{art}: cannot write its artifact.json"):
    calibrate.calibrate(art, str(good), 0.25)
  assert (art / artifact.MANIFEST).read_bytes() == before


@pytest.mark.parametrize("weight", ["0.5", -1, None])
def test_a_crafted_error_weight_in_the_manifest_is_named(trained, tmp_path, weight):
  """A manifest re-signed after its error weight was changed to a non-weight: refused when the
  predictor would scale its maps by it."""
  _, workdir, _, _ = trained
  exported = export.export(workdir, tmp_path / "art")
  manifest = json.loads((exported / artifact.MANIFEST).read_text())
  manifest["config"]["eval"]["error_weight"] = weight
  manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
  (exported / artifact.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(artifact.ArtifactError, match=r"config.eval.error_weight .* not a weight"):
    predict.from_artifact(exported)


def test_outputs_are_readable_as_any_file_the_user_creates(trained, tmp_path):
  _, workdir, _, _ = trained
  exported = export.export(workdir, tmp_path / "art")
  mask = files.umask()
  outputs = [workdir / n for n in ("config.json", "metrics.json", "results.md", "thresholds.json")]
  outputs += [workdir / "scalars.jsonl", *(workdir / "heatmaps").glob("*.png")]
  outputs += list(exported.iterdir())
  assert len(outputs) > 8
  for path in outputs:
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path
  assert stat.S_IMODE(os.stat(exported).st_mode) == 0o777 & ~mask


def _predict_cli(*args: str) -> dict:
  result = subprocess.run(
    [sys.executable, "-m", "pouta_jax.predict", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return {
    row["path"]: float(row["image_score"])
    for row in csv.DictReader(open(args[-1].removeprefix("--out=") + "/scores.csv"))
  }


def test_predict_command_scores_images_with_an_artifact_or_a_workdir(
  trained, dataset_root, tmp_path
):
  _, workdir, _, _ = trained
  art = artifact.load(export.export(workdir, tmp_path / "art"))
  images = dataset_root / "weave" / "test"
  from_artifact = _predict_cli(f"--artifact={art.path}", f"--input={images}", f"--out={tmp_path}/a")
  predict.predict(predict.from_workdir(workdir), str(images), tmp_path / "w")  # in-process
  with open(tmp_path / "w" / "scores.csv") as f:
    from_workdir = {row["path"]: float(row["image_score"]) for row in csv.DictReader(f)}
  paths = sorted(from_artifact)
  assert paths == sorted(from_workdir) and len(paths) == len(list(images.rglob("*.png")))
  # The scores are the model's on the images read as in training.
  pixels = np.stack([load_image(p, art.image_sizes[0]) for p in paths]) / np.float32(255)
  _, want = art.predict(pixels.astype(np.float32))
  np.testing.assert_allclose([from_artifact[p] for p in paths], want, atol=1e-5)
  np.testing.assert_allclose([from_workdir[p] for p in paths], want, atol=1e-5)
  summary = json.loads((tmp_path / "a" / "predict.json").read_text())
  assert summary["threshold"] == art.thresholds["image"]
  assert summary["threshold_rule"].startswith("oracle: F1-max on the training run's test set")


def test_calibrated_threshold_keeps_its_rate_on_good_images_and_predict_uses_it(
  trained, dataset_root, tmp_path
):
  _, workdir, _, _ = trained
  path = export.export(workdir, tmp_path / "art")
  good = dataset_root / "weave" / "test" / "good"
  num_good = len(list(good.glob("*.png")))
  # One unreadable image: refused, naming it, and the artifact is left as it was.
  bad = tmp_path / "bad"
  bad.mkdir()
  for image in good.glob("*.png"):
    (bad / image.name).write_bytes(image.read_bytes())
  (bad / "broken.png").write_bytes(b"not an image")
  before = (path / artifact.MANIFEST).read_bytes()
  with pytest.raises(DataError, match=r"broken.png: not a readable image"):
    calibrate.calibrate(path, str(bad), 0.25)
  assert (path / artifact.MANIFEST).read_bytes() == before

  result = subprocess.run(
    [sys.executable, "-m", "pouta_jax.calibrate", f"--artifact={path}", f"--good={good}"]
    + ["--fpr=0.25"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  calibration = artifact.load(path).calibration  # the manifest's digest was updated with it
  assert calibration["num_good"] == num_good and calibration["target_fpr"] == 0.25
  assert calibration["observed_fpr"] <= 0.25  # tied scores can leave it below the target
  flagged_any = calibration["good_scores"]["max"] >= calibration["image_threshold"]
  assert flagged_any == (calibration["observed_fpr"] > 0)

  # predict's default is now the calibrated threshold: on the same images, the same rate.
  summary = predict.predict(predict.from_artifact(path), str(good), tmp_path / "scored")
  assert summary["threshold"] == calibration["image_threshold"]
  assert summary["threshold_rule"].startswith("calibrated: false-positive rate ")
  assert "(target 0.25) on 4 good images" in summary["threshold_rule"]
  with open(tmp_path / "scored" / "scores.csv") as f:
    decisions = [row["decision"] for row in csv.DictReader(f)]
  assert decisions.count("anomalous") == calibration["observed_fpr"] * num_good
  oracle = predict.from_artifact(path).threshold("oracle")
  assert oracle[0] == artifact.load(path).thresholds["image"]

  # A calibration changed by hand (its digest not) is caught at load.
  manifest = json.loads((path / artifact.MANIFEST).read_text())
  manifest["calibration"]["image_threshold"] = 0.0
  (path / artifact.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(artifact.ArtifactError, match="does not match its manifest_sha256"):
    artifact.load(path)
  # A crafted one, its digest made to match, is named, not a KeyError.
  manifest["calibration"] = {"image_threshold": "high"}
  manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
  (path / artifact.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(artifact.ArtifactError, match="calibration=.* a finite image_threshold"):
    predict.from_artifact(path)


def test_a_damaged_thresholds_file_is_named(tmp_path):
  (tmp_path / "thresholds.json").write_text('{"weave": ')  # a write cut short
  with pytest.raises(DataError, match=r"thresholds.json: not valid JSON .*evaluate the run again"):
    export.read_thresholds(tmp_path, "weave")
  assert export.read_thresholds(tmp_path / "never_evaluated", "weave") == {}
