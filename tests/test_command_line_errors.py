"""Every command line answers bad input with one `FATAL:` line naming the file or key, exit
code 1, no traceback, and writes nothing.

Each case runs the real command in a subprocess; the cases run a few at a time, since each
spends most of its time importing jax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tiny_config, tiny_main_command

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(95)

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Case:
  """`args` after `python`; `named`: what the FATAL line must contain."""

  args: list[str]
  named: list[str]


def _tiny_main(root: Path, workdir: Path, *extra: str, mode: str = "train") -> list[str]:
  return [*tiny_main_command(root, workdir, mode, train__num_steps=2), *extra]


def _copy_category(dataset_root: Path, tmp: Path) -> Path:
  """A private copy of the embedded `weave` category to break."""
  root = tmp / "data"
  shutil.copytree(dataset_root / "weave", root / "weave")
  return root / "weave"


def _first(folder: Path) -> Path:
  return sorted(folder.iterdir())[0]


def _cases(dataset_root: Path, tmp: Path) -> dict[str, tuple[Case, Path]]:
  """name -> (case, its own folder)."""
  cases = {}

  def add(name: str, make: Callable[[Path], Case]) -> None:
    folder = tmp / name
    folder.mkdir()
    cases[name] = (make(folder), folder)

  def broken_data(change: Callable[[Path], Path]) -> Callable[[Path], Case]:
    def make(folder: Path) -> Case:
      category = _copy_category(dataset_root, folder)
      named = change(category)
      return Case(_tiny_main(category.parent, folder / "run"), [str(named)])

    return make

  def truncate(category: Path) -> Path:
    image = _first(category / "train" / "good")
    image.write_bytes(image.read_bytes()[:100])
    return image

  def empty(category: Path) -> Path:
    image = _first(category / "test" / "good")
    image.write_bytes(b"")
    return image

  def no_mask(category: Path) -> Path:
    mask = _first(category / "ground_truth" / "hole")
    mask.unlink()
    return category / "test" / "hole"

  def mask_size(category: Path) -> Path:
    mask = _first(category / "ground_truth" / "scratch")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    return mask

  def no_train(category: Path) -> Path:
    shutil.rmtree(category / "train")
    return category

  def sixteen_bit(category: Path) -> Path:
    image = _first(category / "train" / "good")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(image)
    return image

  add("missing_root", lambda f: Case(_tiny_main(f / "nowhere", f / "run"), [str(f / "nowhere")]))
  add("no_train_good", broken_data(no_train))
  add("truncated_image", broken_data(truncate))
  add("zero_byte_image", broken_data(empty))
  add("defect_without_mask", broken_data(no_mask))
  add("mask_size", broken_data(mask_size))
  add("sixteen_bit_image", broken_data(sixteen_bit))
  add(
    "image_size",
    lambda f: Case(
      _tiny_main(dataset_root, f / "run", "--config.data.image_size=40"), ["data.image_size=40"]
    ),
  )
  add(
    "stacked_shape_key",
    lambda f: Case(
      _tiny_main(dataset_root, f / "run", "--sweep=model.base_width=4,8", "--seeds=2"),
      ["config.stack: model.base_width changes the program's shapes"],
    ),
  )
  add(
    "stacked_bad_value",
    lambda f: Case(
      _tiny_main(dataset_root, f / "run", "--sweep=optim.lr=1e-3,fast"),
      ["optim.lr='fast' is not a float"],
    ),
  )
  add(
    "negative_lr",
    lambda f: Case(_tiny_main(dataset_root, f / "run", "--config.optim.lr=-1"), ["optim.lr=-1"]),
  )
  add(
    "unknown_key",
    lambda f: Case(
      _tiny_main(dataset_root, f / "run", "--config.optim.learning_rate=1"),
      ["--config.optim.learning_rate=1", "optim has no key 'learning_rate'"],
    ),
  )

  add(
    "platform_mismatch",
    lambda f: Case(
      _tiny_main(dataset_root, f / "run", "--config.mesh.require_platform=tpu"),
      ["config.mesh.require_platform='tpu'", "jax runs on cpu", "pip install -e '.[tpu]'"],
    ),
  )

  def read_only(folder: Path) -> Case:
    (folder / "file").write_text("")  # a workdir below a file cannot be created, even by root
    return Case(_tiny_main(dataset_root, folder / "file" / "run"), [str(folder / "file" / "run")])

  add("unwritable_workdir", read_only)

  def changed_config(folder: Path) -> Case:
    config = make_tiny_config("draem", dataset_root)
    config.data.num_workers = 0
    config.train.num_steps = 2
    config.eval.score_filter_size = 3
    (folder / "run").mkdir()
    (folder / "run" / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return Case(
      _tiny_main(dataset_root, folder / "run", "--config.optim.lr=0.1", "--config.train.seed=3"),
      ["config.optim.lr: stored 0.0005, now 0.1", "config.train.seed: stored 0, now 3"],
    )

  add("changed_config", changed_config)

  def bad_artifact(folder: Path) -> Case:
    (folder / "art").mkdir()
    (folder / "art" / "artifact.json").write_text("{not json")
    args = _tiny_main(dataset_root, folder / "run", f"--artifact={folder / 'art'}", mode="eval")
    return Case(args, [str(folder / "art" / "artifact.json"), "not valid JSON"])

  add("corrupted_artifact", bad_artifact)
  add(
    "export_not_a_workdir",
    lambda f: Case(
      ["-m", "pouta_jax.export", f"--workdir={f / 'nowhere'}", f"--out={f / 'art'}"],
      [str(f / "nowhere"), "not a pouta_jax workdir"],
    ),
  )
  add(
    "convert_missing_file",
    lambda f: Case(
      ["-m", "pouta_jax.convert", "--from=torchvision_resnet", f"--weights={f / 'r.pth'}"]
      + [f"--out={f / 'r.npz'}"],
      # without torch (CI) the missing extra is named; with it, the missing file
      ["pip install -e '.[bench]'" if not _has_torch() else str(f / "r.pth")],
    ),
  )
  add(
    "sweep_without_runs",
    lambda f: Case(["-m", "pouta_jax.sweep", f"--root={f}"], [str(f), "no run with metrics.json"]),
  )
  add(
    "build_unknown_dataset",
    lambda f: Case(
      ["-m", "pouta_jax.data.build", "--dataset=mnist", f"--manual_dir={f}"]
      + [f"--data_dir={f / 'tfds'}"],
      ["--dataset='mnist'"],
    ),
  )
  add(
    "demo_unknown_category",
    lambda f: Case(
      ["-m", "pouta_jax.demo", f"--workdir={f / 'demo'}", "--categories=marble"],
      ["'marble' is not an embedded category"],
    ),
  )
  add(
    "launcher_bad_sweep",
    lambda f: Case(
      ["launch/local.py", "--config=configs/draem.py", f"--workdir={f / 'runs'}"]
      + ["--categories=weave", "--sweep=optim.nothing=1,2", "--dry_run"],
      ["optim.nothing"],
    ),
  )
  return cases


def _has_torch() -> bool:
  import importlib.util

  return importlib.util.find_spec("torch") is not None


def _snapshot(folder: Path) -> dict[str, bytes | None]:
  """Every file's content and every folder (None) below `folder`."""
  return {
    str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")
  }


@pytest.fixture(scope="module")
def results(dataset_root, tmp_path_factory):
  """name -> (case, folder, completed process, the folder's files before and after)."""
  tmp = tmp_path_factory.mktemp("bad_input")
  cases = _cases(dataset_root, tmp)
  before = {name: _snapshot(folder) for name, (_, folder) in cases.items()}

  def run(name: str) -> subprocess.CompletedProcess:
    case, _ = cases[name]
    return subprocess.run(
      [sys.executable, *case.args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    done = dict(zip(cases, pool.map(run, cases)))
  return {
    name: (case, folder, done[name], before[name], _snapshot(folder))
    for name, (case, folder) in cases.items()
  }


CASES = [
  "missing_root",
  "no_train_good",
  "truncated_image",
  "zero_byte_image",
  "defect_without_mask",
  "mask_size",
  "sixteen_bit_image",
  "image_size",
  "stacked_shape_key",
  "stacked_bad_value",
  "negative_lr",
  "unknown_key",
  "platform_mismatch",
  "unwritable_workdir",
  "changed_config",
  "corrupted_artifact",
  "export_not_a_workdir",
  "convert_missing_file",
  "sweep_without_runs",
  "build_unknown_dataset",
  "demo_unknown_category",
  "launcher_bad_sweep",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_fatal_line(results, name):
  case, folder, process, before, after = results[name]
  output = process.stdout + process.stderr
  assert process.returncode == 1, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  fatal = [line for line in output.splitlines() if line.startswith("FATAL:")]
  assert len(fatal) == 1, output[-3000:]
  for named in case.named:
    assert named in fatal[0], fatal[0]
  assert after == before, f"{folder}: files changed: {set(after) ^ set(before)}"


def test_every_case_is_checked(results):
  assert sorted(results) == sorted(CASES)


def _fatal_line(process: subprocess.CompletedProcess) -> str:
  output = process.stdout + process.stderr
  assert process.returncode == 1, output[-3000:]
  fatal = [line for line in output.splitlines() if line.startswith("FATAL:")]
  assert len(fatal) == 1 and fatal[0] == output.strip().splitlines()[-1], output[-3000:]
  return fatal[0]


def _run(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_diverged_training_saves_nothing(dataset_root, tmp_path):
  workdir = tmp_path / "run"
  fatal = _fatal_line(_run(_tiny_main(dataset_root, workdir, "--config.optim.lr=1e30")))
  assert "non-finite training metrics" in fatal and "newest good checkpoint is step None" in fatal
  assert not any((workdir / "checkpoints").iterdir())


def test_full_disk_names_the_workdir_and_keeps_no_partial_checkpoint(dataset_root, small_disk):
  workdir = small_disk / "run"
  fatal = _fatal_line(_run(_tiny_main(dataset_root, workdir, "--config.train.num_steps=4")))
  assert f"disk full: checkpoint step 4 in {workdir / 'checkpoints'}" in fatal
  assert "the newest good checkpoint is none" in fatal
  assert list((workdir / "checkpoints").iterdir()) == []
