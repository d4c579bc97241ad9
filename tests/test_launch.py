import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_local_launcher_dry_run_prints_one_command_per_category():
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--categories=weave,pill", "--preset=tiny",
       "--workdir=runs/x", "--threads_per_process=2", "--dry_run", "--",
       "--config.optim.lr=2e-4"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  words = shlex.split(lines[1])
  assert words[:3] == ["XLA_FLAGS=--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2",
                       "OMP_NUM_THREADS=2", "OPENBLAS_NUM_THREADS=2"]
  assert words[4:] == ["-m", "pouta_jax.main", "--config=configs/draem.py:pill,tiny",
                       "--workdir=runs/x/pill", "--config.optim.lr=2e-4"]


def test_sweep_dry_run_expands_points_per_category():
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--config=configs/pouta.py", "--preset=tiny",
       "--categories=weave,pill", "--workdir=runs/abl", "--sweep=model.compare=both,encoder",
       "--seeds=2", "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 * 2 * 2
  words = shlex.split(lines[-1])[3:]
  assert words[3:] == ["--config=configs/pouta.py:pill,tiny",
                       "--workdir=runs/abl/model.compare=encoder,train.seed=1/pill",
                       "--config.model.compare=encoder", "--config.train.seed=1"]


def test_sweep_with_unknown_key_fails_before_running():
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--categories=weave", "--workdir=runs/x",
       "--sweep=optim.learning_rate=1,2"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "the config has no key 'optim.learning_rate'" in result.stderr
