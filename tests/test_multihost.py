"""Two processes on 127.0.0.1 with CPU collectives form one program: each synthesises its half
of every batch (or, with categories stacked and split over processes, its own categories), they
train as one model, and process 0 alone writes the outputs."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_main_command, xla_flags

# Scheduled by its length (see conftest). It runs beside the other tests: a process lagging
# behind the other under their load is what sharding.connect_collectives is for.
pytestmark = pytest.mark.heavy(310)

REPO = Path(__file__).resolve().parents[1]
STACKED = "configs/draem.py:weave,pill,tiny"


def _command(root: Path, workdir: Path, *extra: str, **keywords) -> list[str]:
  command = tiny_main_command(
    root,
    workdir,
    train__num_steps=4,
    train__checkpoint_every=2,
    train__log_every=1,
    eval__batch_size=8,
    eval__num_heatmaps=1,
    **keywords,
  )
  return [sys.executable, *command, *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir: Path, key: str = "loss") -> list[float]:
  lines = (workdir / "scalars.jsonl").read_text().splitlines()
  return [json.loads(line)[key] for line in lines]


@pytest.fixture(scope="module")
def single_process_runs(dataset_root, tmp_path_factory) -> dict[str, Path]:
  """Both tests' references, one process on one device each, run side by side (one per
  core) before the two-process programs."""
  root = tmp_path_factory.mktemp("single")
  commands = {
    "data": _command(dataset_root, root / "data"),
    "stacked": _command(dataset_root, root / "stacked", config_arg=STACKED),
  }
  # One device, as the other tests' runs have, under the same XLA flags: their compiled
  # programs (a key of the compilation cache includes the flags) serve these runs too.
  flags = [f for f in xla_flags().split() if not f.startswith("--xla_force_host_platform")]
  env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
  processes = {}
  for name, command in commands.items():  # output to files: neither blocks on a full pipe
    with (root / f"{name}.out").open("w") as out:
      processes[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=out)
  for name, process in processes.items():
    process.wait(timeout=600)
    assert process.returncode == 0, f"{name}: {(root / f'{name}.out').read_text()[-3000:]}"
  return {name: root / name for name in commands}


def _run_two_processes(
  workdir: Path, command, devices_per_process: int, evaluates: bool = True
) -> list[tuple[str, str]]:
  """Runs `command(workdir, *process flags)` as processes 0 and 1; their (stdout, stderr).

  Their output goes to files, so neither can block on a full pipe while the other is waited for
  (the two wait for each other at jax.distributed's shutdown barrier). One still running after
  the deadline, or after the other failed, is sent SIGABRT: Python's faulthandler then prints
  where each of its threads is.
  """
  env = {
    **os.environ,
    "XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices_per_process}"),
    "PYTHONFAULTHANDLER": "1",
  }
  port = _free_port()
  logs = [
    (workdir.with_name(f"{workdir.name}_{i}.out"), workdir.with_name(f"{workdir.name}_{i}.err"))
    for i in range(2)
  ]
  processes = []
  for i, (out, err) in enumerate(logs):
    with out.open("w") as stdout, err.open("w") as stderr:
      processes.append(
        subprocess.Popen(
          command(
            workdir,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
          ),
          cwd=REPO,
          env=env,
          stdout=stdout,
          stderr=stderr,
          text=True,
        )
      )
  deadline = time.monotonic() + 600
  while any(p.poll() is None for p in processes):
    failed = any(p.returncode not in (None, 0) for p in processes)
    if failed or time.monotonic() > deadline:
      for p in processes:
        if p.poll() is None:
          p.send_signal(signal.SIGABRT)
          p.wait()
    time.sleep(0.5)
  outputs = [(out.read_text(), err.read_text()) for out, err in logs]
  report = "\n".join(
    f"--- process {i}: exit {p.returncode}, stderr ends:\n{err[-4000:]}"
    for i, (p, (_, err)) in enumerate(zip(processes, outputs))
  )
  assert all(p.returncode == 0 for p in processes), report
  if evaluates:
    assert "Outputs in" in outputs[0][0] and "Outputs in" not in outputs[1][0]
  return outputs


def test_two_processes_train_as_one(dataset_root, single_process_runs, tmp_path):
  single, multi = single_process_runs["data"], tmp_path / "multi"
  # Training only: the other test covers evaluation over processes.
  outputs = _run_two_processes(multi, lambda *a: _command(dataset_root, *a), 1, evaluates=False)

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


def test_stacked_categories_split_over_two_processes(dataset_root, single_process_runs, tmp_path):
  """Mesh (category 2 x data 2) over 2 processes x 2 devices: each process holds one category's
  state and synthesises only that category's batches; equal to one process holding both."""

  def command(workdir, *extra):
    return _command(
      dataset_root,
      workdir,
      *extra,
      "--config.mesh.axes=(('category',2),('data',2))",
      mode="train_and_eval",
      config_arg=STACKED,
    )

  single, multi = single_process_runs["stacked"], tmp_path / "multi"
  _run_two_processes(multi, command, 2)

  for category in ("weave", "pill"):
    multi_losses = _losses(multi, f"loss/{category}")
    single_losses = _losses(single, f"loss/{category}")
    np.testing.assert_allclose(multi_losses[0], single_losses[0], rtol=1e-5)
    np.testing.assert_allclose(multi_losses, single_losses, rtol=3e-2)
  for category in ("weave", "pill"):  # each run's outputs in its folder, from process 0
    metrics = json.loads((multi / category / "metrics.json").read_text())
    assert set(metrics["draem"]) >= {category, "mean"}
    assert list((multi / category / "heatmaps").iterdir())


# Process 1 reaches the mesh's first programs (a reduction over each axis and over both) 35 s
# after process 0, as a slower compile would make it: Gloo's first connection of a group of
# devices gives up after 30 s, so without sharding.connect_collectives this fails.
LAG_SCRIPT = """
import sys, time
import jax, numpy as np
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
jax.distributed.initialize(flags["coordinator_address"], 2, int(flags["process_id"]))
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pouta_jax import sharding
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("category", "data"))
sharding.connect_collectives(mesh)
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P("category", "data")), np.ones((1, 2), np.float32))
if jax.process_index() == 1:
  time.sleep(35)
for axis, spec in ((None, P()), (0, P("data")), (1, P("category"))):
  total = jax.jit(lambda x: x.sum(axis=axis), out_shardings=NamedSharding(mesh, spec))(x)
  print("sum", axis, float(np.asarray(total.addressable_data(0)).reshape(-1)[0]), flush=True)
jax.distributed.shutdown()
"""


def test_a_process_far_behind_at_the_first_collective_is_waited_for(tmp_path):
  outputs = _run_two_processes(
    tmp_path / "lag",
    lambda workdir, *flags: [sys.executable, "-c", LAG_SCRIPT, *flags],
    devices_per_process=2,
    evaluates=False,
  )
  for stdout, _ in outputs:  # (Gloo prints its connections there too)
    sums = [line.split()[1:] for line in stdout.splitlines() if line.startswith("sum ")]
    assert sums == [["None", "4.0"], ["0", "2.0"], ["1", "2.0"]], stdout
