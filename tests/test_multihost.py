"""Two processes on 127.0.0.1 with CPU collectives form one program: each synthesises its half
of every batch (or, with categories stacked and split over processes, its own categories), they
train as one model, and process 0 alone writes the outputs."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import make_tiny_config

REPO = Path(__file__).resolve().parents[1]


def _command(
  root: Path, workdir: Path, *extra: str, config_arg: str = "configs/draem.py:weave,tiny"
) -> list[str]:
  config = make_tiny_config("draem", root)
  overrides = {
    "data.root": root,
    "model.base_width": config.model.base_width,
    "data.image_size": config.data.image_size,
    "data.batch_size": config.data.batch_size,
    "data.num_workers": 0,
    "train.num_steps": 4,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "eval.batch_size": 8,
    "eval.num_heatmaps": 1,
  }
  return [
    sys.executable,
    "-m",
    "pouta_jax.main",
    f"--config={config_arg}",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
    *extra,
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir: Path, key: str = "loss") -> list[float]:
  lines = (workdir / "scalars.jsonl").read_text().splitlines()
  return [json.loads(line)[key] for line in lines]


def _run_one_process(command: list[str]) -> None:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)


def _run_two_processes(workdir: Path, command, devices_per_process: int) -> list[tuple[str, str]]:
  """Runs `command(workdir, *process flags)` as processes 0 and 1; their (stdout, stderr)."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  port = _free_port()
  processes = [
    subprocess.Popen(
      command(
        workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"
      ),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=400) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "Outputs in" in outputs[0][0] and "Outputs in" not in outputs[1][0]
  return outputs


def test_two_processes_train_as_one(dataset_root, tmp_path):
  single, multi = tmp_path / "single", tmp_path / "multi"
  outputs = _run_two_processes(multi, lambda *a: _command(dataset_root, *a), 1)
  _run_one_process(_command(dataset_root, single))

  # One program: both processes log the same loss at every step.
  logged = [re.findall(r"process (\d) step (\d+) loss (\S+)", err) for _, err in outputs]
  assert [(s, v) for _, s, v in logged[0]] == [(s, v) for _, s, v in logged[1]]
  assert [p for p, _, _ in logged[0] + logged[1]] == ["0"] * 4 + ["1"] * 4
  # The same global batch and BatchNorm over it: the first loss equals one process's on one
  # device. Later ones drift by float rounding, which Adam's early, sign-like steps amplify in
  # this tiny network (in float64 the sharded step is exact: test_sharding.py).
  multi_losses, single_losses = _losses(multi), _losses(single)
  np.testing.assert_allclose(multi_losses[0], single_losses[0], rtol=1e-5)
  np.testing.assert_allclose(multi_losses, single_losses, rtol=2e-2)
  data_state = multi / "checkpoints" / "4" / "data"
  assert sorted(p.name for p in data_state.glob("*.json")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  metrics = json.loads((multi / "metrics.json").read_text())
  assert set(metrics["draem"]["weave"]) >= {"image_auroc", "pixel_ap"}


def test_stacked_categories_split_over_two_processes(dataset_root, tmp_path):
  """Mesh (category 2 x data 2) over 2 processes x 2 devices: each process holds one category's
  state and synthesises only that category's batches; equal to one process holding both."""

  def command(workdir, *extra):
    return _command(
      dataset_root,
      workdir,
      *extra,
      "--config.mesh.axes=(('category',2),('data',2))",
      config_arg="configs/draem.py:weave,pill,tiny",
    )

  single, multi = tmp_path / "single", tmp_path / "multi"
  _run_two_processes(multi, command, 2)
  _run_one_process(_command(dataset_root, single, config_arg="configs/draem.py:weave,pill,tiny"))

  for category in ("weave", "pill"):
    multi_losses = _losses(multi, f"loss/{category}")
    single_losses = _losses(single, f"loss/{category}")
    np.testing.assert_allclose(multi_losses[0], single_losses[0], rtol=1e-5)
    np.testing.assert_allclose(multi_losses, single_losses, rtol=3e-2)
  metrics = json.loads((multi / "metrics.json").read_text())
  assert set(metrics["draem"]) >= {"weave", "pill"}
  assert {p.name for p in (multi / "heatmaps").iterdir()} == {"weave", "pill"}
