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
pytestmark = pytest.mark.heavy(115)


def test_demo_runs_in_workers_and_gathers_every_run(tmp_path):
  workdir = tmp_path / "demo"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pouta_jax.demo",
      f"--workdir={workdir}",
      "--models=draem",
      "--categories=weave,pill",
      "--num_steps=2",
      "--jobs=2",
      f"--compilation_cache={tmp_path / 'cache'}",
      "--embedded_seed=1",
    ],
    cwd=tmp_path,  # the embedded dataset lands in tmp_path/outputs/data
    env={k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},
    capture_output=True,
    text=True,
    timeout=600,
  )
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
  # The runs trained on the validation draw, not on the dataset the README reports.
  config = json.loads((workdir / "draem" / "weave" / "config.json").read_text())
  assert config["data"]["root"] == "outputs/data/embedded_seed1"
  assert (tmp_path / "outputs/data/embedded_seed1/pill/BUILD.json").is_file()
  assert not (tmp_path / "outputs/data/embedded").exists()
  # The runs' programs went to the demo's compilation cache (the train step among them).
  assert any("step" in p.name for p in (tmp_path / "cache").iterdir())
