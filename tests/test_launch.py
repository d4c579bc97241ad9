import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_local_launcher_dry_run_prints_one_command_per_category():
  result = subprocess.run(
    [
      sys.executable,
      "launch/local.py",
      "--categories=weave,pill",
      "--preset=tiny",
      "--workdir=runs/x",
      "--threads_per_process=2",
      "--dry_run",
      "--",
      "--config.optim.lr=2e-4",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  words = shlex.split(lines[1])
  assert words[:3] == [
    "XLA_FLAGS=--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2",
    "OMP_NUM_THREADS=2",
    "OPENBLAS_NUM_THREADS=2",
  ]
  assert words[4:] == [
    "-m",
    "pouta_jax.main",
    "--config=configs/draem.py:pill,tiny",
    "--workdir=runs/x/pill",
    "--config.optim.lr=2e-4",
  ]


def test_sweep_dry_run_expands_points_per_category():
  result = subprocess.run(
    [
      sys.executable,
      "launch/local.py",
      "--config=configs/pouta.py",
      "--preset=tiny",
      "--categories=weave,pill",
      "--workdir=runs/abl",
      "--sweep=model.compare=both,encoder",
      "--seeds=2",
      "--dry_run",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 * 2 * 2
  words = shlex.split(lines[-1])[3:]
  assert words[3:] == [
    "--config=configs/pouta.py:pill,tiny",
    "--workdir=runs/abl/model.compare=encoder,train.seed=1/pill",
    "--config.model.compare=encoder",
    "--config.train.seed=1",
  ]


def test_sweep_with_unknown_key_fails_before_running():
  result = subprocess.run(
    [
      sys.executable,
      "launch/local.py",
      "--categories=weave",
      "--workdir=runs/x",
      "--sweep=optim.learning_rate=1,2",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "the config has no key 'optim.learning_rate'" in result.stderr


def _dry_run(*args: str) -> list[str]:
  result = subprocess.run(
    [sys.executable, args[0], "--dry_run", *args[1:]],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout.strip().splitlines()


def test_slurm_dry_run_prints_the_array_script_jobs_and_submit(tmp_path):
  lines = _dry_run(
    "launch/slurm.py",
    "--config=configs/pouta.py",
    "--categories=weave,pill",
    f"--workdir={tmp_path}/runs",
    "--partition=gpu",
    "--nodes_per_job=2",
    "--max_running=1",
    "--config_sweep",
    "--python=python3",
    "--",
    "--config.optim.lr=2e-4",
  )
  assert not (tmp_path / "runs").exists()  # a dry run writes nothing
  slurm = f"{tmp_path}/runs/slurm"
  assert lines[0] == f"# {slurm}/array.sbatch" and lines[1] == "#!/bin/bash"
  assert "#SBATCH --array=0-9%1" in lines and "#SBATCH --nodes=2" in lines
  assert "#SBATCH --partition=gpu" in lines and "#SBATCH --requeue" in lines
  assert 'srun --kill-on-bad-exit=1 bash -c "$command"' in lines
  assert "if [ $status -eq 143 ]; then  # checkpoint saved: resume later" in lines
  jobs = lines[lines.index(f"# {slurm}/jobs.txt") + 1 : lines.index("# submit")]
  assert len(jobs) == 5 * 2  # the config's 5 ablation points x 2 categories
  assert shlex.split(jobs[-1]) == [
    "python3",
    "-m",
    "pouta_jax.main",
    "--config=configs/pouta.py:pill",
    f"--workdir={tmp_path}/runs/model.compare=both,model.guidance=True,"
    "loss.deep_supervision=False/pill",
    "--config.model.compare=both",
    "--config.model.guidance=True",
    "--config.loss.deep_supervision=False",
    "--config.optim.lr=2e-4",
    "--distributed",
  ]
  assert lines[-1] == f"sbatch --parsable {slurm}/array.sbatch"


def test_tpu_vm_dry_run_runs_each_job_on_every_worker():
  lines = _dry_run(
    "launch/tpu_vm.py",
    "--tpu=pod",
    "--zone=us-central2-b",
    "--project=p",
    "--categories=weave,pill",
    "--workdir=/mnt/runs",
    "--seeds=2",
  )
  assert len(lines) == 2 * 2
  words = shlex.split(lines[-1])
  assert words[:9] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "pod",
    "--zone=us-central2-b",
    "--project=p",
    "--worker=all",
  ]
  assert words[9] == (
    "--command=cd ~/pouta_jax && python3 -m pouta_jax.main "
    "--config=configs/draem.py:pill --workdir=/mnt/runs/train.seed=1/pill "
    "--config.train.seed=1 --distributed"
  )


def test_launchers_reject_unknown_categories_before_running():
  for launcher in ("launch/local.py", "launch/slurm.py"):
    result = subprocess.run(
      [sys.executable, launcher, "--categories=weave,bottle", "--workdir=runs/x", "--dry_run"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert result.returncode != 0
    assert "['bottle'] not among the embedded categories" in result.stderr


def test_slurm_without_sbatch_says_so_and_writes_nothing(tmp_path):
  result = subprocess.run(
    [sys.executable, "launch/slurm.py", "--categories=weave", f"--workdir={tmp_path}/runs"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={"PATH": "/nonexistent"},
  )
  assert result.returncode != 0 and "sbatch not found" in result.stderr
  assert not (tmp_path / "runs").exists()


def _local(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "launch/local.py", "--workdir=runs/x", *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_local_launcher_gives_each_job_its_own_gpus():
  result = _local(
    "--categories=weave,pill,washer",
    "--devices=0,1,2,3",
    "--devices_per_job=2",
    "--memory_fraction=0.45",
    "--dry_run",
  )
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert [w for line in lines for w in line if w.startswith("CUDA_VISIBLE_DEVICES=")] == [
    "CUDA_VISIBLE_DEVICES=0,1",
    "CUDA_VISIBLE_DEVICES=2,3",
    "CUDA_VISIBLE_DEVICES=0,1",
  ]
  assert all("XLA_PYTHON_CLIENT_MEM_FRACTION=0.45" in line for line in lines)


def test_local_launcher_refuses_gpu_groups_that_cannot_work():
  for flags, message in (
    (["--devices=0,1,2", "--devices_per_job=2"], "--devices_per_job=2 does not divide the 3 GPUs"),
    (["--devices=0,0"], "--devices=0,0: a GPU is listed twice"),
    (["--devices_per_job=2"], "--devices_per_job and --memory_fraction need --devices"),
  ):
    result = _local("--categories=weave", *flags, "--dry_run")
    assert result.returncode == 1 and f"FATAL: {message}" in result.stderr, result.stderr


RUN_ALL = """
import json, sys
sys.path.insert(0, "launch")
import local
# One write per line (shorter than the pipe's atomic size): jobs share the launcher's stdout.
job = ("import json, os, sys, time; start = time.time(); time.sleep(0.6); "
       "line = json.dumps([sys.argv[1], os.environ['CUDA_VISIBLE_DEVICES'], start, time.time()]); "
       "os.write(1, (line + '\\\\n').encode()); sys.exit(sys.argv[1] == 'bad')")
names = ["a", "b", "c", "bad", "e"]
slots = [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
failed = local.run_all([[sys.executable, "-c", job, n] for n in names], {}, slots)
print(json.dumps(failed))
"""


def test_local_launcher_never_runs_two_jobs_on_the_same_gpus():
  result = subprocess.run(
    [sys.executable, "-c", RUN_ALL], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  *runs, failed = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert sorted(name for name, *_ in runs) == ["a", "b", "bad", "c", "e"]
  assert len(failed) == 1 and failed[0].endswith(" bad")
  for gpus in ("0,1", "2,3"):
    spans = sorted((start, end) for _, g, start, end in runs if g == gpus)
    assert spans and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # one at a time
  assert {g for _, g, *_ in runs} == {"0,1", "2,3"}


def test_all_categories_are_mvtec_ads_fifteen(tmp_path):
  from pouta_jax.config import MVTEC_AD_CATEGORIES

  for category in MVTEC_AD_CATEGORIES:
    (tmp_path / category / "train" / "good").mkdir(parents=True)
  result = _local("--categories=all", "--dry_run", "--", f"--config.data.root={tmp_path}")
  assert result.returncode == 0, result.stderr
  configs = [
    w for line in result.stdout.splitlines() for w in shlex.split(line) if w.startswith("--config=")
  ]
  assert configs == [f"--config=configs/draem.py:{c}" for c in MVTEC_AD_CATEGORIES]
