"""Runs `pouta_jax.main` on this machine: one process per category and sweep point, a few at a time.

    python launch/local.py --config=configs/pouta.py --preset=tiny \
        --categories=weave,pill --workdir=runs/pouta --parallel=2 \
        [--sweep=model.compare=both,encoder,decoder] [--zip=k1=a,b --zip=k2=c,d] [--seeds=3] \
        [--dry_run] [-- --config.optim.lr=2e-4 ...]

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

from absl import app, flags

from pouta_jax import config as config_lib, sweep

_CONFIG = flags.DEFINE_string("config", "configs/draem.py", "Config file (without argument).")
_PRESET = flags.DEFINE_string("preset", "", "Size preset appended to each category, e.g. tiny.")
_CATEGORIES = flags.DEFINE_list("categories", None, "Categories, one run each.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent of the per-run workdirs.", required=True)
_SWEEP = flags.DEFINE_multi_string("sweep", [], "key=v1,v2,...: one product axis each.")
_ZIP = flags.DEFINE_multi_string("zip", [], "key=v1,v2,...: all --zip flags form one axis.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 per setting.", lower_bound=1)
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
             points: list[dict[str, str]], extra: list[str]) -> list[list[str]]:
  runs = []
  for point in points:
    for category in categories:
      arg = ",".join(p for p in (category, preset) if p)
      folder = os.path.join(workdir, sweep.point_name(point), category) if point else (
          os.path.join(workdir, category))
      runs.append([sys.executable, "-m", "pouta_jax.main", f"--config={config}:{arg}",
                   f"--workdir={folder}", *(f"--config.{k}={v}" for k, v in point.items()),
                   *extra])
  return runs


def main(argv: list[str]) -> None:
  extra = argv[1:]
  env = thread_env(_THREADS.value)
  base = config_lib.load_file(_CONFIG.value, ",".join(
      p for p in (_CATEGORIES.value[0], _PRESET.value) if p))
  try:
    points = sweep.expand(base, _SWEEP.value, _ZIP.value, _SEEDS.value)
  except sweep.SweepError as e:
    sys.exit(f"FATAL: {e}")
  runs = commands(_CONFIG.value, _PRESET.value, _CATEGORIES.value, _WORKDIR.value, points, extra)
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
