"""What every benchmark shares: interleaved A/B timing, the peer's import, the machine's name.

The machines these run on are noisy, so contenders are timed in turns (A, B, A, B, ...) after
warm-up and compared by their medians; a figure is only ever a ratio within one run.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import jax
from absl import flags

INSTALL_PEER = "pip install -e '.[bench]'  (or: make bench)"

# glibc settings for the processes that time XLA programs, ours and the peer's alike. XLA:CPU
# allocates each execution's temporaries in one block (5.3 GB for DRAEM's headline train step)
# and frees it after; glibc maps such blocks afresh each time, so every step faulted in 1.3 M
# pages (4 s of system time in a 7.7 s step). One arena, no mmap and no trimming keep the pages
# mapped from one step to the next. Environment variables, because glibc reads them at start.
MALLOC_ENV = {
  "MALLOC_ARENA_MAX": "1",
  "MALLOC_MMAP_MAX_": "0",
  "MALLOC_TRIM_THRESHOLD_": str(1 << 50),
}


def require_peer():
  """Imports torch and anomalib, or exits with the command that installs them."""
  try:
    importlib.import_module("anomalib")
    import torch
  except ImportError as e:
    sys.exit(
      f"This benchmark compares against anomalib (PyTorch), which is not installed "
      f"({e.name} missing). Install the bench extra: {INSTALL_PEER}"
    )
  torch.set_num_threads(os.cpu_count() or 1)
  return torch


# A contender: a picklable top-level function and its arguments, which builds the thing to
# time in a worker process and returns (run one iteration, facts such as compile seconds).
# An iteration is timed whole, unless it returns the seconds of the part that counts.
Factory = tuple[Callable[..., tuple[Callable[[], float | None], dict]], tuple]


class ContenderError(RuntimeError):
  """A contender failed while being built in its worker process."""


def _worker(factory: Factory, conn) -> None:
  fn, args = factory
  if not flags.FLAGS.is_parsed():  # grain reads absl flags; a spawned process starts unparsed
    flags.FLAGS(sys.argv[:1])
  try:
    run, facts = fn(*args)
  except BaseException as e:  # reported by the parent, with the contender's name
    conn.send(ContenderError(f"{type(e).__name__}: {e}"))
    return
  conn.send(facts)
  while conn.recv():
    start = time.perf_counter()
    seconds = run()
    conn.send(time.perf_counter() - start if seconds is None else seconds)


def interleaved(
  contenders: dict[str, Factory],
  repeats: int,
  warmup: int = 1,
  pause_s: float = 0.3,
  env: dict[str, str] | None = None,
) -> dict[str, tuple[float, dict]]:
  """Median seconds per iteration of each contender, and its facts, timed in turns.

  Each contender lives in its own process, idle (blocked on a pipe) while another runs, so one
  framework's thread pool never competes with the other's; `pause_s` between turns lets
  OpenMP's spinning threads go to sleep. `env` is added to every contender's environment.
  """
  context = multiprocessing.get_context("spawn")
  workers = {}
  try:
    for name, factory in contenders.items():  # built one after another: compile times are fair
      parent, child = context.Pipe()
      # Not a daemon: a contender may start processes of its own (grain workers).
      process = context.Process(target=_worker, args=(factory, child))
      with mock.patch.dict(os.environ, env or {}):  # a spawned process copies it
        process.start()
      facts = parent.recv()
      if isinstance(facts, ContenderError):
        raise ContenderError(f"{name}: {facts}")
      workers[name] = (process, parent, facts)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for turn in range(warmup + repeats):
      for name, (_, conn, _) in workers.items():
        time.sleep(pause_s)
        conn.send(True)
        seconds = conn.recv()
        if turn >= warmup:
          times[name].append(seconds)
    return {
      name: (statistics.median(times[name]), facts) for name, (_, _, facts) in workers.items()
    }
  finally:
    for process, conn, _ in workers.values():
      if process.is_alive():
        conn.send(False)
        process.join(timeout=30)
        if process.is_alive():
          process.kill()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def machine() -> str:
  cpuinfo = Path("/proc/cpuinfo")
  names = [
    line.split(":", 1)[1].strip()
    for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
    if line.startswith("model name")
  ]
  device = jax.devices()[0]
  return (
    f"{names[0] if names else platform.machine()}, {os.cpu_count()} CPU cores; "
    f"jax {jax.__version__} on {device.platform} ({device.device_kind}); "
    f"Python {platform.python_version()}"
  )


@dataclasses.dataclass
class Report:
  """One benchmark's result: a markdown section and its headline figures (name -> value)."""

  title: str
  lines: list[str]
  figures: dict[str, float]

  def markdown(self) -> str:
    return "\n".join([f"## {self.title}", "", *self.lines, ""])

  def show(self) -> None:
    print(self.markdown())
    for name, value in self.figures.items():
      print(f"{name}={value:.4g}")
