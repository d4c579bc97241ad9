"""`make demo`'s command on a short schedule: runs in worker processes, one log per run, one
table for all."""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    ],
    cwd=tmp_path,  # the embedded dataset lands in tmp_path/outputs/data
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
  assert "2 runs at once" in (workdir / "results.md").read_text()
