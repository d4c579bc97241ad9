"""Atomic outputs with the modes of normally created files, and the workdir lock."""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pouta_jax import errors, files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
  """Sets the process umask for a test and restores it."""
  previous = os.umask(0o022)
  yield lambda mask: os.umask(mask)
  os.umask(previous)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_get_the_modes_of_normally_created_files(tmp_path, umask, mask):
  umask(mask)
  files.write_atomic(tmp_path / "metrics.json", "{}")
  (tmp_path / "plain.txt").write_text("")  # what open() gives
  assert _mode(tmp_path / "metrics.json") == _mode(tmp_path / "plain.txt") == 0o666 & ~mask
  with files.atomic_folder(tmp_path / "artifact", index="weights.npz") as staging:
    files.write_atomic(staging / "weights.npz", b"x")
  (tmp_path / "plain").mkdir()
  assert _mode(tmp_path / "artifact") == _mode(tmp_path / "plain") == 0o777 & ~mask
  assert _mode(tmp_path / "artifact" / "weights.npz") == 0o666 & ~mask


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with files.atomic_folder(tmp_path / "out", index="half") as staging:
      (staging / "half").write_text("written")
      raise RuntimeError("boom")
  assert list(tmp_path.iterdir()) == []


def test_atomic_folder_of_two_writers_keeps_the_first_and_names_the_folder(tmp_path):
  """Two processes assembling the same folder (two studies copying one run): the one that
  finishes second is told the folder exists and leaves the first one's intact."""
  with pytest.raises(errors.ExistsError, match=re.escape(f"{tmp_path / 'out'} exists;")):
    with files.atomic_folder(tmp_path / "out", index="index.json") as staging:
      (staging / "index.json").write_text("second")
      (tmp_path / "out").mkdir()  # the first writer's rename lands meanwhile
      (tmp_path / "out" / "index.json").write_text("first")
  assert [p.name for p in tmp_path.iterdir()] == ["out"]
  assert (tmp_path / "out" / "index.json").read_text() == "first"


def test_atomic_folder_removes_what_a_killed_writer_left_and_nothing_else(tmp_path):
  """A staging folder whose process is gone (kill -9) is removed by the next writer of the same
  folder; one of a live process (another writer still at work) stays."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = socket.gethostname()
  abandoned = tmp_path / f".out.{host}.{dead.pid}.abc123"
  old = tmp_path / f".out.{host}.{dead.pid}.old.def456"
  busy = tmp_path / f".out.{host}.{os.getppid()}.ghi789"
  other = tmp_path / ".other.staging"
  for folder in (abandoned, old, busy, other):
    folder.mkdir()
  with files.atomic_folder(tmp_path / "out", index="index.json") as staging:
    (staging / "index.json").write_text("{}")
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name, "out"])
  with pytest.raises(AssertionError, match="without its index file index.json"):
    with files.atomic_folder(tmp_path / "unfinished", index="index.json") as staging:
      (staging / "maps").mkdir()
  assert not (tmp_path / "unfinished").exists()


def test_a_full_disk_is_named_and_keeps_the_previous_version(tmp_path, monkeypatch):
  target = tmp_path / "results.md"
  files.write_atomic(target, "old")

  def full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(files.os, "replace", full)
  with pytest.raises(errors.DiskFullError, match=f"{target}: disk full"):
    files.write_atomic(target, "new")
  assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_disk_full_is_recognised_through_wrapping():
  cause = OSError(errno.ENOSPC, "No space left on device")
  try:
    try:
      raise cause
    except OSError as e:
      raise RuntimeError("orbax: save failed") from e
  except RuntimeError as wrapped:
    assert errors.is_disk_full(wrapped)
  assert errors.is_disk_full(ValueError('RESOURCE_EXHAUSTED: ... "No space left on device"'))
  assert not errors.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_second_holder_is_refused_naming_the_first(tmp_path):
  with files.WorkdirLock(tmp_path):
    holder = f"host {socket.gethostname()} pid {os.getpid()}"
    assert (tmp_path / files.LOCK_NAME).read_text().strip() == holder
    with pytest.raises(errors.WorkdirError, match=f"{tmp_path} is in use by {holder}"):
      files.WorkdirLock(tmp_path).acquire()
  assert not (tmp_path / files.LOCK_NAME).exists()  # a clean exit leaves nothing
  with files.WorkdirLock(tmp_path):  # and the workdir is free again
    pass


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time; from pouta_jax import files; files.WorkdirLock(sys.argv[1]).acquire(); "
      "print('locked', flush=True); time.sleep(120)",
      str(tmp_path),
    ],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(errors.WorkdirError, match=f"pid {holder.pid}"):
      files.WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()  # -9: no cleanup runs; the lock file stays, the kernel drops the flock
    holder.wait()
  assert f"pid {holder.pid}" in (tmp_path / files.LOCK_NAME).read_text()
  with files.WorkdirLock(tmp_path):
    assert f"pid {os.getpid()}" in (tmp_path / files.LOCK_NAME).read_text()
