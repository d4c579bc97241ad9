"""Several runs in one program (categories x seeds): parameters stacked over a run axis; each
run equal to a separate run with its settings, its outputs in its own folder."""

import csv
import io
import json

import jax
import numpy as np
import pytest

from pouta_jax import checkpoint, experiment, export, runs, sweep, train
from tests.conftest import make_tiny_config

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(90)

CATEGORIES = ("weave", "pill")


def _stacked_config(root):
  config = make_tiny_config("draem", root)
  config.data.categories = CATEGORIES
  config.stack.seeds = 2
  config.train.log_every = 1
  # The accelerators' loop, through the whole command; the CPU's (auto: unroll) trains the
  # stacks of test_validation.py and test_multihost.py. Compiling 4 unrolled copies of the step
  # took 58 s here.
  config.train.category_loop = "vmap"
  return config


RUNS = [f"train.seed={seed}/{category}" for seed in (0, 1) for category in CATEGORIES]


def _final_state(config, workdir):
  template = train.setup(config, [8] * len(runs.runs_of(config))).state
  mngr = checkpoint.manager(workdir, 2)
  state = checkpoint.restore_latest(mngr, template)
  mngr.close()
  return jax.device_get(state)


def _scalars(folder):
  return [json.loads(line) for line in (folder / "scalars.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stacked_run(dataset_root, tmp_path_factory):
  config = _stacked_config(dataset_root)
  workdir = tmp_path_factory.mktemp("stacked")
  return config, workdir, experiment.run(config, workdir)


def test_stacked_runs_equal_separate_runs(stacked_run, dataset_root, tmp_path):
  config, workdir, results = stacked_run
  stacked = _final_state(config, workdir)
  assert stacked.params["reconstructive"]["head"]["Conv_0"]["kernel"].shape[0] == len(RUNS)
  logged = _scalars(workdir)
  # The stack's first run against a separate run with its default seed (one is enough here:
  # test_sharding.py checks every run of a stack against its separate run).
  category, name = "weave", "train.seed=0/weave"
  alone = make_tiny_config("draem", dataset_root)
  alone.data.category = category
  alone.train.log_every = 1
  alone.train.category_loop = "vmap"  # as the stack's config says (one run unrolls)
  experiment.run(alone, tmp_path / category)
  separate = _final_state(alone, tmp_path / category)
  stacked_losses = [r[f"loss/{name}"] for r in logged]
  alone_losses = [r["loss"] for r in _scalars(tmp_path / category)]
  # Same data, same initialisation: the first loss agrees to float32 rounding; later ones
  # drift as Adam's sign-like early steps amplify that rounding in this tiny network (the
  # steps themselves are exact in float64: test_sharding.py).
  np.testing.assert_allclose(stacked_losses[0], alone_losses[0], rtol=1e-5)
  np.testing.assert_allclose(stacked_losses, alone_losses, rtol=3e-2)
  assert int(stacked.step[0]) == int(separate.step[0]) == config.train.num_steps
  # The run's own folder holds what the separate run wrote, with its own scalars.
  folder = workdir / name
  assert (folder / "config.json").read_text() == (tmp_path / category / "config.json").read_text()
  assert sorted(p.name for p in folder.iterdir()) == sorted(
    p.name for p in (tmp_path / category).iterdir() if p.name not in ("checkpoints", ".lock")
  )
  assert [r["loss"] for r in _scalars(folder)] == stacked_losses
  mine = json.loads((folder / "metrics.json").read_text())["draem"][category]
  theirs = json.loads((tmp_path / category / "metrics.json").read_text())["draem"][category]
  assert set(mine) == set(theirs)
  # The seeds take effect: the seed-1 runs start from another initialisation.
  assert logged[0]["loss/train.seed=1/weave"] != logged[0]["loss/train.seed=0/weave"]


def test_each_run_writes_its_outputs_in_its_folder(stacked_run):
  config, workdir, results = stacked_run
  assert set(results["metrics"]["draem"]) == set(RUNS)
  for name in RUNS:
    category = name.split("/")[-1]
    folder = workdir / name
    assert set(json.loads((folder / "metrics.json").read_text())["draem"]) >= {category, "mean"}
    assert set(json.loads((folder / "thresholds.json").read_text())) == {category}
    assert list((folder / "heatmaps").glob("*.png"))
    stored = json.loads((folder / "config.json").read_text())
    assert (
      stored["train"]["seed"] == int(name[len("train.seed=")])
      and stored["data"]["categories"] == []
    )
  assert not (workdir / "metrics.json").exists()  # the program's table is results.md
  assert all(name in (workdir / "results.md").read_text() for name in RUNS)
  logged = _scalars(workdir)[-1]
  assert logged["loss"] == pytest.approx(np.mean([logged[f"loss/{n}"] for n in RUNS]))
  # The sweep tools read the runs like separate ones: a row per setting, mean over seeds.
  rows = list(csv.reader(io.StringIO(sweep.aggregate(workdir)[1])))
  assert rows[0] == ["setting", "pill", "weave", "mean"] and len(rows) == 2


def test_export_one_run_of_a_stacked_program(stacked_run, tmp_path):
  config, workdir, results = stacked_run
  with pytest.raises(ValueError, match=r"--run='': .* trained the runs \['train.seed=0/weave'"):
    export.export(workdir, tmp_path / "a")
  from pouta_jax import artifact

  name = "train.seed=1/pill"
  art = artifact.load(export.export(workdir, tmp_path / "pill", run=name))
  assert art.manifest["category"] == "pill" and art.manifest["config"]["train"]["seed"] == 1
  assert art.manifest["metrics"] == pytest.approx(results["metrics"]["draem"][name], nan_ok=True)
