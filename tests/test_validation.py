"""The validation split (data.val_fraction): held-out normal images and synthesised anomalies,
validation metrics while training, deployment thresholds from it; its bad inputs."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from pouta_jax import artifact, experiment, export, metrics, predict, train
from pouta_jax.config import validate
from pouta_jax.data import DataError, category_folder, folder as folder_lib, validation
from pouta_jax.errors import ConfigError
from tests.conftest import make_tiny_config, tensorboard_records

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(75)

CATEGORIES = ("weave", "pill")


def _config(root, fraction=0.25):
  config = make_tiny_config("draem", root)
  config.data.val_fraction = fraction
  return config


def test_the_split_is_seeded_and_disjoint_and_few_shot_draws_from_the_rest(dataset_root):
  config = _config(dataset_root)
  everything = folder_lib.scan(dataset_root, "weave")
  split = category_folder(config)
  assert len(split.val) == 2 and len(split.train) == 6  # round(0.25 x 8)
  assert sorted(split.train + split.val) == sorted(everything.train)
  assert list(split.val) == sorted(split.val) and list(split.train) == sorted(split.train)
  config.train.seed = 5  # the training seed does not move the split
  assert category_folder(config).val == split.val
  config.data.val_seed = 1
  assert category_folder(config).val != split.val
  config.data.val_seed, config.data.few_shot = 0, 4
  few = category_folder(config)
  assert few.val == split.val and set(few.train) < set(split.train) and len(few.train) == 4
  config.data.few_shot = 7
  with pytest.raises(DataError, match=r"few_shot=7: only 6 training images .* after 2 held out"):
    category_folder(config)


def test_the_validation_set_is_deterministic_and_labelled(dataset_root):
  config = _config(dataset_root)
  config.data.categories = CATEGORIES
  folders = [category_folder(config, c) for c in CATEGORIES]
  first = validation.validation_sets(config, folders)
  again = validation.validation_sets(config, folders)
  kinds = list(config.data.val_defects)
  assert kinds == list(validation.DEFECTS) == ["synthetic", "removed", "misplaced", "spot"]
  rows = 1 + len(kinds)  # each held-out image, then its anomalies
  for a, b, folder in zip(first, again, folders):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
    assert a["image"].shape == (2 * rows, 32, 32, 3) and a["image"].dtype == np.uint8
    assert list(a["defect"]) == ["good", *kinds] * 2
    np.testing.assert_array_equal(a["label"], [0, 1, 1, 1, 1] * 2)
    for i, path in enumerate(folder.val):
      image = a["image"][i * rows]  # the held-out file as it is
      np.testing.assert_array_equal(image, folder_lib.load_image(path, 32))
      assert set(a["path"][i * rows : (i + 1) * rows]) == {str(path)}
      assert a["name"][i * rows + 2] == f"removed/{path.stem}"
      assert not a["mask"][i * rows].any()
      for k in range(1, rows):  # each anomaly changes its image inside its mask only
        mask = a["mask"][i * rows + k]
        changed = (a["image"][i * rows + k] != image).any(-1)
        assert mask.any() and changed.any() and not (changed & ~mask).any(), kinds[k - 1]
    # A spot is tiny: at most 3% of the image size as its radius.
    spots = a["mask"][a["defect"] == "spot"]
    assert spots.sum(axis=(1, 2)).max() <= np.pi * (0.03 * 32) ** 2 + 4
  # The kinds listed do not change each other's draws.
  config.data.val_defects = ("spot",)
  spot_only = validation.validation_set(config, folders[0])
  assert list(spot_only["defect"]) == ["good", "spot"] * 2
  kept = np.isin(first[0]["defect"], ["good", "spot"])
  np.testing.assert_array_equal(spot_only["image"], first[0]["image"][kept])
  # Nothing held out: no validation set.
  config.data.val_fraction = 0.0
  assert validation.validation_sets(config, [category_folder(config)]) is None


def test_removed_structure_shows_the_background_of_objects_and_blurs_textures():
  rng = np.random.default_rng(0)
  texture = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  blurred, mask = validation.DEFECTS["removed"](np.random.default_rng(1), texture)
  inside = blurred[mask]
  assert inside.std() < 0.5 * (texture[mask] / 255.0).std()  # structure gone, not repainted
  obj = np.full((32, 32, 3), 20, np.uint8)
  obj[8:24, 8:24] = rng.integers(150, 256, (16, 16, 3))
  holed, mask = validation.DEFECTS["removed"](np.random.default_rng(1), obj)
  assert mask.any() and mask[8:24, 8:24].any()  # on the object
  np.testing.assert_allclose(holed[mask], 20 / 255.0, atol=1e-6)  # the background shows


def test_an_image_without_a_visible_anomaly_is_named(dataset_root, tmp_path):
  """A flat image has no structure to remove: refused before training, naming the file."""
  config = _config(dataset_root)
  folder = category_folder(config)
  flat = tmp_path / "flat.png"
  Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(flat)
  config.data.val_defects = ("removed",)
  with pytest.raises(DataError, match=r"flat.png: no visible 'removed' validation anomaly in"):
    validation.validation_set(config, dataclasses.replace(folder, val=(flat,)))


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("data.val_fraction", 1.0, r"config.data.val_fraction=1.0: expected a share of train/good"),
    ("data.val_fraction", -0.1, r"config.data.val_fraction=-0.1: expected a share"),
    ("eval.val_every", -1, r"config.eval.val_every=-1: expected 0 \(the last step\)"),
    ("train.select", "best", r"config.train.select='best': expected one of \('last', 'best_val'\)"),
    ("train.select_metric", "iou", r"config.train.select_metric='iou': expected one of \("),
    ("data.val_fraction", 0.0, r"config.train.select='best_val': expected 'last' without a valid"),
    ("data.val_defects", ("scratch",), r"config.data.val_defects=\('scratch',\): expected dist"),
    ("data.val_defects", (), r"config.data.val_defects=\(\): expected distinct kinds"),
  ],
)
def test_bad_validation_settings_are_refused_by_name(dataset_root, key, value, message):
  config = _config(dataset_root)
  config.train.select = "best_val"
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)


@pytest.mark.parametrize(
  "fraction, message",
  [
    (0.05, r"val_fraction=0.05: holds out 0 of the 8 training images .* leaving 8"),
    (0.95, r"val_fraction=0.95: holds out 8 of the 8 training images .* leaving 0"),
  ],
)
def test_a_split_without_training_or_validation_images_writes_nothing(
  dataset_root, tmp_path, fraction, message
):
  with pytest.raises(DataError, match=message):
    experiment.run(_config(dataset_root, fraction), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_the_best_validated_variables_are_kept_per_run():
  def state(step, weights, best):
    return train.TrainState(
      step=jnp.array([step, step]),
      params={"w": jnp.array(weights, jnp.float32)},
      batch_stats={},
      opt_state=(),
      best=best,
    )

  fresh = {"params": {"w": jnp.zeros(2)}, "batch_stats": {}}
  fresh.update(metric=jnp.full(2, -jnp.inf), step=jnp.zeros(2, jnp.int32))
  best = train.kept_best(state(1, [1, 2], fresh), np.float32([0.5, 0.2])).best
  best = train.kept_best(state(2, [3, 4], best), np.float32([0.4, 0.3])).best
  np.testing.assert_array_equal(best["params"]["w"], [1, 4])  # run 0 got worse, run 1 better
  np.testing.assert_array_equal(best["step"], [1, 2])
  np.testing.assert_array_equal(best["metric"], np.float32([0.5, 0.3]))
  best = train.kept_best(state(3, [5, 6], best), np.float32([0.5, 0.3])).best  # ties keep
  np.testing.assert_array_equal(best["params"]["w"], [1, 4])
  np.testing.assert_array_equal(best["step"], [1, 2])


@pytest.fixture(scope="module")
def validated_run(dataset_root, tmp_path_factory):
  """Two categories in one program with a validation split, validated at steps 3 and 6, each
  run evaluated and exported at its best validated step."""
  config = _config(dataset_root)
  config.data.categories = CATEGORIES
  config.eval.val_every = 3
  config.train.select = "best_val"
  workdir = tmp_path_factory.mktemp("validated")
  return config, workdir, experiment.run(config, workdir)


def _records(folder):
  return [json.loads(line) for line in (folder / "scalars.jsonl").read_text().splitlines()]


def test_validation_metrics_are_logged_while_training(validated_run):
  _, workdir, results = validated_run
  final = {}
  for category in CATEGORIES:
    records = {r["step"]: r for r in _records(workdir / category)}
    assert [s for s, r in records.items() if "val/pixel_ap" in r] == [3, 6]
    assert "val/pixel_ap" not in records[2]  # log_every 2: a training record only
    final[category] = records[6]
    # The run is evaluated with its best validated variables (pixel_ap; ties keep the earlier):
    # on the validation set, they score what they scored at that step.
    best = 3 if records[3]["val/pixel_ap"] >= records[6]["val/pixel_ap"] else 6
    reported = results["validation"]["draem"][category]
    for name in ("image_auroc", "pixel_ap", "aupro"):
      assert records[best][f"val/{name}"] == pytest.approx(reported[name], abs=1e-6)
    assert export.trained_model(workdir, category).step == best
    written = json.loads((workdir / category / "metrics.json").read_text())["draem"]
    assert written["validation"][category] == pytest.approx(reported)
    # Each kind of validation anomaly against the held-out normal images.
    kinds = written["validation_by_defect"][category]
    assert set(kinds) == set(validation.DEFECTS)
    assert all(set(k) == set(reported) and 0 <= k["image_auroc"] <= 1 for k in kinds.values())
    records = tensorboard_records(workdir / category / "tensorboard")
    assert [step for tag, step, _ in records if tag == "val/pixel_ap"] == [3, 6]
    # The test metrics and heatmaps after training, at the run's last step.
    assert ("eval/pixel_ap", 6, "simple_value") in records
    assert any(tag.startswith("eval/heatmaps/") and kind == "image" for tag, _, kind in records)
  program = {r["step"]: r for r in _records(workdir)}[6]  # the program's: the mean of its runs
  assert program["val/pixel_ap"] == pytest.approx(
    np.mean([final[c]["val/pixel_ap"] for c in CATEGORIES])
  )


def test_deployment_thresholds_come_from_validation(validated_run, tmp_path):
  config, workdir, _ = validated_run
  found = json.loads((workdir / "pill" / "thresholds.json").read_text())["pill"]
  assert set(found) == {"oracle", "validation"}
  # The validation thresholds are F1-max of the exported model's scores on the validation set.
  art = artifact.load(export.export(workdir, tmp_path / "pill", run="pill"))
  val_set = validation.validation_sets(config, [category_folder(config, c) for c in CATEGORIES])[1]
  maps, scores = art.predict(art.preprocess(val_set["image"]))
  # The image threshold weighs both classes alike (more anomalous images than held-out ones).
  balance = np.sum(val_set["label"] == 0) / np.sum(val_set["label"] == 1)
  assert balance < 1
  assert found["validation"]["image"] == pytest.approx(
    metrics.f1_max(val_set["label"], scores, positive_weight=balance)[1], rel=1e-5
  )
  assert found["validation"]["pixel"] == pytest.approx(
    metrics.f1_max(val_set["mask"], maps)[1], rel=1e-5
  )
  assert art.validation_thresholds == found["validation"]
  assert art.thresholds == found["oracle"]
  # The test set's F1 at the validation thresholds (what a deployment gets), in the metrics and
  # results; scikit-learn as the oracle, on the artifact's maps of the test images.
  test_set = folder_lib.load_test_set(category_folder(config, "pill"), config.data.image_size)
  maps, scores = art.predict(art.preprocess(test_set["image"]))
  tested = json.loads((workdir / "pill" / "metrics.json").read_text())["draem"]["pill"]
  for kind, labels, values in (
    ("image", test_set["label"], np.asarray(scores)),
    ("pixel", test_set["mask"].ravel(), np.asarray(maps).ravel()),
  ):
    threshold = found["validation"][kind]
    # The artifact's values differ from the run's by float rounding (within 1e-5: the check of
    # the thresholds above): only items that close to the threshold may fall on the other side,
    # and each moves F1 = 2tp / (tp + fp + positives) by at most 2 / positives.
    near = int(np.sum(np.abs(values - threshold) <= 1e-5 * max(1.0, abs(threshold))))
    assert tested[f"{kind}_f1_at_val_thr"] == pytest.approx(
      f1_score(labels, values >= threshold), abs=1e-9 + 2 * near / np.sum(labels)
    )
  assert "**pixel_f1_at_val_thr** (%)" in (workdir / "pill" / "results.md").read_text()
  # predict takes the validation threshold before the oracle one, and says so.
  chosen = predict.from_artifact(art.path).threshold()
  assert chosen == (found["validation"]["image"], predict.VALIDATION_RULE)
  from_workdir = predict.from_workdir(workdir, "pill")
  assert from_workdir.threshold() == chosen
  assert from_workdir.threshold("oracle")[0] == found["oracle"]["image"]
