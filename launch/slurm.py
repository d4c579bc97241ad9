"""Submits every category and sweep point as one SLURM job array; each task runs one job.

    python launch/slurm.py --config=configs/pouta.py --categories=bottle,cable,... \
        --workdir=/shared/runs/pouta --partition=gpu --time=24:00:00 --gpus_per_node=1 \
        [--nodes_per_job=2] [--max_running=15] [--sweep=...] [--seeds=3] [--dry_run] \
        [-- --config.data.root=/shared/mvtec_ad]

Writes `<workdir>/slurm/jobs.txt` (line i: task i's command) and `<workdir>/slurm/array.sbatch`,
then runs `sbatch`. `--dry_run` prints both files and the sbatch command and writes nothing.
Preemption and time limits: SLURM's SIGTERM (sent 120 s before the limit too) makes a run save a
checkpoint and exit 143; the task then requeues itself and resumes from its workdir. With
`--nodes_per_job` > 1, srun starts one process per node and they form one JAX program
(jax.distributed detects SLURM). The workdir must be on a filesystem every node sees.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from absl import flags

from pouta_jax import errors, files, sweep
from pouta_jax.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE

sweep.define_launch_flags()
_PARTITION = flags.DEFINE_string("partition", None, "SLURM partition.")
_ACCOUNT = flags.DEFINE_string("account", None, "SLURM account.")
_TIME = flags.DEFINE_string("time", "24:00:00", "Time limit per task.")
_NODES = flags.DEFINE_integer(
  "nodes_per_job", 1, "Nodes per task (one process each).", lower_bound=1
)
_GPUS = flags.DEFINE_integer("gpus_per_node", 1, "GPUs per node (0: CPU only).", lower_bound=0)
_CPUS = flags.DEFINE_integer("cpus_per_task", 8, "CPU cores per process.", lower_bound=1)
_MEM = flags.DEFINE_string("mem", "64G", "Memory per node.")
_MAX_RUNNING = flags.DEFINE_integer(
  "max_running", 0, "Tasks running at once (0: no limit).", lower_bound=0
)
_PYTHON = flags.DEFINE_string("python", sys.executable, "Python on the compute nodes.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the files and command; submit nothing.")
_SCRIPT_DIR = flags.DEFINE_string(
  "script_dir",
  None,
  "Shared folder for the array's job list, script and logs (default: <workdir>/slurm; needed "
  "when the workdir is in a bucket).",
)


# What an #SBATCH line may name unquoted.
SBATCH_SAFE = re.compile(r"[A-Za-z0-9_./%+=:,@-]+")


def sbatch_script(num_jobs: int, jobs_file: Path, log_dir: Path) -> str:
  throttle = f"%{_MAX_RUNNING.value}" if _MAX_RUNNING.value else ""
  options = {
    "job-name": "pouta_jax",
    "array": f"0-{num_jobs - 1}{throttle}",
    "partition": _PARTITION.value,
    "account": _ACCOUNT.value,
    "time": _TIME.value,
    "nodes": _NODES.value,
    "ntasks-per-node": 1,
    "gpus-per-node": _GPUS.value or None,
    "cpus-per-task": _CPUS.value,
    "mem": _MEM.value,
    "output": log_dir / "%A_%a.out",
    "open-mode": "append",  # a requeued task appends to its log
    "signal": "TERM@120",
    "requeue": "",
  }
  header = [
    f"#SBATCH --{k}={v}" if v != "" else f"#SBATCH --{k}"
    for k, v in options.items()
    if v is not None
  ]
  return "\n".join(
    [
      "#!/bin/bash",
      *header,
      "set -uo pipefail",
      f"cd {shlex.quote(str(Path.cwd()))}",
      f'command=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(jobs_file))})',
      'srun --kill-on-bad-exit=1 bash -c "$command"',
      "status=$?",
      f"if [ $status -eq {PREEMPTED_EXIT_CODE} ]; then  # checkpoint saved: resume later",
      '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
      "fi",
      "exit $status",
      "",
    ]
  )


def main(argv: list[str]) -> None:
  jobs = sweep.jobs_from_flags(argv[1:])
  multi_host = ["--distributed"] if _NODES.value > 1 else []
  lines = [shlex.join(job.command(_PYTHON.value) + multi_host) for job in jobs]
  where = _SCRIPT_DIR.value or flags.FLAGS.workdir
  if files.is_remote(where):
    raise errors.ConfigError(
      f"{where}: SLURM reads the job script and writes its logs on a filesystem, not in a "
      f"bucket; give --script_dir=<a folder the nodes share>"
    )
  folder = Path(_SCRIPT_DIR.value or Path(flags.FLAGS.workdir) / "slurm").absolute()
  if not SBATCH_SAFE.fullmatch(str(folder)):
    raise errors.ConfigError(
      f"{folder}: the array's logs are named in an #SBATCH line, which SLURM does not quote; "
      f"give --script_dir=<a folder whose path has no spaces or shell characters>"
    )
  if any("\n" in line for line in lines):
    raise errors.ConfigError("a job's flags hold a line break; jobs.txt holds one job per line")
  jobs_file, script_file = folder / "jobs.txt", folder / "array.sbatch"
  script = sbatch_script(len(jobs), jobs_file, folder)
  submit = ["sbatch", "--parsable", str(script_file)]
  if _DRY_RUN.value:
    print(f"# {script_file}\n{script}\n# {jobs_file}")
    print("\n".join(lines))
    print(f"# submit\n{shlex.join(submit)}")
    return
  if shutil.which("sbatch") is None:
    sys.exit("FATAL: sbatch not found: submit from a SLURM login node (or use --dry_run)")
  folder.mkdir(parents=True, exist_ok=True)
  jobs_file.write_text("\n".join(lines) + "\n")
  script_file.write_text(script)
  job_id = subprocess.run(submit, check=True, capture_output=True, text=True).stdout.strip()
  print(f"submitted array {job_id} ({len(jobs)} tasks); logs in {folder}")


if __name__ == "__main__":
  errors.run(main)
