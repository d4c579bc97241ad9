"""Preemption: how a scheduler's SIGTERM reaches the train loop, and the exit status of a
preempted run (the launchers requeue on it)."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Training stopped on a preemption notice (SIGTERM) after saving a checkpoint."""


# What a process killed by SIGTERM returns, so schedulers that requeue on it see the usual code.
EXIT_CODE = 128 + 15


class Notice:
  """Whether the scheduler asked this job to stop, checked once per step.

  With several processes, JAX's preemption service (started by jax.distributed) takes the
  SIGTERM and agrees on a step all processes reach; alone, a SIGTERM handler sets a flag.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._requested.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
