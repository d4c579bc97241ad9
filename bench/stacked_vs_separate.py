"""Several categories in one program (stacked state, vmapped step) against one program per
category, measured in one run.

    .venv/bin/python bench/stacked_vs_separate.py [--model=draem] [--categories=4] \
        [--base_width=16] [--image_size=64] [--batch_size=8] [--repeats=10]

All programs train steps of the model on random batches at the same settings, on all local
devices (the batch split over them). Separate: the single-category step run once per category
(the work of separate processes, without their contention); stacked: one step over all
categories, vmapped or unrolled (`train.category_loop`). Steps are timed interleaved after
warm-up; compile time is measured apart (separate processes would each compile their own copy).
Prints images/s and compile times, then `name=value` lines: each loop's throughput and compile
time relative to separate programs, and `stacked_throughput_ratio` for the loop that
`category_loop=auto` takes on this platform (target: >= 1.2).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from pouta_jax import config as config_lib, models, runs, sharding, train
from pouta_jax.data import pipeline

_MODEL = flags.DEFINE_enum("model", "draem", ["draem", "pouta"], "Model.")
_CATEGORIES = flags.DEFINE_integer("categories", 4, "Number of categories.")
_WIDTH = flags.DEFINE_integer("base_width", 16, "Base width.")
_SIZE = flags.DEFINE_integer("image_size", 64, "Square input size.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch per category.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per side.")


def _config(categories: int, loop: str = "auto"):
  config = config_lib.load(_MODEL.value)
  config.model.base_width = _WIDTH.value
  config.data.image_size = _SIZE.value
  config.data.batch_size = _BATCH.value
  config.train.num_steps = 1000
  config.train.category_loop = loop
  if categories > 1:
    config.data.categories = tuple(f"c{i}" for i in range(categories))
  return config


def _batch(rng: np.random.Generator, leading: tuple[int, ...]) -> dict[str, np.ndarray]:
  size = _SIZE.value
  image = rng.random(leading + (size, size, 3), dtype=np.float32)
  mask = (rng.random(leading + (size, size)) > 0.9).astype(np.float32)
  return {
    "image": image,
    "augmented": image * (1 - mask[..., None]),
    "mask": mask,
    "has_anomaly": mask.max(axis=(-2, -1)),
  }


def _setup(config):
  """The jitted step, a state on the mesh, a batch, and the compile time."""
  mesh = sharding.make_mesh(config)
  loop = train.category_loop(config, mesh)
  model, optimizer, state, hparams, _ = train.setup(config, [1] * runs.count(config))
  state = jax.device_put(state, sharding.state_sharding(mesh))
  batch = _batch(np.random.default_rng(0), pipeline.batch_shape(config))
  jitted = train.make_train_step(
    model, models.get(config.model.name).objective(config), optimizer, mesh, loop
  )
  start = time.perf_counter()
  jitted.lower(state, batch, hparams).compile()
  compile_s = time.perf_counter() - start

  def step(state, batch):
    return jitted(state, batch, hparams)

  state, _ = step(state, batch)  # warm-up (compiles through the jit cache)
  jax.block_until_ready(state)
  return step, state, batch, compile_s


def _timed(step, state, batch, times: list[float], repeats: int = 1):
  start = time.perf_counter()
  for _ in range(repeats):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times.append(time.perf_counter() - start)
  return state


def main(argv: list[str]) -> None:
  del argv
  c = _CATEGORIES.value
  programs = {
    "separate": (_setup(_config(1)), c),
    "vmap": (_setup(_config(c, "vmap")), 1),
    "unroll": (_setup(_config(c, "unroll")), 1),
  }
  states = {name: setup[1] for name, (setup, _) in programs.items()}
  times = {name: [] for name in programs}
  for _ in range(_REPEATS.value):  # interleaved, so drifts in machine load hit all alike
    for name, ((step, _, batch, _), repeats) in programs.items():
      states[name] = _timed(step, states[name], batch, times[name], repeats)

  images = c * _BATCH.value
  rate = {name: images / float(np.median(t)) for name, t in times.items()}
  compile_s = {name: setup[3] * repeats for name, (setup, repeats) in programs.items()}
  print(
    f"{_MODEL.value}, {c} categories, width {_WIDTH.value}, {_SIZE.value} px, batch "
    f"{_BATCH.value} per category, {jax.device_count()} {jax.default_backend()} "
    f"device(s), {_REPEATS.value} repeats"
  )
  print("| program | images/s | compiles | compile s |")
  print("|---|---|---|---|")
  for name, (_, repeats) in programs.items():
    label = "one per category" if name == "separate" else f"stacked, {name}"
    print(f"| {label} | {rate[name]:.1f} | {repeats} | {compile_s[name]:.1f} |")
  for name in ("vmap", "unroll"):
    print(f"stacked_{name}_throughput_ratio={rate[name] / rate['separate']:.4f}")
    print(f"stacked_{name}_compile_ratio={compile_s[name] / compile_s['separate']:.4f}")
  auto_config = _config(c)
  auto = train.category_loop(auto_config, sharding.make_mesh(auto_config))
  print(f"stacked_throughput_ratio={rate[auto] / rate['separate']:.4f}")
  print("stacked_compiles=1")


if __name__ == "__main__":
  app.run(main)
