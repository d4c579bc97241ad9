"""A pod's sweep simulated on this host: C categories x S seeds on D simulated devices, trained as
one stacked program against C x S separate programs run one after another (each on as many of
the D devices as its batch splits over, as the launchers ran sweeps before runs were stacked).

    .venv/bin/python bench/pod_sim.py [--categories=15] [--seeds=2] [--devices=16] \
        [--num_steps=20] [--category_loop=vmap] [--out=bench/results.md]

Every program is a fresh process (`XLA_FLAGS=--xla_force_host_platform_device_count=D`) that
trains the tiny DRAEM preset (`--mode=train` of experiment.run: data synthesis in-process,
checkpoints, scalars) on categories made from the embedded dataset's four (c00 = weave, c01 =
granite, ...: symbolic links), and reports its wall time, its XLA compilations (jax's backend
compile events) and its peak resident memory. The stacked program uses `--category_loop`
(`vmap`, what accelerators run; `unroll` compiles one copy of the step per run). Writes a
"Pod simulation" section into `--out` and ends with `pod_sim_speedup=<separate seconds /
stacked>` and `pod_sim_compilations=<stacked>/<separate>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

from pouta_jax import files, sharding
from pouta_jax.data import embedded

_CATEGORIES = flags.DEFINE_integer("categories", 15, "Categories (MVTec AD has 15).")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per category.")
_DEVICES = flags.DEFINE_integer("devices", 16, "Simulated devices (a v4-32 or v5e-16 slice).")
_STEPS = flags.DEFINE_integer("num_steps", 20, "Train steps per run.")
_LOOP = flags.DEFINE_enum("category_loop", "vmap", ["vmap", "unroll"], "The stacked step.")
_OUT = flags.DEFINE_string(
  "out", str(Path(__file__).with_name("results.md")), "Markdown file that gets the section."
)

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Pod simulation"

# Runs one program in its own process and prints {"seconds", "compilations", "peak_mib"}.
DRIVER = """
import json, resource, sys, time
import jax
from jax._src import dispatch
compilations = [0]

def count(event, seconds, **kwargs):
  compilations[0] += event == dispatch.BACKEND_COMPILE_EVENT

jax.monitoring.register_event_duration_secs_listener(count)
from pouta_jax import config as config_lib, experiment
arg, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = config_lib.load("draem", arg)
for key, value in overrides.items():
  section, name = key.split(".")
  config[section][name] = value
start = time.perf_counter()
experiment.run(config, workdir, mode="train")
print(json.dumps({
  "seconds": time.perf_counter() - start,
  "compilations": compilations[0],
  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def _dataset(root: Path, count: int) -> list[str]:
  """`count` categories c00, c01, ... linked to the embedded dataset's, in turn."""
  source, kinds = embedded.build(root / "embedded"), list(embedded.CATEGORIES)
  (root / "pod").mkdir()
  names = [f"c{i:02d}" for i in range(count)]
  for i, name in enumerate(names):
    (root / "pod" / name).symlink_to(source / kinds[i % len(kinds)])
  return names


def _program(arg: str, workdir: Path, overrides: dict) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # No compilation cache: every program compiles, as each did on a fresh pod.
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={_DEVICES.value}", JAX_PLATFORMS="cpu"
  )
  result = subprocess.run(
    [sys.executable, "-c", DRIVER, arg, str(workdir), json.dumps(overrides)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  if result.returncode:
    raise RuntimeError(f"{arg}: the program failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def _write_section(path: Path, text: str) -> None:
  """Replaces (or appends) the SECTION of a markdown file, atomically."""
  old = path.read_text() if path.exists() else ""
  start = old.find(SECTION)
  end = old.find("\n## ", start + 1) if start >= 0 else -1
  before = old[:start] if start >= 0 else old + ("\n" if old else "")
  after = old[end + 1 :] if end >= 0 else ""
  files.write_atomic(path, before + text + ("\n" + after if after else ""))


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    categories = _dataset(tmp, _CATEGORIES.value)
    common = {
      "data.root": str(tmp / "pod"),
      "data.num_workers": 0,
      "train.num_steps": _STEPS.value,
      "train.checkpoint_every": _STEPS.value,
    }
    stacked = _program(
      ",".join(categories) + ",tiny",
      tmp / "stacked",
      {**common, "stack.seeds": _SEEDS.value, "train.category_loop": _LOOP.value},
    )
    # A single run's batch must split over its devices: the largest such count of the D.
    batch = 8  # the tiny preset's
    single = next(n for n in range(_DEVICES.value, 0, -1) if sharding.layouts(n, 0, batch))
    separate = []
    for category in categories:
      for seed in range(_SEEDS.value):
        overrides = {**common, "train.seed": seed, "mesh.num_devices": single}
        separate.append(_program(f"{category},tiny", tmp / f"{category}_{seed}", overrides))

  runs = _CATEGORIES.value * _SEEDS.value
  total = {
    "seconds": sum(p["seconds"] for p in separate),
    "compilations": sum(p["compilations"] for p in separate),
    "peak_mib": max(p["peak_mib"] for p in separate),
  }
  speedup = total["seconds"] / stacked["seconds"]
  text = "\n".join(
    [
      SECTION,
      "",
      f"{time.strftime('%Y-%m-%d')}, `bench/pod_sim.py`: {_CATEGORIES.value} categories x "
      f"{_SEEDS.value} seeds of tiny DRAEM, {_STEPS.value} steps, {_DEVICES.value} simulated "
      f"CPU devices; the stacked program's step: {_LOOP.value}; separate programs on "
      f"{single} devices each, one after another.",
      "",
      "| programs | wall s | XLA compilations | peak host MiB (one process) |",
      "|---|---|---|---|",
      f"| 1 stacked ({runs} runs) | {stacked['seconds']:.1f} | {stacked['compilations']} | "
      f"{stacked['peak_mib']:.0f} |",
      f"| {runs} separate | {total['seconds']:.1f} | {total['compilations']} | "
      f"{total['peak_mib']:.0f} |",
      "",
    ]
  )
  _write_section(Path(_OUT.value), text)
  print(text)
  print(f"pod_sim_speedup={speedup:.3g}")
  print(f"pod_sim_compilations={stacked['compilations']}/{total['compilations']}")


if __name__ == "__main__":
  app.run(main)
