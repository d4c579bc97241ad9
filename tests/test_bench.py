"""The benchmark harness (bench/harness.py): turns, per-process contenders, failures, no peer."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402


def sleeper(seconds: float, label: str):
  """A contender whose iteration takes `seconds`; its facts name its process."""
  import os
  return (lambda: time.sleep(seconds)), {"label": label, "pid": os.getpid()}


def self_timed(seconds: float):
  return (lambda: seconds), {}


def broken():
  raise FileNotFoundError("no weights at /nowhere")


def test_interleaved_times_each_contender_in_its_own_process():
  results = harness.interleaved({"fast": (sleeper, (0.01, "a")), "slow": (sleeper, (0.2, "b")),
                                 "reported": (self_timed, (123.0,))}, repeats=3, pause_s=0.0)
  fast, slow = results["fast"], results["slow"]
  assert 0.01 <= fast[0] < 0.15 and 0.2 <= slow[0] < 0.5
  assert results["reported"][0] == 123.0  # an iteration may report the part that counts
  assert fast[1]["label"] == "a" and slow[1]["label"] == "b"
  assert len({fast[1]["pid"], slow[1]["pid"], __import__("os").getpid()}) == 3


def test_a_contender_that_fails_to_build_is_named():
  with pytest.raises(harness.ContenderError, match="peer: FileNotFoundError: no weights"):
    harness.interleaved({"peer": (broken, ())}, repeats=1)


def test_missing_peer_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # importing either now fails
  monkeypatch.setitem(sys.modules, "anomalib", None)
  with pytest.raises(SystemExit, match=r"(torch|anomalib) missing.*pip install -e '\.\[bench\]'"):
    harness.require_peer()
