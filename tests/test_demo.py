"""`make demo`'s command on a short schedule: runs in worker processes, one log per run, one
table for all, programs in the compilation cache; here on the validation draw of the data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(140)


def _demo(tmp_path, *flags):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "pouta_jax.demo",
      f"--workdir={tmp_path / 'demo'}",
      "--models=draem",
      "--categories=weave,pill",
      "--num_steps=2",
      "--jobs=2",
      f"--compilation_cache={tmp_path / 'cache'}",
      "--embedded_seed=1",
      *flags,
    ],
    cwd=tmp_path,  # the embedded dataset lands in tmp_path/outputs/data
    env={k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_demo_runs_in_workers_and_gathers_every_run(tmp_path):
  workdir = tmp_path / "demo"
  result = _demo(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  finished = re.findall(r"^\[(\d)/2\] draem (\w+): image AUROC", result.stdout, re.MULTILINE)
  assert sorted(finished) in ([("1", "pill"), ("2", "weave")], [("1", "weave"), ("2", "pill")])
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert set(metrics) == {"draem", "draem_untrained"}
  assert set(metrics["draem"]) >= {"weave", "pill", "mean"}
  for category in ("weave", "pill"):
    assert f"train {category}" in (workdir / "draem" / f"{category}.log").read_text()
    assert (workdir / "draem" / category / "heatmaps").is_dir()
  caption = (workdir / "results.md").read_text()
  assert "2 runs at once" in caption and "validation draw, seed 1" in caption
  # Thresholds from each run's validation split (the demo's default 0.2), and the test F1 at them.
  assert "Thresholds from each run's validation set (20% of" in caption
  assert "**pixel_f1_at_val_thr** (%)" in caption
  assert 0 <= metrics["draem"]["mean"]["pixel_f1_at_val_thr"] <= 1
  thresholds = json.loads((workdir / "draem" / "pill" / "thresholds.json").read_text())["pill"]
  assert set(thresholds) == {"oracle", "validation"}
  # The runs trained on the validation draw, not on the dataset the README reports.
  config = json.loads((workdir / "draem" / "weave" / "config.json").read_text())
  assert config["data"]["embedded_seed"] == 1 and config["data"]["root"] == ""
  # DRAEM scored as POUTA is by default (its own default: the map alone), and the caption says so.
  assert config["eval"]["error_weight"] == 1.0
  assert "draem: its map plus 1 x its reconstruction error (--error_weight" in caption
  built = tmp_path / "outputs/data/embedded_seed1/pill/BUILD.json"
  assert json.loads(built.read_text())["seed"] == 1
  assert not (tmp_path / "outputs/data/embedded").exists()
  # The runs' programs went to the demo's compilation cache (the train step among them).
  assert any("step" in p.name for p in (tmp_path / "cache").iterdir())
  # A demo with other settings (or a later version's) on these runs: refused before any run
  # starts, naming the run and the key; the runs are left as they were.
  written = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
  result = _demo(tmp_path, "--val_fraction=0")
  assert result.returncode == 1
  assert f"{workdir}/draem/weave holds a demo run with other settings" in result.stderr
  assert "config.data.val_fraction: stored 0.2, now 0.0" in result.stderr
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == written
