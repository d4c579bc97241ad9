"""Runs `pouta_jax.main` on this machine: one process per category and sweep point, a few at a time.

    python launch/local.py --config=configs/pouta.py --preset=tiny \
        --categories=weave,pill --workdir=runs/pouta --parallel=2 \
        [--sweep=model.compare=both,encoder,decoder] [--zip=k1=a,b --zip=k2=c,d] [--seeds=3] \
        [--config_sweep] [--dry_run] [-- --config.optim.lr=2e-4 ...]

Each run gets `<workdir>/<sweep point>/<category>` (no point folder without a sweep) and
`--threads_per_process` CPU threads, so parallel runs do not oversubscribe the cores.
`--dry_run` prints the exact commands and runs nothing. Gather the results with
`python -m pouta_jax.sweep --root=<workdir>`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from absl import flags

from pouta_jax import errors, sweep

sweep.define_launch_flags()
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time.", lower_bound=1)
_THREADS = flags.DEFINE_integer("threads_per_process", 1, "CPU threads per run.", lower_bound=1)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def thread_env(threads: int) -> dict[str, str]:
  """Environment that limits XLA's and the BLAS libraries' CPU threads."""
  return {
    "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
    f"intra_op_parallelism_threads={threads}",
    "OMP_NUM_THREADS": str(threads),
    "OPENBLAS_NUM_THREADS": str(threads),
  }


def main(argv: list[str]) -> None:
  runs = [job.command() for job in sweep.jobs_from_flags(argv[1:])]
  env = thread_env(_THREADS.value)
  if _DRY_RUN.value:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    for command in runs:
      print(f"{prefix} {shlex.join(command)}")
    return
  pending, running, failed = list(runs), [], []
  while pending or running:
    while pending and len(running) < _PARALLEL.value:
      command = pending.pop(0)
      running.append((command, subprocess.Popen(command, env={**os.environ, **env})))
    for command, process in list(running):
      if process.poll() is not None:
        running.remove((command, process))
        if process.returncode:
          failed.append(shlex.join(command))
    time.sleep(0.5)
  if failed:
    sys.exit("failed runs:\n" + "\n".join(failed))


if __name__ == "__main__":
  errors.run(main)
