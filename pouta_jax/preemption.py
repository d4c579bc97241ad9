"""Preemption and Ctrl-C: how a scheduler's SIGTERM or a user's SIGINT reaches the train loop,
and the exit status of a run stopped so (the launchers requeue on SIGTERM's)."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

from pouta_jax.errors import INTERRUPTED_EXIT_CODE


class Preempted(Exception):
  """Training stopped on a signal (SIGTERM, SIGINT) after saving a checkpoint; `exit_code` is
  what the process returns."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


# What a process killed by SIGTERM returns, so schedulers that requeue on it see the usual code.
EXIT_CODE = 128 + 15


class Notice:
  """Whether the scheduler or the user asked this job to stop, checked once per step.

  With several processes, JAX's preemption service (started by jax.distributed) takes the
  SIGTERM and agrees on a step all processes reach; alone, a handler of SIGTERM and SIGINT sets
  a flag. A flag, not an exception: KeyboardInterrupt raised inside one of XLA's callbacks is
  swallowed there, and the run went on to exit 0.
  """

  def __init__(self):
    self._signal: int | None = None
    self._previous: dict[int, object] = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._set)

  def _set(self, signum: int, frame: object) -> None:
    del frame
    self._signal = self._signal or signum

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None

  @property
  def exit_code(self) -> int:
    return INTERRUPTED_EXIT_CODE if self._signal == signal.SIGINT else EXIT_CODE

  @property
  def what(self) -> str:
    return "interrupted (Ctrl-C)" if self._signal == signal.SIGINT else "preempted"

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
