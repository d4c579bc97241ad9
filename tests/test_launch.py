import base64
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(20)


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
    env={**os.environ, "XLA_FLAGS": "--xla_dump_to=/tmp/x"},
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2
  words = shlex.split(lines[1])
  assert words[:3] == [  # the user's XLA_FLAGS kept
    "XLA_FLAGS=--xla_dump_to=/tmp/x "
    "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2",
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
    f"--workdir={tmp_path}/runs/model.compare=difference,model.guidance=True,"
    "loss.deep_supervision=False/pill",
    "--config.model.compare=difference",
    "--config.model.guidance=True",
    "--config.loss.deep_supervision=False",
    "--config.optim.lr=2e-4",
    "--distributed",
  ]
  assert lines[-1] == f"sbatch --parsable {slurm}/array.sbatch"


def _tpu_vm(*args: str) -> tuple[str, list[list[str]]]:
  """The driver script and the commands `launch/tpu_vm.py --dry_run` prints."""
  lines = _dry_run("launch/tpu_vm.py", "--tpu=pod", "--zone=us-central2-b", "--project=p", *args)
  split = lines.index("# commands")
  assert lines[0] == "# driver script (every worker)"
  return "\n".join(lines[1:split]) + "\n", [shlex.split(c) for c in lines[split + 1 :]]


SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=us-central2-b", "--project=p"]


def test_tpu_vm_dry_run_starts_one_detached_driver_on_every_worker():
  script, commands = _tpu_vm("--categories=weave,pill", "--workdir=/mnt/runs", "--seeds=2")
  assert len(commands) == 1
  assert commands[0][:-1] == SSH + ["--worker=all"]
  remote = commands[0][-1].removeprefix("--command=")
  assert remote.startswith('cd "$HOME"/pouta_jax && mkdir -p /mnt/runs/logs && ')
  assert "(setsid nohup bash /mnt/runs/logs/driver-$(hostname).sh >> " in remote
  encoded = next(w for w in shlex.split(remote) if len(w) > 100)  # the script, in base64
  assert base64.b64decode(encoded).decode() == script
  job = (
    "python3 -m pouta_jax.main --config=configs/draem.py:pill "
    "--workdir=/mnt/runs/train.seed=1/pill --config.train.seed=1 --distributed"
  )
  assert f"\n  {job}\n" in script
  assert script.count("for attempt in $(seq 0 3)") == 4  # --relaunch's default, per job


def test_tpu_vm_follow_and_attach_tail_the_worker_logs():
  tail = SSH + [
    "--worker=0",
    '--command=cd "$HOME"/pouta_jax && tail -n +1 -F /r/logs/worker-*.log',
  ]
  _, commands = _tpu_vm("--categories=weave", "--workdir=/r", "--follow")
  assert len(commands) == 2 and commands[1] == tail
  lines = _dry_run(
    "launch/tpu_vm.py", "--tpu=pod", "--zone=us-central2-b", "--project=p", "--workdir=/r",
    "--attach",
  )  # fmt: skip
  assert [shlex.split(line) for line in lines] == [tail]


HOSTILE = "/runs dir;touch INJECTED_1;$(touch INJECTED_2)`touch INJECTED_3`'\"x"


def test_tpu_vm_runs_no_value_as_shell_code(tmp_path):
  """The start command, run by bash as a worker would run it: each value stays one word."""
  home = tmp_path / "home"
  (home / "repo").mkdir(parents=True)
  workdir = str(tmp_path) + HOSTILE
  _, commands = _tpu_vm(
    "--categories=weave", f"--workdir={workdir}", "--repo_dir=~/repo", "--python=true"
  )
  remote = commands[0][-1].removeprefix("--command=")
  done = subprocess.run(
    ["bash", "-c", remote], cwd=tmp_path, env={"HOME": str(home), "PATH": os.environ["PATH"]},
    capture_output=True, text=True, timeout=30,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr
  logs = Path(workdir) / "logs"
  for _ in range(100):  # the driver runs detached; its one job is `true`
    if any("all 1 jobs ended; 0 failed" in p.read_text() for p in logs.glob("worker-*.log")):
      break
    time.sleep(0.1)
  else:
    raise AssertionError(f"the driver did not run: {list(logs.iterdir())}")
  assert not list(tmp_path.rglob("INJECTED*")), "a value ran as shell code"


def test_slurm_job_lines_run_as_the_words_they_name(tmp_path):
  """Each jobs.txt line is what srun's `bash -c "$command"` runs: its values stay words."""
  workdir = str(tmp_path / "runs") + HOSTILE
  lines = _dry_run(
    "launch/slurm.py", "--categories=weave", f"--workdir={workdir}", "--python=echo",
    f"--script_dir={tmp_path / 'slurm'}",
  )  # fmt: skip
  job = lines[lines.index(f"# {tmp_path / 'slurm'}/jobs.txt") + 1]
  ran = subprocess.run(["bash", "-c", job], cwd=tmp_path, capture_output=True, text=True)
  assert ran.returncode == 0 and f" --workdir={workdir}/weave\n" in ran.stdout, ran.stderr
  assert not list(tmp_path.rglob("INJECTED*")), "a value ran as shell code"
  refused = subprocess.run(
    [sys.executable, "launch/slurm.py", "--dry_run", "--categories=weave", f"--workdir={workdir}"],
    cwd=REPO, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert refused.returncode == 1 and "which SLURM does not quote" in refused.stderr


def test_tpu_vm_refuses_worker_logs_in_a_bucket():
  result = subprocess.run(
    [sys.executable, "launch/tpu_vm.py", "--tpu=pod", "--zone=z", "--categories=weave"]
    + ["--workdir=gs://bucket/runs", "--dry_run"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 1
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith("FATAL: --worker_log_dir=gs://bucket/runs/logs: the workers append their logs")
  )
  assert result.stdout == ""


def test_tpu_vm_driver_runs_detached_and_restarts_preempted_jobs(tmp_path):
  """The start command, run by bash as a worker would: it returns at once; the driver then
  runs each job, restarts the preempted one and counts the failed one."""
  calls = tmp_path / "calls.txt"
  stub = tmp_path / "python"  # exits 143 (preempted) on pill's first run, 3 on weave
  stub.write_text(
    "#!/bin/bash\n"
    f'echo "$*" >> {calls}\n'
    'case "$*" in\n'
    f'  *:pill*) [ "$(grep -c :pill {calls})" -ge 2 ] && exit 0 || {{ sleep 1; exit 143; }} ;;\n'
    "  *) exit 3 ;;\n"
    "esac\n"
  )
  stub.chmod(0o755)
  _, commands = _tpu_vm(
    "--categories=pill,weave",
    f"--workdir={tmp_path}/runs",
    f"--repo_dir={tmp_path}",
    f"--python={stub}",
    "--relaunch=2",
  )
  remote = commands[0][-1].removeprefix("--command=")
  started = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, timeout=10)
  assert started.returncode == 0, started.stderr
  log = next((tmp_path / "runs" / "logs").glob("worker-*.log"))
  assert started.stdout.strip().endswith(f"log: {log}")
  assert "all 2 jobs ended" not in log.read_text()  # still running: pill sleeps first
  deadline = time.monotonic() + 30
  while "all 2 jobs ended" not in log.read_text() and time.monotonic() < deadline:
    time.sleep(0.2)
  text = log.read_text()
  assert [line.split(" ", 1)[1] for line in text.splitlines() if "ended" in line] == [
    "job 1/2 ended with exit code 0",
    "job 2/2 ended with exit code 3",
    "all 2 jobs ended; 1 failed",
  ]
  runs = calls.read_text().splitlines()
  assert [r.split()[2].split(":")[1] for r in runs] == ["pill", "pill", "weave"]
  assert all(r.endswith("--distributed") for r in runs)


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


def test_slurm_with_a_bucket_workdir_needs_a_shared_script_folder(tmp_path):
  refused = subprocess.run(
    [sys.executable, "launch/slurm.py", "--categories=weave", "--workdir=gs://b/runs", "--dry_run"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert refused.returncode != 0 and "gs://b/runs: SLURM reads the job script" in refused.stderr
  lines = _dry_run(
    "launch/slurm.py",
    "--categories=weave",
    "--workdir=gs://b/runs",
    f"--script_dir={tmp_path}/slurm",
    "--python=python3",
  )
  assert lines[0] == f"# {tmp_path}/slurm/array.sbatch"
  assert shlex.split(lines[lines.index(f"# {tmp_path}/slurm/jobs.txt") + 1])[4] == (
    "--workdir=gs://b/runs/weave"
  )
  assert not list(tmp_path.rglob("gs:*")) and not (REPO / "gs:").exists()


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
from pouta_jax import sweep
# One write per line (shorter than the pipe's atomic size): jobs share the launcher's stdout.
job = ("import json, os, sys, time; start = time.time(); time.sleep(0.6); "
       "line = json.dumps([sys.argv[1], os.environ['CUDA_VISIBLE_DEVICES'], start, time.time()]); "
       "os.write(1, (line + '\\\\n').encode()); sys.exit(sys.argv[1] == 'bad')")
names = ["a", "b", "c", "bad", "e"]
slots = [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
failed = sweep.run_all([[sys.executable, "-c", job, n] for n in names], {}, slots)
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
