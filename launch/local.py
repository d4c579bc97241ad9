"""Runs one `pouta_jax.main` process per category on this machine, a few at a time.

    python launch/local.py --config=configs/draem.py --preset=tiny \
        --categories=weave,pill --workdir=runs/draem --parallel=2 [--dry_run] \
        [-- --config.optim.lr=2e-4 ...]

Each run gets `<workdir>/<category>` and `--threads_per_process` CPU threads, so parallel runs do
not oversubscribe the cores. `--dry_run` prints the exact commands and runs nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", "configs/draem.py", "Config file (without argument).")
_PRESET = flags.DEFINE_string("preset", "", "Size preset appended to each category, e.g. tiny.")
_CATEGORIES = flags.DEFINE_list("categories", None, "Categories, one run each.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent of the per-category workdirs.",
                               required=True)
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


def commands(config: str, preset: str, categories: list[str], workdir: str,
             extra: list[str]) -> list[list[str]]:
  runs = []
  for category in categories:
    arg = ",".join(p for p in (category, preset) if p)
    runs.append([sys.executable, "-m", "pouta_jax.main", f"--config={config}:{arg}",
                 f"--workdir={os.path.join(workdir, category)}", *extra])
  return runs


def main(argv: list[str]) -> None:
  extra = argv[1:]
  env = thread_env(_THREADS.value)
  runs = commands(_CONFIG.value, _PRESET.value, _CATEGORIES.value, _WORKDIR.value, extra)
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
  app.run(main)
