"""The cost of bounding the steps in flight: the train loop waits for step n-2 before it
dispatches step n (train.MAX_STEPS_IN_FLIGHT), so a preemption notice is acted on within a few
step times. Unbounded, the host queues steps up to the next log or checkpoint step.

    .venv/bin/python bench/step_bound.py [--settings=tiny,headline] [--repeats=3]

Both contenders run the real loop (`train.train`: data pipeline, steps, one checkpoint at the
end) on the embedded dataset, in turns, in processes of their own; only the bound differs.
Ends with `step_bound_cost_<setting>=<bounded seconds / unbounded seconds - 1>` (target < 0.02).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import harness
from absl import app, flags

from pouta_jax import config as config_lib, train
from pouta_jax.data import category_folder, embedded

# (base width, image size, batch, steps per timed run): tiny is the demo's setting, headline
# DRAEM's full architecture at 128 px (see train_step.py). Without harness.MALLOC_ENV: it keeps
# every freed page mapped, and two headline processes then outgrew 24 GiB.
SETTINGS = {
  "tiny": (16, 64, 8, 40),
  "headline": (128, 128, 4, 3),
}
_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), "Settings to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per contender.")


def loop(setting: str, max_in_flight: int) -> tuple:
  """A contender: one timed iteration is a whole train run of a fresh workdir."""
  width, size, batch, steps = SETTINGS[setting]
  scratch = Path(tempfile.mkdtemp(prefix="step_bound_"))
  atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # data and checkpoints: GBs
  spec = embedded.BuildSpec(image_size=64, num_train=16)
  root = embedded.build(scratch / "data", spec, categories=("weave",))
  config = config_lib.load("draem", "weave,tiny")
  config.data.root = str(root)
  config.model.base_width, config.data.image_size, config.data.batch_size = width, size, batch
  config.train.num_steps = config.train.log_every = config.train.checkpoint_every = steps
  folder = category_folder(config, "weave")
  train.MAX_STEPS_IN_FLIGHT = max_in_flight
  runs = iter(range(1 << 30))

  def run() -> None:
    train.train(config, scratch / f"run{next(runs)}", [folder])

  return run, {}


def main(argv: list[str]) -> None:
  del argv
  figures, lines = {}, [f"Machine: {harness.machine()}", ""]
  lines += [
    "| setting | steps per run | bounded (s) | unbounded (s) | cost |",
    "|---|---|---|---|---|",
  ]
  for setting in _SETTINGS.value:
    contenders = {
      "bounded": (loop, (setting, train.MAX_STEPS_IN_FLIGHT)),
      "unbounded": (loop, (setting, 1 << 30)),
    }
    times = harness.interleaved(contenders, _REPEATS.value)
    bounded, unbounded = times["bounded"][0], times["unbounded"][0]
    cost = bounded / unbounded - 1
    figures[f"step_bound_cost_{setting}"] = cost
    steps = SETTINGS[setting][3]
    lines.append(f"| {setting} | {steps} | {bounded:.2f} | {unbounded:.2f} | {100 * cost:+.1f}% |")
    print(lines[-1], flush=True)
  harness.Report("Steps in flight: the cost of the bound", lines, figures).show()


if __name__ == "__main__":
  app.run(main)
