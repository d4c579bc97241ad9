"""Every command line answers bad input with one `FATAL:` line naming the file or key, exit
code 1, no traceback, and writes nothing.

Each case runs the real command in a subprocess; the cases run a few at a time, since each
spends most of its time importing jax.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from pouta_jax import artifact, config as config_lib, experiment
from tests.conftest import make_tiny_config, npz_bomb, tiny_main_command, untrained_artifact

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


def _cases(dataset_root: Path, tmp: Path, art: Path) -> dict[str, tuple[Case, Path]]:
  """name -> (case, its own folder); `art`: an artifact to damage copies of."""
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
    (folder / "run" / "checkpoints" / "3").mkdir(parents=True)  # a run's first checkpoint
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

  # Hostile workdirs: a stored config is data. Its model name points at a Python file that
  # would leave a file behind if it ran; the case's folder must stay as it was.
  def hostile_workdir(folder: Path) -> Path:
    (folder / "evil.py").write_text(
      f"open({str(folder / 'PWNED')!r}, 'w').close()\n\ndef get_config(arg=None):\n  pass\n"
    )
    stored = json.loads(make_tiny_config("draem", dataset_root).to_json_best_effort())
    stored["model"]["name"] = str(folder / "evil")
    workdir = folder / "w2"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(stored))
    (workdir / "metrics.json").write_text("{}")
    return workdir

  hostile = ["config.model.name=", "evil"]
  add(
    "predict_hostile_workdir",
    lambda f: Case(
      ["-m", "pouta_jax.predict", f"--workdir={hostile_workdir(f)}", f"--input={f}"]
      + [f"--out={f / 'o'}"],
      hostile,
    ),
  )
  add(
    "export_hostile_workdir",
    lambda f: Case(
      ["-m", "pouta_jax.export", f"--workdir={hostile_workdir(f)}", f"--out={f / 'art'}"], hostile
    ),
  )
  add(
    "sweep_hostile_workdir",
    lambda f: Case(["-m", "pouta_jax.sweep", f"--root={hostile_workdir(f).parent}"], hostile),
  )

  def images(folder: Path) -> Path:
    shutil.copytree(dataset_root / "weave" / "test" / "good", folder / "images")
    return folder / "images"

  def predict(*args: str, artifact: Path = art) -> list[str]:
    return ["-m", "pouta_jax.predict", f"--artifact={artifact}", *args]

  add(
    "predict_out_is_the_input",
    lambda f: Case(
      predict(f"--input={images(f)}", f"--out={f / 'images'}", "--overwrite"),
      ["is, holds or lies inside an input"],
    ),
  )

  def overwriting(make: Callable[[Path], None], named: str) -> Callable[[Path], Case]:
    """predict --overwrite onto `folder/out`, made by `make` as something predict did not write."""

    def case(folder: Path) -> Case:
      make(folder / "out")
      return Case(
        predict(f"--input={images(folder)}", f"--out={folder / 'out'}", "--overwrite"),
        [f"--out={folder / 'out'} {named}"],
      )

    return case

  def thesis(out: Path) -> None:
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")

  add("predict_overwrite_not_its_output", overwriting(thesis, "holds no predict.json"))
  add("predict_overwrite_a_file", overwriting(lambda out: out.write_text("mine"), "is a file"))
  add(
    "predict_absurd_batch",
    lambda f: Case(
      predict(f"--input={images(f)}", f"--out={f / 'o'}", "--batch_size=100000000"),
      ["--batch_size=100000000"],
    ),
  )

  def nothing_readable(folder: Path) -> Case:
    (folder / "bad").mkdir()
    (folder / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return Case(
      predict(f"--input={folder / 'bad'}", f"--out={folder / 'o'}"),
      ["none of its 1 images could be scored"],
    )

  add("predict_nothing_readable", nothing_readable)

  def calibrate_non_image(folder: Path) -> Case:
    good = images(folder)
    (good / "notes.txt").write_text("not an image")
    copy = _copy_artifact(art, folder)
    return Case(
      ["-m", "pouta_jax.calibrate", f"--artifact={copy}", f"--good={good}", "--fpr=0.1"],
      [f"{good / 'notes.txt'}: not an image file"],
    )

  add("calibrate_non_image", calibrate_non_image)

  # Artifacts damaged and signed again, as a forger would: every field is checked.
  def forged(change: Callable[[dict, Path], None], named: list[str]) -> Callable[[Path], Case]:
    def make(folder: Path) -> Case:
      copy = _copy_artifact(art, folder)
      manifest = json.loads((copy / "artifact.json").read_text())
      change(manifest, copy)
      if "manifest_sha256" in manifest:
        manifest["manifest_sha256"] = artifact.manifest_digest(manifest)
      (copy / "artifact.json").write_text(json.dumps(manifest))
      return Case(
        predict(f"--input={images(folder)}", f"--out={folder / 'o'}", artifact=copy),
        named,
      )

    return make

  def setter(key: str, value) -> Callable[[dict, Path], None]:
    return lambda manifest, _: manifest.__setitem__(key, value)

  def nan_threshold(manifest: dict, _) -> None:
    manifest["thresholds"]["image"] = float("nan")

  def no_digest(manifest: dict, _) -> None:
    del manifest["manifest_sha256"]

  def outside_name(manifest: dict, _) -> None:
    manifest["sha256"]["../../../../etc/passwd"] = "0" * 64

  def fifo_weights(manifest: dict, copy: Path) -> None:
    (copy / "weights.npz").unlink()
    os.mkfifo(copy / "weights.npz")

  def resigned_weights(arrays: Callable[[dict], dict]) -> Callable[[dict, Path], None]:
    def change(manifest: dict, copy: Path) -> None:
      with np.load(copy / "weights.npz") as stored:
        content = arrays(dict(stored))
      (copy / "weights.npz").write_bytes(content)
      manifest["sha256"]["weights.npz"] = artifact.sha256(copy / "weights.npz")

    return change

  def bomb(arrays: dict) -> bytes:
    return npz_bomb(arrays, sorted(arrays)[0])

  def missing_weight(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **dict(sorted(arrays.items())[1:]))
    return buffer.getvalue()

  add("artifact_nan_threshold", forged(nan_threshold, ["thresholds=", "nan"]))
  add("artifact_without_digest", forged(no_digest, ["no manifest_sha256 and sha256 digests"]))
  add("artifact_name_outside", forged(outside_name, ["sha256 lists", "holds exactly"]))
  add("artifact_fifo_weights", forged(fifo_weights, ["weights.npz: not a regular file"]))
  add("artifact_negative_batch", forged(setter("batch_size", -1), ["batch_size=-1"]))
  add("artifact_text_batch", forged(setter("batch_size", "abc"), ["batch_size='abc'"]))
  add("artifact_text_sizes", forged(setter("image_sizes", ["x"]), ["image_sizes=['x']"]))
  add("artifact_no_sizes", forged(setter("image_sizes", []), ["image_sizes=[]"]))
  add("artifact_no_model", forged(lambda m, _: m.pop("model"), ["model=None"]))
  add("artifact_bomb", forged(resigned_weights(bomb), ["is float32 (1073741824,)"]))
  add("artifact_missing_weight", forged(resigned_weights(missing_weight), ["missing "]))

  def deep_manifest(folder: Path) -> Case:
    copy = _copy_artifact(art, folder)
    (copy / "artifact.json").write_text("[" * 100_000 + "]" * 100_000)
    return Case(
      predict(f"--input={images(folder)}", f"--out={folder / 'o'}", artifact=copy),
      ["artifact.json: not valid JSON (RecursionError"],
    )

  add("artifact_deeply_nested", deep_manifest)

  def fifo(category: Path) -> Path:
    os.mkfifo(category / "train" / "good" / "zz.png")
    return category / "train" / "good" / "zz.png"

  add("dataset_fifo", broken_data(fifo))
  for name, flag, named in (
    ("flag_not_a_float", "--config.optim.lr=abc", "--config.optim.lr=abc"),
    ("flag_not_an_int", "--config.data.image_size=64.5", "--config.data.image_size=64.5"),
    ("flag_not_a_bool", "--config.data.require_masks=maybe", "--config.data.require_masks"),
  ):
    add(
      name,
      lambda f, flag=flag, named=named: Case(_tiny_main(dataset_root, f / "run", flag), [named]),
    )
  add(
    "eval_without_a_checkpoint",
    lambda f: Case(_tiny_main(dataset_root, f / "run", mode="eval"), ["no checkpoint in"]),
  )
  add(
    "build_without_the_dataset",
    lambda f: Case(
      ["-m", "pouta_jax.data.build", "--dataset=mvtec_ad", f"--manual_dir={f / 'none'}"]
      + [f"--data_dir={f / 'tfds'}"],
      [f"--manual_dir='{f / 'none'}'"],
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


def _copy_artifact(art: Path, folder: Path) -> Path:
  copy = folder / "art"
  shutil.copytree(art, copy)
  return copy


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
  art = untrained_artifact(dataset_root, tmp_path_factory.mktemp("artifact"))
  cases = _cases(dataset_root, tmp, art)
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
  "predict_hostile_workdir",
  "export_hostile_workdir",
  "sweep_hostile_workdir",
  "predict_out_is_the_input",
  "predict_overwrite_not_its_output",
  "predict_overwrite_a_file",
  "predict_absurd_batch",
  "predict_nothing_readable",
  "calibrate_non_image",
  "artifact_nan_threshold",
  "artifact_without_digest",
  "artifact_name_outside",
  "artifact_fifo_weights",
  "artifact_negative_batch",
  "artifact_text_batch",
  "artifact_text_sizes",
  "artifact_no_sizes",
  "artifact_no_model",
  "artifact_bomb",
  "artifact_missing_weight",
  "artifact_deeply_nested",
  "dataset_fifo",
  "flag_not_a_float",
  "flag_not_an_int",
  "flag_not_a_bool",
  "eval_without_a_checkpoint",
  "build_without_the_dataset",
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


def test_diverged_training_saves_nothing_and_binds_nothing(dataset_root, tmp_path):
  workdir = tmp_path / "run"
  fatal = _fatal_line(_run(_tiny_main(dataset_root, workdir, "--config.optim.lr=1e30")))
  assert "non-finite training metrics" in fatal and "No checkpoint was saved" in fatal
  assert not any((workdir / "checkpoints").iterdir())
  # The corrected rerun is not refused as "a run with another config": nothing was bound.
  corrected = make_tiny_config("draem", dataset_root)
  with experiment.claimed_workdir(workdir, corrected):
    pass
  assert config_lib.from_workdir(workdir).optim.lr == corrected.optim.lr


def test_full_disk_names_the_workdir_and_keeps_no_partial_checkpoint(dataset_root, small_disk):
  workdir = small_disk / "run"
  fatal = _fatal_line(_run(_tiny_main(dataset_root, workdir, "--config.train.num_steps=4")))
  assert f"disk full: checkpoint step 4 in {workdir / 'checkpoints'}" in fatal
  assert "the newest good checkpoint is none" in fatal
  assert list((workdir / "checkpoints").iterdir()) == []
