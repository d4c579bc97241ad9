"""End to end: the command line, outputs, resume/eval, and every bad input named by the issue."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pouta_jax import artifact, evaluate, experiment, export, predict, report
from pouta_jax.data import DataError, category_folder
from pouta_jax.data.folder import load_test_set
from pouta_jax.errors import ConfigError
from tests.conftest import make_tiny_config

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(60)

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "pouta_jax.main", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _tiny_flags(dataset_root, workdir):
  return [
    f"--config={REPO}/configs/draem.py:pill,tiny",
    f"--workdir={workdir}",
    f"--config.data.root={dataset_root}",
    "--config.model.base_width=4",
    "--config.data.image_size=32",
    "--config.data.batch_size=4",
    "--config.train.num_steps=4",
    "--config.train.checkpoint_every=2",
    "--config.eval.score_filter_size=3",
    "--config.eval.num_heatmaps=3",
  ]


def test_command_line_train_and_eval_then_eval(dataset_root, tmp_path):
  workdir = tmp_path / "run"
  result = _cli(*_tiny_flags(dataset_root, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert set(metrics) == {"draem"}
  assert set(metrics["draem"]) == {
    "pill",
    "mean",
    "params",
    "flops_per_image",
    "flops",
    "latency_ms",
    "by_defect",
  }
  by_defect = metrics["draem"]["by_defect"]["pill"]
  assert set(by_defect) == {p.name for p in (dataset_root / "pill" / "test").iterdir()} - {"good"}
  assert "| draem | pill | crack |" in (workdir / "results.md").read_text()
  params = metrics["draem"]["params"]
  assert params["total"] == params["reconstructive"] + params["discriminative"] > 0
  assert metrics["draem"]["flops_per_image"] > 0 and metrics["draem"]["latency_ms"] > 0
  flops = metrics["draem"]["flops"]
  assert flops["total"] == metrics["draem"]["flops_per_image"]
  assert flops["reconstructive"] + flops["discriminative"] + flops["scoring"] == flops["total"]
  assert set(metrics["draem"]["pill"]) == set(report.METRIC_COLUMNS)
  assert all(0 <= v <= 1 for v in metrics["draem"]["pill"].values())
  assert json.loads((workdir / "config.json").read_text())["data"]["category"] == "pill"
  assert "| draem |" in (workdir / "results.md").read_text()
  assert len(list((workdir / "heatmaps").glob("*.png"))) == 3
  assert sorted(p.name for p in (workdir / "curves").iterdir()) == [
    "pr.png",
    "roc.png",
    "scores.png",
  ]
  assert (workdir / "checkpoints" / "4").is_dir()
  # One row per test image; its scores are those the image metrics were computed from.
  with open(workdir / "test_scores.csv") as f:
    rows = list(csv.DictReader(f))
  test_images = sorted((dataset_root / "pill" / "test").rglob("*.png"))
  assert sorted(r["path"] for r in rows) == [str(p) for p in test_images]
  assert all(r["label"] == str(int(r["defect"] != "good")) for r in rows)
  labels, scores = [int(r["label"]) for r in rows], [float(r["image_score"]) for r in rows]
  assert metrics["draem"]["pill"]["image_auroc"] == pytest.approx(
    roc_auc_score(labels, scores), abs=1e-6
  )
  assert metrics["draem"]["pill"]["image_ap"] == pytest.approx(
    average_precision_score(labels, scores), abs=1e-6
  )

  # Evaluated again, with the reconstruction error beside the model (an output-only key: the
  # stored run accepts it): the model's metrics as they were, the peer's against an oracle.
  (workdir / "metrics.json").unlink()
  flags = _tiny_flags(dataset_root, workdir)
  result = _cli(*flags, "--mode=eval", "--config.eval.reconstruction_error=True")
  assert result.returncode == 0, result.stderr[-3000:]
  again = json.loads((workdir / "metrics.json").read_text())
  assert again["draem"]["pill"] == metrics["draem"]["pill"]
  trained = export.trained_model(workdir)
  test_set = load_test_set(category_folder(trained.config), 32)
  # The peer's maps are |x - reconstruction| averaged over the channels ...
  predict_error = evaluate.model_predict_fn(
    trained.model, trained.variables, 3, source="reconstruction_error"
  )
  error, _ = evaluate.predict(predict_error, test_set["image"], trained.config.eval.batch_size)
  images = test_set["image"].astype(np.float32) / 255
  restored = trained.model.apply(trained.variables, images, train=False)["reconstruction"]
  # atol: ~100 float32 ulps at values up to 1, the rounding of the network's layers in another
  # program (eager, unpadded); a map that is not the error differs by far more.
  np.testing.assert_allclose(error, np.abs(images - np.asarray(restored)).mean(-1), atol=1e-5)
  # ... and its metrics are theirs (the run's programs and batches: the same floats).
  peer = again["draem_recon_error"]["pill"]["pixel_ap"]
  assert peer == pytest.approx(
    average_precision_score(test_set["mask"].ravel(), error.ravel()), abs=1e-9
  )
  assert abs(peer - metrics["draem"]["pill"]["pixel_ap"]) > 1e-3  # another map than the model's
  assert "| draem_recon_error | pill | crack |" in (workdir / "results.md").read_text()

  # The error in the score: evaluated again with eval.error_weight (a changed evaluation, so
  # named in allow_changes), the map is the model's plus the weighted error; the export too.
  config = trained.config
  config.eval.error_weight = 0.5
  with pytest.raises(ConfigError, match="config.eval.error_weight: stored 0.0, now 0.5"):
    experiment.run(config, workdir, mode="eval")
  weighted = experiment.run(config, workdir, mode="eval", allow_changes=["eval.error_weight"])
  own_map = trained.model.apply(trained.variables, images, train=False)["anomaly_map"]
  expected = np.asarray(own_map) + 0.5 * error
  predict_weighted = evaluate.model_predict_fn(
    trained.model, trained.variables, 3, error_weight=0.5
  )
  maps, _ = evaluate.predict(predict_weighted, test_set["image"], config.eval.batch_size)
  np.testing.assert_allclose(maps, expected, atol=1e-5)  # as the error's maps above
  # The metrics are those maps' (the run's programs and batches: the same floats).
  weighted_ap = weighted["metrics"]["draem"]["pill"]["pixel_ap"]
  assert weighted_ap == pytest.approx(
    average_precision_score(test_set["mask"].ravel(), maps.ravel()), abs=1e-9
  )
  assert abs(weighted_ap - metrics["draem"]["pill"]["pixel_ap"]) > 1e-3
  art = artifact.load(export.export(workdir, tmp_path / "artifact"))
  assert "plus 0.5 x the reconstruction error" in art.manifest["outputs"]["anomaly_map"]
  np.testing.assert_allclose(art.predict(images)[0], expected, atol=1e-5)
  # Scoring new images: maps stored over [0, 1.5] (test_predict.py), from either source.
  assert predict.from_artifact(art.path).map_max == predict.from_workdir(workdir).map_max == 1.5


@pytest.mark.parametrize("key, value", [("reconstruction_error", True), ("error_weight", 0.5)])
def test_reconstruction_error_needs_a_model_that_reconstructs(dataset_root, tmp_path, key, value):
  config = make_tiny_config("prn", dataset_root)
  config.backbone.pretrained = False
  config.eval[key] = value
  with pytest.raises(ConfigError, match=f"eval.{key}={value}: model 'prn' has no reconstruction"):
    experiment.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["reconstruction_error", "level_maps"])
def test_an_artifact_gives_no_peer_maps(dataset_root, tmp_path, key):
  """An exported artifact gives anomaly maps only: a peer of them asked for is refused before
  the artifact is read or anything written."""
  config = make_tiny_config("pouta", dataset_root)
  config.eval[key] = True
  with pytest.raises(ConfigError, match=f"eval.{key}=True: an exported artifact gives anomaly"):
    experiment.run(config, tmp_path / "run", mode="eval", artifact_path=tmp_path / "art")
  assert not (tmp_path / "run").exists()


def test_command_line_rejects_unknown_config_key(dataset_root, tmp_path):
  result = _cli(*_tiny_flags(dataset_root, tmp_path / "run"), "--config.train.nope=1")
  assert result.returncode != 0
  assert "--config.train.nope=1: config.train has no key 'nope'" in result.stderr
  assert not (tmp_path / "run").exists()


def _assert_nothing_written(workdir):
  assert not workdir.exists() or not any(
    (workdir / name).exists() for name in ("metrics.json", "results.md", "checkpoints")
  )


def test_missing_dataset_path(tiny_config, tmp_path):
  tiny_config.data.root = str(tmp_path / "no_such_dataset")
  with pytest.raises(DataError, match="no_such_dataset does not exist"):
    experiment.run(tiny_config, tmp_path / "run")
  _assert_nothing_written(tmp_path / "run")


def test_corrupt_training_image_and_missing_mask(tiny_config, dataset_root, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(dataset_root / "weave", root / "weave")
  tiny_config.data.root = str(root)
  bad = root / "weave" / "train" / "good" / "002.png"
  bad.write_bytes(bad.read_bytes()[:100])
  with pytest.raises(DataError, match="002.png"):
    experiment.run(tiny_config, tmp_path / "run")
  shutil.copy(root / "weave" / "train" / "good" / "001.png", bad)
  (root / "weave" / "ground_truth" / "stain" / "000_mask.png").unlink()
  with pytest.raises(DataError, match=r"no mask, e\.g\. \S+stain/000\.png .*require_masks"):
    experiment.run(tiny_config, tmp_path / "run")
  _assert_nothing_written(tmp_path / "run")


def test_an_image_level_dataset_gets_image_metrics_and_says_why_not_pixel_ones(
  tiny_config, dataset_root, tmp_path
):
  root = tmp_path / "data"
  shutil.copytree(dataset_root / "weave", root / "weave", ignore=shutil.ignore_patterns("ground*"))
  tiny_config.data.root, tiny_config.train.num_steps = str(root), 2
  workdir = tmp_path / "run"
  results = experiment.run(tiny_config, workdir)["metrics"]["draem"]["weave"]
  written = json.loads((workdir / "metrics.json").read_text())["draem"]
  for name in ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max"):
    assert results[name] is None and written["weave"][name] is None
    assert written["mean"][name] is None
  assert "no ground-truth masks" in written["notes"]["weave"]
  with open(workdir / "test_scores.csv") as f:
    rows = list(csv.DictReader(f))
  labels, scores = [int(r["label"]) for r in rows], [float(r["image_score"]) for r in rows]
  assert written["weave"]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
  table = (workdir / "results.md").read_text()
  assert "| draem | n/a |" in table and f"n/a: {report.IMAGE_LEVEL_REASON}." in table
  thresholds = json.loads((workdir / "thresholds.json").read_text())["weave"]["oracle"]
  assert thresholds["pixel"] is None and thresholds["image"] is not None
  assert (workdir / "curves" / "roc.png").is_file()


def test_image_size_not_divisible(tiny_config, tmp_path):
  tiny_config.data.image_size = 40
  with pytest.raises(ValueError, match="config.data.image_size=40"):
    experiment.run(tiny_config, tmp_path / "run")
  _assert_nothing_written(tmp_path / "run")


def test_unwritable_workdir(tiny_config, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="not writable"):
    experiment.run(tiny_config, blocker / "run")


def _store(workdir, config, allow_changes=()):
  with experiment.claimed_workdir(workdir, config, allow_changes):
    pass


def _bind(workdir, config) -> None:
  """Stores `config` and marks the workdir's first checkpoint, which binds it to the config."""
  _store(workdir, config)
  (workdir / "checkpoints" / "1").mkdir(parents=True)


def test_workdir_of_another_model_is_refused(tiny_config, tmp_path):
  _bind(tmp_path, tiny_config)
  stored = (tmp_path / "config.json").read_text()
  other = tiny_config.copy_and_resolve_references()
  other.model.base_width = 8
  with pytest.raises(ValueError, match=r"config.model.base_width: stored 4, now 8"):
    experiment.run(other, tmp_path)
  assert (tmp_path / "config.json").read_text() == stored


def test_workdir_of_an_older_version_still_resumes(tiny_config, tmp_path):
  _bind(tmp_path, tiny_config)
  stored = json.loads((tmp_path / "config.json").read_text())
  del stored["data"]["categories"], stored["model"]["base_width"]  # keys it did not have yet
  (tmp_path / "config.json").write_text(json.dumps(stored))
  _store(tmp_path, tiny_config)
  stored["data"]["category"] = "pill"  # but a key it had must still match
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="config.data.category: stored 'pill', now 'weave'"):
    _store(tmp_path, tiny_config)


def test_eval_without_checkpoint(tiny_config, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    experiment.run(tiny_config, tmp_path, mode="eval")
  assert not (tmp_path / "metrics.json").exists()


def test_untrained_baseline_is_reported(tiny_config, tmp_path):
  tiny_config.train.num_steps = 2
  results = experiment.run(tiny_config, tmp_path, include_untrained=True)
  assert set(results["metrics"]) == {"draem", "draem_untrained"}
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert set(metrics["draem_untrained"]) == {"weave", "mean", "by_defect"}  # no profile
