"""launch/study.py: the runs a study file asks for, resumed where they stopped, and a report whose
chosen setting is the one with the best validation mean."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pouta_jax import sweep

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(70)

REPO = Path(__file__).resolve().parents[1]

TINY = (
  "--config.model.base_width=4",
  "--config.data.image_size=32",
  "--config.data.batch_size=4",
  "--config.data.num_workers=0",
  "--config.train.num_steps=4",
  "--config.train.checkpoint_every=4",
  "--config.eval.batch_size=8",
  "--config.eval.score_filter_size=3",
  "--config.eval.flops_by_part=False",
  "--config.eval.num_heatmaps=1",
  "--config.data.val_fraction=0.25",
)


def _study_file(tmp_path: Path, questions: str, seeds: int = 1) -> Path:
  path = tmp_path / "study.py"
  path.write_text(
    f"""
def get_study():
  return dict(
    preset="tiny", seeds={seeds}, select="pixel_ap", report=("pixel_ap", "image_auroc"),
    common={TINY!r},
    datasets=dict(real=dict(categories=("weave",), args=())),
    questions={questions},
  )
"""
  )
  return path


def _study(*args: str) -> subprocess.CompletedProcess:
  # One run at a time: the runs of a study share compiled programs (the compilation cache),
  # which two runs compiling side by side would each compile.
  return subprocess.run(
    [sys.executable, "launch/study.py", "--parallel=1", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


QUESTIONS = """[
  dict(name="models", question="both models", configs=("configs/draem.py", "configs/pouta.py")),
  dict(name="levels", question="level weights", configs=("configs/pouta.py",),
       sweep=("loss.level_weights=(0,0,0,0),(1,0.5,0.25,0.125)",), include=("models/*/pouta",)),
]"""


def test_dry_run_lists_one_program_per_run_and_leaves_out_a_missing_real_dataset(
  dataset_root, tmp_path
):
  path = _study_file(tmp_path, QUESTIONS, seeds=2)
  common = [f"--study={path}", f"--workdir={tmp_path / 'runs'}", "--dry_run"]
  lines = _study(*common, f"--real_root={dataset_root}").stdout.splitlines()
  assert len(lines) == 2 * 2 + 2 * 2  # (2 models + 2 level settings) x 2 seeds
  first = lines[0].split()
  assert first[1:5] == [
    "-m",
    "pouta_jax.main",
    "--config=configs/draem.py:weave,tiny",
    f"--workdir={tmp_path}/runs/models/real/draem/train.seed=0/weave",
  ]
  assert f"--config.data.root={dataset_root}" in first and "--config.train.seed=0" in first
  assert any(
    "levels/real/pouta/loss.level_weights=(0,0,0,0),train.seed=1/weave" in x for x in lines
  )
  assert _study(*common).stdout == ""  # no --real_root: its runs are left out


def test_the_confirmation_study_trains_on_another_draw_and_scores_copies(tmp_path):
  """configs/pouta_confirm.py: the design study's preset and seeds on the embedded dataset's
  draw 2; its scoring questions evaluate copies of its own trained runs."""
  lines = _study(
    "--study=configs/pouta_confirm.py", f"--workdir={tmp_path / 'runs'}", "--dry_run"
  ).stdout.splitlines()
  training = [x for x in lines if "--mode=eval" not in x]
  copies = [x for x in lines if "--mode=eval" in x and "# on a copy of" in x]
  assert len(training) == 2 * 4 * 3 and len(copies) == 2 * 4 * 3 == len(lines) - len(training)
  assert all("--config.data.embedded_seed=2" in x for x in lines)
  assert all("/defaults/embedded/" in x.split("# on a copy of ")[1] for x in copies)
  assert all(",tiny " in x and "--config.data.val_fraction=0.2" in x for x in lines)


def test_study_runs_resumes_and_reports_the_best_validation_setting(dataset_root, tmp_path):
  questions = """[dict(name="levels", question="level weights", configs=("configs/pouta.py",),
    sweep=("loss.level_weights=(1,1,1,1),(0,0,0,0)",), test=True)]"""
  path = _study_file(tmp_path, questions)
  out = tmp_path / "study.md"
  args = [f"--study={path}", f"--workdir={tmp_path / 'runs'}", f"--real_root={dataset_root}"]
  assert _study(*args, f"--out={out}", "--report_only").returncode == 0
  assert "Not run yet (0 of its 2 runs; 0 of 2 with those it includes)." in out.read_text()
  first = _study(*args, f"--out={out}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "2 runs to do" in first.stdout
  text = out.read_text()
  assert "2 of 2 runs done." in text and "**pixel_ap** on the validation set" in text
  # The chosen setting has the higher validation pixel AP of the two runs.
  found = {}
  for metrics in (tmp_path / "runs").rglob("metrics.json"):
    config = json.loads((metrics.parent / "config.json").read_text())
    value = json.loads(metrics.read_text())["pouta"]["validation"]["weave"]["pixel_ap"]
    found[tuple(config["loss"]["level_weights"])] = value
  assert len(found) == 2
  best = max(found, key=found.get)
  assert f"Chosen by validation pixel_ap: **loss.level_weights={json.dumps(list(best))}**" in text
  assert f"{100 * found[best]:.1f} ± 0.0" in text and np.isfinite(list(found.values())).all()
  assert "Reported on the test sets (chosen by nothing)" in text
  assert "The targets" not in text  # one model: nothing to pair with (tests/test_sweep.py)
  kinds = "| loss.level_weights | synthetic | removed | misplaced | spot |"
  assert "pixel_ap per kind of validation anomaly" in text and kinds in text
  assert "**image_auroc** on the test set" in text
  # Again: nothing left to run, the same tables; a run folder of a setting the study file no
  # longer has is not ranked.
  run = next((tmp_path / "runs").rglob("metrics.json")).parent
  stale = run.parents[1] / "loss.level_weights=(9,9,9,9),train.seed=0" / "weave"
  shutil.copytree(run, stale)
  config = json.loads((stale / "config.json").read_text())
  config["loss"]["level_weights"] = [9, 9, 9, 9]
  (stale / "config.json").write_text(json.dumps(config))
  again = _study(*args, f"--out={out}")
  assert again.returncode == 0 and "0 runs to do and 0 to score" in again.stdout
  assert out.read_text() == text
  shutil.rmtree(stale.parent)
  # A run scored on the validation set of before data.val_defects (no validation_by_defect):
  # evaluated again from its checkpoint, its test metrics as they were, nothing retrained.
  metrics_path = next((tmp_path / "runs").rglob("metrics.json"))
  document = json.loads(metrics_path.read_text())
  kept = document["pouta"]
  del document["pouta"]["validation_by_defect"]
  metrics_path.write_text(json.dumps(document))
  checkpoints = sorted((metrics_path.parent / "checkpoints").iterdir())
  rescored = _study(*args, f"--out={out}")
  assert rescored.returncode == 0, rescored.stderr[-3000:]
  assert "0 runs to do and 1 to score on the current validation set" in rescored.stdout
  again = json.loads(metrics_path.read_text())["pouta"]
  assert again["weave"] == kept["weave"] and again["validation"] == kept["validation"]
  assert set(again["validation_by_defect"]["weave"]) == {
    "synthetic",
    "removed",
    "misplaced",
    "spot",
  }
  assert sorted((metrics_path.parent / "checkpoints").iterdir()) == checkpoints
  assert out.read_text() == text
  # A run is its config, not its command line: the same config file by another path keeps the
  # runs; a default changed in it under them is refused before anything runs, naming the run
  # and the key.
  copy = tmp_path / "configs" / "pouta.py"
  copy.parent.mkdir()
  shutil.copy(REPO / "configs" / "pouta.py", copy)
  path.write_text(path.read_text().replace('"configs/pouta.py"', f'"{copy}"'))
  moved = _study(*args, f"--out={out}")
  assert moved.returncode == 0 and "0 runs to do" in moved.stdout, moved.stderr[-3000:]
  default = "config.model.pixel_input = True"
  assert default in copy.read_text()
  copy.write_text(copy.read_text().replace(default, default.replace("True", "False")))
  changed = _study(*args, f"--out={out}")
  assert changed.returncode == 1 and "runs to do" not in changed.stdout
  assert "was run with another config (config.model.pixel_input: stored True, now False)" in (
    changed.stderr
  )
  # The study pins the value its runs had: they are its own again.
  pinned = f"pinned={{{str(copy)!r}: ('--config.model.pixel_input=True',)}}, questions="
  path.write_text(path.read_text().replace("questions=", pinned))
  kept_by_pin = _study(*args, f"--out={out}")
  assert kept_by_pin.returncode == 0 and "0 runs to do" in kept_by_pin.stdout, kept_by_pin.stderr[
    -3000:
  ]
  shutil.copy(REPO / "configs" / "pouta.py", copy)
  # A damaged metrics.json: refused before anything runs, naming the file.
  metrics_path.write_text("{")
  damaged = _study(*args, f"--out={out}")
  assert damaged.returncode == 1 and "runs to do" not in damaged.stdout
  assert f"{metrics_path}: not valid JSON" in damaged.stderr and "Traceback" not in damaged.stderr
  metrics_path.write_text(json.dumps({"pouta": again}))
  # With a run missing, the leader is not called chosen.
  missing = next((tmp_path / "runs").rglob("metrics.json"))
  kept = missing.read_text()
  missing.unlink()
  partial = _study(*args, f"--out={out}", "--report_only")
  assert partial.returncode == 0 and "runs to do" not in partial.stdout
  assert "1 of 2 runs done." in out.read_text() and "Chosen by" not in out.read_text()
  assert "(not chosen before all runs)" in out.read_text()
  missing.write_text(kept)
  # A question whose default is a tuple of globs (each model's default in another question):
  # its own run (a copy: a run is its config) is measured against the runs they name.
  off = next(p.parent for p in (tmp_path / "runs").rglob("config.json") if "(0,0,0,0)" in str(p))
  shutil.copytree(off, tmp_path / "runs" / "b" / off.relative_to(tmp_path / "runs" / "levels"))
  b = """dict(name="b", question="b", configs=("configs/pouta.py",),
    sweep=("loss.level_weights=(0,0,0,0)",), include=(("nothing/*", "levels/*/*=(1,1,1,1)*"),))"""
  path.write_text(path.read_text().replace("test=True)]", f"test=True), {b}]"))
  both = _study(*args, f"--out={out}", "--report_only")
  assert both.returncode == 0, both.stderr[-3000:]
  section = out.read_text().partition("## b: b")[2]
  assert "2 of 2 runs done." in section and "| [1, 1, 1, 1] | (the default) |" in section
  assert "| [0, 0, 0, 0] | – (fewer than 2 pairs) |" in section


def test_a_run_that_differs_only_in_scoring_evaluates_a_copy_of_a_trained_run(
  dataset_root, tmp_path
):
  questions = """[
    dict(name="d", question="default", configs=("configs/pouta.py",)),
    dict(name="w", question="error weight", configs=("configs/pouta.py",),
         sweep=("eval.error_weight=0.5,2",), include=("d/*",)),
  ]"""
  path, runs = _study_file(tmp_path, questions), tmp_path / "runs"
  args = [f"--study={path}", f"--workdir={runs}", f"--real_root={dataset_root}"]
  args.append(f"--out={tmp_path / 'study.md'}")
  # Alone, w trains one of its runs and scores the other from it.
  half, two = (runs / "w/real/pouta" / f"eval.error_weight={w}/weave" for w in (0.5, 2))
  dry = _study(*args, "--only=w", "--dry_run").stdout.splitlines()
  assert len(dry) == 2 and "--mode=eval" not in dry[0] and f"--workdir={half}" in dry[0]
  allowed = (
    "--mode=eval --allow_config_change=eval.error_weight,eval.fuse_levels,eval.score_filter_size"
  )
  assert f"--workdir={two} " in dry[1] and allowed in dry[1]
  assert dry[1].endswith(f"# on a copy of {half}'s checkpoints")
  # The whole study: d trains, then both of w's runs evaluate copies of its checkpoints.
  result = _study(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "3 runs to do and 0 to score" in result.stdout
  assert "2 of the runs to do differ from another only in eval.error_weight" in result.stdout
  trained = runs / "d/real/pouta/weave"
  checkpoints = sorted(p.relative_to(trained) for p in (trained / "checkpoints").rglob("*"))
  default = json.loads((trained / "config.json").read_text())["eval"]["error_weight"]
  assert default == 1.0  # POUTA's
  for run, weight in ((half, 0.5), (two, 2)):
    assert json.loads((run / "scored_from.json").read_text()) == {"source": str(trained)}
    copied = sorted(p.relative_to(run) for p in (run / "checkpoints").rglob("*"))
    assert copied == checkpoints
    assert all(
      (run / p).read_bytes() == (trained / p).read_bytes() for p in copied if (run / p).is_file()
    )
    assert json.loads((run / "config.json").read_text())["eval"]["error_weight"] == weight
    change = json.loads((run / "config_changes.jsonl").read_text())
    assert (change["key"], change["stored"], change["new"]) == ("eval.error_weight", 1.0, weight)
  # The oracle: the trained run evaluated by pouta_jax.main with the weight (with the study's
  # threads, so that both sum in one order).
  direct = tmp_path / "direct"
  shutil.copytree(trained, direct)
  command = [a for a in dry[0].split() if a.startswith("--config")]  # half's
  evaluated = subprocess.run(
    [sys.executable, "-m", "pouta_jax.main", f"--workdir={direct}", "--mode=eval", *command]
    + ["--allow_config_change=eval.error_weight"],
    cwd=REPO,
    env={**os.environ, **sweep.thread_env(1)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  scored = json.loads((half / "metrics.json").read_text())["pouta"]
  expected = json.loads((direct / "metrics.json").read_text())["pouta"]
  assert scored["weave"] == expected["weave"] and scored["validation"] == expected["validation"]
  at_default = json.loads((trained / "metrics.json").read_text())["pouta"]
  assert scored["validation"] != at_default["validation"]
  # A copy stopped before its evaluation (its config still the trained run's) goes on as one.
  kept = (two / "metrics.json").read_text()
  (two / "metrics.json").unlink()
  (two / "config.json").write_text((trained / "config.json").read_text())
  resumed = _study(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "1 runs to do" in resumed.stdout
  again, before = (json.loads(text)["pouta"] for text in ((two / "metrics.json").read_text(), kept))
  assert again["weave"] == before["weave"] and again["validation"] == before["validation"]
  # A default of a scoring key changed under a finished run (here pinned by the study): its
  # model evaluated again with it, in place; the question that varies the key keeps its values.
  pinned = "pinned={'configs/pouta.py': ('--config.eval.error_weight=2',)}, questions="
  path.write_text(path.read_text().replace("questions=", pinned))
  checkpoints = {p: p.read_bytes() for p in (trained / "checkpoints").rglob("*") if p.is_file()}
  rescored = _study(*args)
  assert rescored.returncode == 0, rescored.stderr[-3000:]
  assert "0 runs to do and 1 to score on the current validation set or with today's" in (
    rescored.stdout
  )
  now = json.loads((trained / "metrics.json").read_text())["pouta"]
  assert now["weave"] == again["weave"] and now["validation"] == again["validation"]  # two's
  assert json.loads((trained / "config.json").read_text())["eval"]["error_weight"] == 2
  assert json.loads((half / "config.json").read_text())["eval"]["error_weight"] == 0.5
  assert {p: p.read_bytes() for p in (trained / "checkpoints").rglob("*") if p.is_file()} == (
    checkpoints
  )


@pytest.mark.parametrize(
  "questions, message",
  [
    ('[dict(name="a", question="?", configs=("configs/pouta.py",), sweeps=())]', "unknown keys"),
    (
      '[dict(name="a", question="?", configs=("configs/pouta.py",), sweep=("loss.nope=1,2",))]',
      "no key 'loss.nope'",
    ),
    (
      '[dict(name="a", question="?", configs=("configs/pouta.py",))] * 2',
      "names must be given and distinct",
    ),
    (
      '[dict(name="a", question="?", configs=("configs/pouta.py",), include=(("m/*", 3),))]',
      "include entry ('m/*', 3) is not a glob or a tuple of globs",
    ),
    (
      '[dict(name="a", question="?", configs=("configs/pouta.py",), cost_at_most="0.25")]',
      "cost_at_most='0.25' is not a positive number",
    ),
  ],
)
def test_bad_study_files_are_refused_before_running(tmp_path, questions, message):
  path = _study_file(tmp_path, questions)
  result = _study(f"--study={path}", f"--workdir={tmp_path / 'runs'}")
  assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "runs").exists()


def test_a_study_file_with_a_missing_or_unknown_key_is_refused(tmp_path):
  path = _study_file(tmp_path, "[]")
  path.write_text(path.read_text().replace('select="pixel_ap"', 'selected="pixel_ap"'))
  result = _study(f"--study={path}", f"--workdir={tmp_path / 'runs'}", "--dry_run")
  assert result.returncode == 1 and "expected the keys ['common', 'datasets'" in result.stderr


def test_unknown_questions_are_named(tmp_path):
  result = _study("--only=levels,nope", f"--workdir={tmp_path / 'runs'}", "--dry_run")
  assert result.returncode == 1 and "--only: no questions ['levels', 'nope']" in result.stderr
