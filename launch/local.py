"""Runs `pouta_jax.main` on this machine: one process per category and sweep point, a few at a time.

    python launch/local.py --config=configs/pouta.py --preset=tiny \
        --categories=weave,pill --workdir=runs/pouta --parallel=2 \
        [--sweep=model.compare=both,encoder,decoder] [--zip=k1=a,b --zip=k2=c,d] [--seeds=3] \
        [--config_sweep] [--dry_run] [-- --config.optim.lr=2e-4 ...]

    python launch/local.py --config=configs/draem.py --categories=all --workdir=runs/draem \
        --devices=0,1,2,3,4,5,6,7 --devices_per_job=2 [--memory_fraction=0.9] \
        -- --config.data.root=/data/mvtec_ad --config.mesh.require_platform=gpu

Each run gets `<workdir>/<sweep point>/<category>` (no point folder without a sweep) and
`--threads_per_process` CPU threads, so parallel runs do not oversubscribe the cores. On a GPU
node, `--devices` (GPU ids) split into groups of `--devices_per_job` run that many jobs side by
side, each on its own GPUs (CUDA_VISIBLE_DEVICES; `--memory_fraction` sets how much of each
GPU's memory jax takes). `--dry_run` prints the exact commands (a job's GPUs as they would be
given if every job took as long) and runs nothing. Gather the results with
`python -m pouta_jax.sweep --root=<workdir>`.
"""

from __future__ import annotations

import shlex
import sys

from absl import flags

from pouta_jax import errors, sweep

sweep.define_launch_flags()
_PARALLEL = flags.DEFINE_integer(
  "parallel", 1, "Runs at a time (without --devices).", lower_bound=1
)
_THREADS = flags.DEFINE_integer("threads_per_process", 1, "CPU threads per run.", lower_bound=1)
_DEVICES = flags.DEFINE_list("devices", [], "GPU ids on this node to share out among the runs.")
_DEVICES_PER_JOB = flags.DEFINE_integer(
  "devices_per_job", 1, "GPUs of each run (with --devices).", lower_bound=1
)
_MEMORY_FRACTION = flags.DEFINE_float(
  "memory_fraction",
  0.0,
  "With --devices: the fraction of each GPU's memory jax preallocates (0: jax's default).",
  lower_bound=0.0,
  upper_bound=1.0,
)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def device_slots(devices: list[str], per_job: int, memory_fraction: float) -> list[dict[str, str]]:
  """The environment of each group of `per_job` GPUs: disjoint groups, one run at a time each."""
  if len(set(devices)) != len(devices):
    raise errors.ConfigError(f"--devices={','.join(devices)}: a GPU is listed twice")
  if len(devices) % per_job:
    raise errors.ConfigError(
      f"--devices_per_job={per_job} does not divide the {len(devices)} GPUs of "
      f"--devices={','.join(devices)}"
    )
  memory = {"XLA_PYTHON_CLIENT_MEM_FRACTION": str(memory_fraction)} if memory_fraction else {}
  return [
    {"CUDA_VISIBLE_DEVICES": ",".join(devices[i : i + per_job]), **memory}
    for i in range(0, len(devices), per_job)
  ]


def main(argv: list[str]) -> None:
  runs = [job.command() for job in sweep.jobs_from_flags(argv[1:])]
  env = sweep.thread_env(_THREADS.value)
  if _DEVICES.value:
    slots = device_slots(_DEVICES.value, _DEVICES_PER_JOB.value, _MEMORY_FRACTION.value)
  elif _DEVICES_PER_JOB.value != 1 or _MEMORY_FRACTION.value:
    raise errors.ConfigError("--devices_per_job and --memory_fraction need --devices")
  else:
    slots = [{}] * _PARALLEL.value
  if _DRY_RUN.value:
    for i, command in enumerate(runs):
      variables = {**env, **slots[i % len(slots)]}
      prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
      print(f"{prefix} {shlex.join(command)}")
    return
  failed = sweep.run_all(runs, env, slots)
  if failed:
    sys.exit("failed runs:\n" + "\n".join(failed))


if __name__ == "__main__":
  errors.run(main)
