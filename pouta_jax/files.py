"""Writing outputs whole or not at all, with the modes of normally created files, and the lock
that gives a workdir to one run at a time.

Temporary files and folders (`tempfile`) are created 0600 / 0700 for safety; what is renamed
into place gets the permissions `open()` / `mkdir()` would have given it under the umask, so
colleagues on a shared filesystem read the results as they read any other file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from pouta_jax import errors

_UMASK_LOCK = threading.Lock()


def umask() -> int:
  """The process's umask: from /proc on Linux; elsewhere by setting it and back (the lock keeps
  our own threads out meanwhile)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except OSError:
    pass
  with _UMASK_LOCK:
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def _disk_full(path: Path, error: OSError) -> errors.DiskFullError:
  return errors.DiskFullError(
    f"{path}: disk full while writing ({error.strerror}); nothing was "
    f"written there, the previous version (if any) is unchanged"
  )


def write_atomic(path: str | Path, data: str | bytes) -> None:
  """Writes `path` through a temporary file renamed into place; DiskFullError on ENOSPC."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      os.fchmod(f.fileno(), 0o666 & ~umask())
    os.replace(tmp, path)
  except BaseException as e:
    os.unlink(tmp)
    if isinstance(e, OSError) and errors.is_disk_full(e):
      raise _disk_full(path, e) from e
    raise


def write_json(path: str | Path, obj) -> None:
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_folder(out: str | Path, replace: bool = False) -> Iterator[Path]:
  """Yields a temporary folder beside `out` that becomes `out` when the block succeeds and is
  removed when it fails; `out` must not exist, unless `replace`: then the old `out` is removed
  once the new one is complete."""
  out = Path(out)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
  except OSError as e:
    if errors.is_disk_full(e):
      raise _disk_full(out, e) from e
    raise errors.WorkdirError(f"{out}: cannot write in {e.filename} ({e.strerror})") from None
  try:
    staging.chmod(0o777 & ~umask())
    yield staging
    if replace and out.exists():
      old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
      out.rename(old / out.name)
      staging.rename(out)
      shutil.rmtree(old)
    else:
      staging.rename(out)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, OSError) and errors.is_disk_full(e):
      raise _disk_full(out, e) from e
    raise


LOCK_NAME = ".lock"


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run.

  `flock` on `<workdir>/.lock`, which names the holder (host, pid) for the message a second
  run gets. The kernel releases a flock when its holder exits, however it dies, so a lock file
  left by a dead process is simply taken over; a clean exit removes the file.
  """

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise errors.WorkdirError(
          f"workdir {self.path.parent} is in use by {holder}; wait for that run to end, or "
          f"use another --workdir"
        ) from None
      # The holder we waited on may have removed the file meanwhile: lock the file in place.
      try:
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      self.path.unlink(missing_ok=True)  # before unlocking, so no one locks a removed file
      os.close(self._fd)  # closing the last descriptor releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
