"""Runs every category and sweep point on a Cloud TPU VM slice, one job after another, each as
one JAX program over all the slice's hosts, detached from the terminal that started them.

    python launch/tpu_vm.py --tpu=my-v4-32 --zone=us-central2-b [--project=P] \
        --repo_dir='~/pouta_jax' --config=configs/pouta.py --categories=bottle,cable \
        --workdir=/mnt/shared/runs [--sweep=...] [--relaunch=3] [--follow] [--dry_run] \
        [-- --config.data.root=/mnt/mvtec]
    python launch/tpu_vm.py --tpu=... --zone=... --workdir=/mnt/shared/runs --attach

Every worker gets the same driver script (`<worker_log_dir>/driver-<host>.sh`) over `gcloud compute
tpus tpu-vm ssh --worker=all` and starts it with setsid/nohup, so a dropped connection or a
closed laptop stops nothing. The driver runs the jobs in order (`python -m pouta_jax.main ...
--distributed`: jax.distributed connects the hosts); a job that exits 143 (preempted: it saved a
checkpoint) is started again, up to `--relaunch` times, and resumes. Each worker logs to
`<worker_log_dir>/worker-<host>.log`; `--follow` tails them after the start, `--attach` only tails.
The repository must be installed on every worker and the workdir on a filesystem they share.
`--dry_run` prints the driver script and the exact commands and runs nothing.
"""

from __future__ import annotations

import base64
import shlex
import shutil
import subprocess
import sys

from absl import flags

from pouta_jax import errors, sweep
from pouta_jax.preemption import EXIT_CODE as PREEMPTED_EXIT_CODE

sweep.define_launch_flags()
_TPU = flags.DEFINE_string("tpu", None, "TPU VM (slice) name.", required=True)
_ZONE = flags.DEFINE_string("zone", None, "Its zone.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "Its project (default: gcloud's).")
_REPO_DIR = flags.DEFINE_string("repo_dir", "~/pouta_jax", "The repository on every worker.")
_PYTHON = flags.DEFINE_string("python", "python3", "Python on the workers.")
_LOG_DIR = flags.DEFINE_string(
  "worker_log_dir", None, "Where each worker's driver and log go (default: <workdir>/logs)."
)
_RELAUNCH = flags.DEFINE_integer(
  "relaunch", 3, "Restarts of a job that was preempted (exit 143).", lower_bound=0
)
_FOLLOW = flags.DEFINE_bool("follow", False, "Tail the workers' logs after starting.")
_ATTACH = flags.DEFINE_bool("attach", False, "Only tail the logs of jobs started before.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def log_dir() -> str:
  folder = _LOG_DIR.value or f"{flags.FLAGS.workdir.rstrip('/')}/logs"
  if "://" in folder:
    raise errors.ConfigError(
      f"--worker_log_dir={folder}: the workers append their logs with the shell, which needs a "
      f"filesystem path (give --worker_log_dir when the workdir is in a bucket)"
    )
  return folder


def shell_path(path: str) -> str:
  """`path` quoted for the workers' shell, a leading `~` left to expand to their $HOME: no
  value of a flag ever runs as shell code there."""
  if path == "~" or path.startswith("~/"):
    return '"$HOME"' + (shlex.quote(path[1:]) if path[1:] else "")
  return shlex.quote(path)


def driver_script(commands: list[list[str]]) -> str:
  """The script every worker runs: the jobs in order, each restarted while it is preempted."""
  stamp = "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  lines = ["#!/bin/bash", "# pouta_jax on a TPU VM slice: written by launch/tpu_vm.py", "set -u"]
  lines += [f"cd {shell_path(_REPO_DIR.value)}", "failed=0"]
  for i, command in enumerate(commands, 1):
    name = f"job {i}/{len(commands)}"
    lines += [
      f"for attempt in $(seq 0 {_RELAUNCH.value}); do",
      f'  echo "[{stamp}] {name}, attempt $attempt:" {shlex.quote(shlex.join(command))}',
      f"  {shlex.join(command)}",
      "  status=$?",
      f"  [ $status -eq {PREEMPTED_EXIT_CODE} ] || break  # 143: preempted, checkpoint saved",
      "done",
      f'echo "[{stamp}] {name} ended with exit code $status"',
      "[ $status -eq 0 ] || failed=$((failed + 1))",
    ]
  lines += [
    f'echo "[{stamp}] all {len(commands)} jobs ended; $failed failed"',
    "exit $((failed > 0))",
    "",
  ]
  return "\n".join(lines)


def ssh_command(remote: str, worker: str = "all") -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _TPU.value, f"--zone={_ZONE.value}"]
  if _PROJECT.value:
    command.append(f"--project={_PROJECT.value}")
  return command + [f"--worker={worker}", f"--command={remote}"]


def start_command(script: str) -> list[str]:
  """Writes the driver on every worker and starts it detached (setsid, nohup, no stdin)."""
  folder = shell_path(log_dir())
  encoded = base64.b64encode(script.encode()).decode()
  driver, log = f"{folder}/driver-$(hostname).sh", f"{folder}/worker-$(hostname).log"
  return ssh_command(
    f"cd {shell_path(_REPO_DIR.value)} && mkdir -p {folder} && echo {encoded} | base64 -d > "
    f"{driver} && (setsid nohup bash {driver} >> {log} 2>&1 < /dev/null &) && "
    f'echo "started on $(hostname); log: "{log}'
  )


def follow_command() -> list[str]:
  folder = shell_path(log_dir())
  return ssh_command(
    f"cd {shell_path(_REPO_DIR.value)} && tail -n +1 -F {folder}/worker-*.log", "0"
  )


def main(argv: list[str]) -> None:
  commands = []
  if not _ATTACH.value:
    jobs = sweep.jobs_from_flags(argv[1:])
    script = driver_script([job.command(_PYTHON.value) + ["--distributed"] for job in jobs])
    commands.append(start_command(script))
  if _FOLLOW.value or _ATTACH.value:
    commands.append(follow_command())
  if _DRY_RUN.value:
    if not _ATTACH.value:
      print(f"# driver script (every worker)\n{script}# commands")
    print("\n".join(shlex.join(c) for c in commands))
    return
  if shutil.which("gcloud") is None:
    sys.exit("FATAL: gcloud not found: install the Google Cloud CLI (or use --dry_run)")
  for command in commands:  # Ctrl-C while following stops the tail, not the jobs
    if subprocess.run(command).returncode and command is not commands[-1]:
      sys.exit(f"FATAL: could not start the jobs on {_TPU.value}: {shlex.join(command)}")


if __name__ == "__main__":
  errors.run(main)
