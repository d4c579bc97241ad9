"""How every command line ends: the project's errors as one FATAL line, bugs with their
traceback, and a dead background thread as an exit instead of a hang."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROGRAM = """
import sys, threading, time
from pouta_jax import errors

def main(argv):
  what = sys.argv[-1]
  if what == "config":
    raise errors.ConfigError("config.optim.lr=-1: expected a positive learning rate")
  if what == "bug":
    raise KeyError("a bug")
  threading.Thread(target=lambda: 1 / 0, name="checkpoint-writer").start()
  time.sleep(60)  # the main thread waits for work the dead thread will never do

errors.run(main)
"""


def _run(what: str) -> tuple[subprocess.CompletedProcess, float]:
  start = time.monotonic()
  process = subprocess.run(
    [sys.executable, "-c", PROGRAM, what], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  return process, time.monotonic() - start


@pytest.mark.parametrize("what", ["config", "bug", "thread"])
def test_how_a_command_line_ends(what):
  process, seconds = _run(what)
  assert process.returncode == 1, process.stderr
  lines = process.stderr.strip().splitlines()
  if what == "config":
    assert lines == ["FATAL: config.optim.lr=-1: expected a positive learning rate"]
  elif what == "bug":
    assert "Traceback" in process.stderr and lines[-1] == "KeyError: 'a bug'"
  else:
    assert "ZeroDivisionError" in process.stderr
    assert lines[-1].startswith("FATAL: background thread 'checkpoint-writer' failed")
    assert seconds < 50  # ended by the thread's failure, not by the 60 s wait
