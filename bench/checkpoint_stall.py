"""What a checkpoint costs the train loop: saves written in the background (the default) against
saves that block until they are on disk, each against the same run saving only at its end.

    .venv/bin/python bench/checkpoint_stall.py [--settings=tiny,headline] [--repeats=3]

All contenders run the real loop (`train.train`: data pipeline, steps, checkpoints) on the
embedded dataset, in turns, in processes of their own. The stall per save is
(run seconds - the end-only run's seconds) / the extra saves. Ends with
`checkpoint_stall_s_<setting>=<background stall per save>` and
`checkpoint_stall_ratio_<setting>=<background stall / blocking stall>` (target < 0.25).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import harness
import jax
from absl import app, flags

from pouta_jax import checkpoint, config as config_lib, train
from pouta_jax.data import category_folder, embedded

# (base width, image size, batch, steps per run, steps between saves): tiny is the demo's
# setting; headline DRAEM's full architecture (97 M parameters, a 1.2 GB state with Adam's
# moments) at 128 px (see train_step.py).
SETTINGS = {
  "tiny": (16, 64, 8, 40, 10),
  "headline": (128, 128, 4, 6, 2),
}
_SETTINGS = flags.DEFINE_list("settings", list(SETTINGS), "Settings to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per contender.")


def loop(setting: str, every: int, blocking: bool) -> tuple:
  """A contender: one timed iteration is a whole train run of a fresh workdir, saving every
  `every` steps (the last save always waits for its write)."""
  width, size, batch, steps, _ = SETTINGS[setting]
  scratch = Path(tempfile.mkdtemp(prefix="checkpoint_stall_"))
  atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # checkpoints: GBs
  spec = embedded.BuildSpec(image_size=64, num_train=16)
  root = embedded.build(scratch / "data", spec, categories=("weave",))
  config = config_lib.load("draem", "weave,tiny")
  config.data.root = str(root)
  config.model.base_width, config.data.image_size, config.data.batch_size = width, size, batch
  config.train.num_steps, config.train.log_every, config.train.checkpoint_every = (
    steps,
    steps,
    every,
  )
  config.train.keep_checkpoints = 1
  folder = category_folder(config, "weave")
  if blocking:
    save = checkpoint.save

    def save_and_wait(*args, block: bool = True, **kwargs) -> None:
      del block
      save(*args, block=True, **kwargs)

    checkpoint.save = save_and_wait
  runs = iter(range(1 << 30))

  def run() -> None:
    workdir = scratch / f"run{next(runs)}"
    train.train(config, workdir, [folder])
    shutil.rmtree(workdir)

  state = train.setup(config, [len(folder.train)]).state
  megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
  return run, {"state_mib": megabytes}


def main(argv: list[str]) -> None:
  del argv
  figures, lines = {}, [f"Machine: {harness.machine()}", ""]
  lines += [
    "| setting | state (MiB) | steps | saves | end only (s) | blocking (s) | background (s) "
    "| stall per save, blocking (s) | background (s) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for setting in _SETTINGS.value:
    steps, every = SETTINGS[setting][3:]
    contenders = {
      "end_only": (loop, (setting, steps, False)),
      "blocking": (loop, (setting, every, True)),
      "background": (loop, (setting, every, False)),
    }
    times = harness.interleaved(contenders, _REPEATS.value)
    end_only = times["end_only"][0]
    extra_saves = steps // every - 1
    stall = {k: (times[k][0] - end_only) / extra_saves for k in ("blocking", "background")}
    figures[f"checkpoint_stall_s_{setting}"] = stall["background"]
    figures[f"checkpoint_stall_ratio_{setting}"] = stall["background"] / stall["blocking"]
    lines.append(
      f"| {setting} | {times['end_only'][1]['state_mib']:.0f} | {steps} | {steps // every} "
      f"| {end_only:.2f} | {times['blocking'][0]:.2f} | {times['background'][0]:.2f} "
      f"| {stall['blocking']:.3f} | {stall['background']:.3f} |"
    )
    print(lines[-1], flush=True)
  harness.Report("Checkpoints: the train loop's stall per save", lines, figures).show()


if __name__ == "__main__":
  app.run(main)
