"""Runs every category and sweep point on a Cloud TPU VM slice, one job after another, each as
one JAX program over all the slice's hosts (`--worker=all`).

    python launch/tpu_vm.py --tpu=my-v4-32 --zone=us-central2-b [--project=P] \
        --repo_dir='~/pouta_jax' --config=configs/pouta.py --categories=bottle,cable \
        --workdir=/mnt/shared/runs [--sweep=...] [--dry_run] [-- --config.data.root=/mnt/mvtec]

Each job is `gcloud compute tpus tpu-vm ssh ... --worker=all --command='cd REPO && python -m
pouta_jax.main ... --distributed'`: every host starts the same command and jax.distributed
connects them (it detects TPU VMs). The repository must be installed on every worker and the
workdir on a filesystem they share. `--dry_run` prints the exact commands and runs nothing.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

from absl import flags

from pouta_jax import errors, sweep

sweep.define_launch_flags()
_TPU = flags.DEFINE_string("tpu", None, "TPU VM (slice) name.", required=True)
_ZONE = flags.DEFINE_string("zone", None, "Its zone.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "Its project (default: gcloud's).")
_REPO_DIR = flags.DEFINE_string("repo_dir", "~/pouta_jax", "The repository on every worker.")
_PYTHON = flags.DEFINE_string("python", "python3", "Python on the workers.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def ssh_command(remote: str) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _TPU.value, f"--zone={_ZONE.value}"]
  if _PROJECT.value:
    command.append(f"--project={_PROJECT.value}")
  # repo_dir stays unquoted so that ~ expands on the worker.
  return command + ["--worker=all", f"--command=cd {_REPO_DIR.value} && {remote}"]


def main(argv: list[str]) -> None:
  jobs = sweep.jobs_from_flags(argv[1:])
  commands = [
    ssh_command(shlex.join(job.command(_PYTHON.value) + ["--distributed"])) for job in jobs
  ]
  if _DRY_RUN.value:
    print("\n".join(shlex.join(c) for c in commands))
    return
  if shutil.which("gcloud") is None:
    sys.exit("FATAL: gcloud not found: install the Google Cloud CLI (or use --dry_run)")
  failed = [shlex.join(c) for c in commands if subprocess.run(c).returncode]
  if failed:
    sys.exit("failed runs:\n" + "\n".join(failed))


if __name__ == "__main__":
  errors.run(main)
