"""A workdir belongs to one run at a time and to one config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pouta_jax import config as config_lib, errors, experiment, files
from tests.conftest import make_tiny_config, tiny_main_command

REPO = Path(__file__).resolve().parents[1]

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(30)


def _store(workdir: Path, config, allow_changes=()) -> None:
  with experiment.claimed_workdir(workdir, config, allow_changes):
    pass


def _bind(workdir: Path, config) -> None:
  """Stores `config` and marks its first checkpoint (what binds a workdir to a config): a step
  folder as orbax renames it into place."""
  _store(workdir, config)
  (workdir / "checkpoints" / "3").mkdir(parents=True)


def test_output_only_keys_are_config_keys():
  for model in ("draem", "pouta", "prn"):
    stored = json.loads(config_lib.load(model).to_json_best_effort())
    assert all(config_lib.has_key(stored, key) for key in config_lib.OUTPUT_ONLY_KEYS)


@pytest.mark.parametrize(
  "key, value",
  [("optim.lr", 0.123), ("train.seed", 7), ("data.anomaly_prob", 0.9), ("data.root", "/else")],
)
def test_a_changed_key_is_refused_unless_allowed_and_then_recorded(
  tiny_config, tmp_path, key, value
):
  _bind(tmp_path, tiny_config)
  stored = (tmp_path / "config.json").read_text()
  section, name = key.split(".")
  old = tiny_config[section][name]
  changed = tiny_config.copy_and_resolve_references()
  changed[section][name] = value
  changed.train.log_every = 1  # output-only keys may differ alongside
  with pytest.raises(errors.ConfigError, match=rf"config\.{key}: stored {old!r}, now {value!r}"):
    _store(tmp_path, changed)
  assert (tmp_path / "config.json").read_text() == stored
  assert not (tmp_path / experiment.CHANGES_FILE).exists()

  _store(tmp_path, changed, allow_changes=(key,))
  assert config_lib.from_workdir(tmp_path)[section][name] == value
  records = [
    json.loads(line) for line in (tmp_path / experiment.CHANGES_FILE).read_text().splitlines()
  ]
  assert [(r["key"], r["stored"], r["new"]) for r in records] == [(key, old, value)]


def test_a_workdir_is_bound_by_its_first_checkpoint_not_by_a_failed_start(tiny_config, tmp_path):
  _store(tmp_path, tiny_config)  # a start that failed before its first checkpoint
  (tmp_path / "checkpoints").mkdir()  # orbax's empty folder, as a diverged run leaves it
  changed = tiny_config.copy_and_resolve_references()
  changed.optim.lr = 0.123
  _store(tmp_path, changed)  # the corrected rerun
  assert config_lib.from_workdir(tmp_path).optim.lr == 0.123
  assert not (tmp_path / experiment.CHANGES_FILE).exists()
  (tmp_path / "checkpoints" / "3").mkdir()
  with pytest.raises(errors.ConfigError, match=r"config\.optim\.lr: stored 0.123"):
    _store(tmp_path, tiny_config)


@pytest.mark.parametrize("written", ["{root}/", "{root}//", "{root}/./", "{root}/../{name}"])
def test_a_path_compares_as_the_place_it_names(tiny_config, tmp_path, written):
  _bind(tmp_path / "run", tiny_config)
  root = tiny_config.data.root
  changed = tiny_config.copy_and_resolve_references()
  changed.data.root = written.format(root=root, name=os.path.basename(root))
  _store(tmp_path / "run", changed)  # the same dataset: no refusal
  changed.data.root = root + "_else"
  with pytest.raises(errors.ConfigError, match=r"config\.data\.root"):
    _store(tmp_path / "run", changed)


def test_output_only_changes_need_no_flag(tiny_config, tmp_path):
  _bind(tmp_path, tiny_config)
  changed = tiny_config.copy_and_resolve_references()
  changed.train.log_every, changed.eval.num_heatmaps = 1, 0
  _store(tmp_path, changed)
  assert config_lib.from_workdir(tmp_path).train.log_every == 1
  assert not (tmp_path / experiment.CHANGES_FILE).exists()
  with pytest.raises(errors.ConfigError, match=r"\['optim.learning_rate'\] are not config keys"):
    _store(tmp_path, changed, allow_changes=("optim.learning_rate",))


def test_a_run_in_progress_is_not_disturbed_by_a_second(dataset_root, tmp_path):
  command = [
    sys.executable,
    *tiny_main_command(
      dataset_root, tmp_path, train__num_steps=40, train__log_every=1, train__checkpoint_every=5
    ),
  ]
  first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  lock = tmp_path / files.LOCK_NAME
  while not (lock.exists() and lock.read_text()):
    assert first.poll() is None, first.communicate()[1][-3000:]
    time.sleep(0.05)
  started = time.monotonic()
  second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  refused_after = time.monotonic() - started
  _, first_err = first.communicate(timeout=600)
  assert first.returncode == 0, first_err[-3000:]
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
  assert f"FATAL: workdir {tmp_path} is in use by host " in second.stderr
  assert f"pid {first.pid}" in second.stderr
  # Refused at start, before reading data or building the model (jax's import dominates).
  assert refused_after < 60
  steps = [
    json.loads(line)["step"] for line in (tmp_path / "scalars.jsonl").read_text().splitlines()
  ]
  assert steps == list(range(1, 41))  # one writer: no duplicates, none lost
  assert not lock.exists()


def test_the_refusal_names_the_flag_and_writes_nothing(dataset_root, tmp_path):
  config = make_tiny_config("draem", dataset_root)
  _bind(tmp_path, config)
  changed = config.copy_and_resolve_references()
  changed.optim.lr = 0.25
  with pytest.raises(errors.ConfigError, match="--allow_config_change=optim.lr"):
    experiment.run(changed, tmp_path, mode="eval")
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]


def test_evaluating_a_workdir_without_a_checkpoint_writes_nothing(dataset_root, tmp_path):
  config = make_tiny_config("draem", dataset_root)
  with pytest.raises(errors.NotFoundError, match="no checkpoint in .* to evaluate"):
    experiment.run(config, tmp_path / "run", mode="eval")
  assert not (tmp_path / "run").exists()
