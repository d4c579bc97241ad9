"""Several categories in one program: parameters stacked over a category axis, the step vmapped
over it; equal to separate per-category runs with the same seed."""

import json

import jax
import numpy as np
import pytest

from pouta_jax import checkpoint, config as config_lib, experiment, export, train
from tests.conftest import make_tiny_config

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(53)

CATEGORIES = ("weave", "pill")


def _stacked_config(root):
  config = make_tiny_config("draem", root)
  config.data.categories = CATEGORIES
  config.train.log_every = 1
  return config


def _final_state(config, workdir):
  template = train.setup(config, [8] * len(config_lib.categories_of(config))).state
  mngr = checkpoint.manager(workdir, 2)
  state = checkpoint.restore_latest(mngr, template)
  mngr.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def stacked_run(dataset_root, tmp_path_factory):
  config = _stacked_config(dataset_root)
  workdir = tmp_path_factory.mktemp("stacked")
  return config, workdir, experiment.run(config, workdir)


def test_stacked_run_equals_separate_runs(stacked_run, dataset_root, tmp_path):
  config, workdir, results = stacked_run
  stacked = _final_state(config, workdir)
  assert stacked.params["reconstructive"]["head"]["Conv_0"]["kernel"].shape[0] == 2
  logged = [json.loads(line) for line in (workdir / "scalars.jsonl").read_text().splitlines()]
  for i, category in enumerate(CATEGORIES):
    alone = make_tiny_config("draem", dataset_root)
    alone.data.category = category
    alone.train.log_every = 1
    experiment.run(alone, tmp_path / category, mode="train")
    separate = _final_state(alone, tmp_path / category)
    alone_logged = [
      json.loads(line) for line in (tmp_path / category / "scalars.jsonl").read_text().splitlines()
    ]
    stacked_losses = [r[f"loss/{category}"] for r in logged]
    alone_losses = [r["loss"] for r in alone_logged]
    # Same data, same initialisation: the first loss agrees to float32 rounding; later ones
    # drift as Adam's sign-like early steps amplify that rounding in this tiny network (the
    # step itself is exact in float64: test_sharding.py).
    np.testing.assert_allclose(stacked_losses[0], alone_losses[0], rtol=1e-5)
    np.testing.assert_allclose(stacked_losses, alone_losses, rtol=3e-2)
    assert int(stacked.step[i]) == int(separate.step) == config.train.num_steps


def test_stacked_outputs_cover_every_category(stacked_run):
  config, workdir, results = stacked_run
  assert set(results["metrics"]["draem"]) == set(CATEGORIES)
  metrics = json.loads((workdir / "metrics.json").read_text())["draem"]
  assert set(metrics) >= set(CATEGORIES) | {"mean"}
  thresholds = json.loads((workdir / "thresholds.json").read_text())
  assert set(thresholds) == set(CATEGORIES)
  for category in CATEGORIES:
    assert list((workdir / "heatmaps" / category).glob("*.png"))
  logged = json.loads((workdir / "scalars.jsonl").read_text().splitlines()[-1])
  assert logged["loss"] == pytest.approx(np.mean([logged[f"loss/{c}"] for c in CATEGORIES]))


def test_export_one_category_of_a_stacked_run(stacked_run, tmp_path):
  config, workdir, results = stacked_run
  with pytest.raises(ValueError, match=r"--category='': .* trained \['weave', 'pill'\]"):
    export.export(workdir, tmp_path / "a")
  from pouta_jax import artifact

  art = artifact.load(export.export(workdir, tmp_path / "pill", category="pill"))
  assert art.manifest["category"] == "pill"
  assert art.manifest["metrics"] == pytest.approx(results["metrics"]["draem"]["pill"], nan_ok=True)
