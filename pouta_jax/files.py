"""Paths, outputs written whole or not at all, and the lock that gives a workdir to one run at a
time, on a local disk and on object stores (gs://, s3://) alike.

Every path a user gives goes through `path` (an `etils.epath.Path`): pathlib would turn
`gs://b/x` into the local folder `gs:/b/x`.

Local disk: temporary files and folders (`tempfile`) are created 0600 / 0700 for safety; what is
renamed into place gets the permissions `open()` / `mkdir()` would have given it under the umask,
so colleagues on a shared filesystem read the results as they read any other file.

Object stores have no rename and no append, but an object's upload is atomic (it appears whole
or not at all): a file is one upload, a folder is uploaded with its index file last (a reader
refuses a folder without one), and growing logs are rewritten whole (`ObjectLog`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath

from pouta_jax import errors

_UMASK_LOCK = threading.Lock()
PathLike = str | os.PathLike
URL_SCHEMES = ("gs", "s3")


def path(p: PathLike) -> epath.Path:
  """A local path or an object-store URL (gs://bucket/key, s3://bucket/key) as an epath.Path."""
  return epath.Path(p)


def is_remote(p: PathLike) -> bool:
  """Whether `p` is on an object store."""
  scheme, sep, _ = os.fspath(p).partition("://")
  return bool(sep) and scheme in URL_SCHEMES


def storage_error(
  p: PathLike, error: Exception, doing: str, kind: type[errors.Error] = errors.WorkdirError
) -> errors.Error:
  """A failure of an object store (bucket missing or unreachable, no credentials, gcsfs not
  installed) as a `kind` error naming the path and what was being done."""
  hint = ""
  if isinstance(error, ImportError):
    hint = "; gs:// paths need gcsfs: pip install 'pouta_jax[gcs]'"
  return kind(f"{p}: cannot {doing} ({type(error).__name__}: {error}){hint}")


def is_dir(p: PathLike, what: str, kind: type[errors.Error] = errors.DataError) -> bool:
  """Whether `p` is a folder; a store that cannot be read (no such bucket, no credentials, no
  gcsfs) raises a `kind` error naming `p` as `what`."""
  try:
    return path(p).is_dir()
  except Exception as e:
    raise storage_error(p, e, f"read the {what}", kind) from e


def not_a_file(p: PathLike) -> str:
  """ "" for a regular file (links followed): what may be opened and read to its end. Else what
  `p` is, for a message: a FIFO or a device would block or never end a read. Objects on a store
  are files."""
  if is_remote(p):
    return ""
  try:
    mode = os.stat(p).st_mode
  except OSError as e:
    return f"cannot be read ({e.strerror})"
  if stat.S_ISREG(mode):
    return ""
  kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
  return next((kind for test, kind in kinds.items() if test(mode)), "a device or special file")


def listdir(folder: PathLike) -> list[epath.Path]:
  """The entries of `folder`, sorted, every one (epath's own listing drops names ending in `~`)."""
  if is_remote(folder):
    return sorted(path(folder).iterdir())
  return sorted(epath.Path(folder) / name for name in os.listdir(folder))


# What `files_in` is told of each path under a folder that it does not list: (path, why).
Skipped = Callable[[epath.Path, str], None]


def files_in(folder: PathLike, skipped: Skipped | None = None) -> list[epath.Path]:
  """Every regular file under `folder`, sorted (epath has no recursive glob on object stores).
  What is not one, or cannot be listed (a folder without read permission, a link to a folder:
  not followed, a FIFO, a socket, a device), goes to `skipped`; without it, it raises a
  DataError naming the path: nothing is left out without a word."""

  def refuse(p: epath.Path, why: str) -> None:
    raise errors.DataError(f"{p}: {why}; expected only readable regular files under {folder}")

  skipped = skipped or refuse
  if is_remote(folder):
    return sorted(root / name for root, _, names in path(folder).walk() for name in names)
  found = []

  def unlistable(e: OSError) -> None:
    skipped(epath.Path(e.filename), f"a folder that cannot be listed ({e.strerror})")

  for root, folders, names in os.walk(os.fspath(folder), onerror=unlistable):
    for name in sorted(folders):
      if os.path.islink(os.path.join(root, name)):
        skipped(epath.Path(root) / name, "a link to a folder (not followed)")
    for name in names:
      why = not_a_file(os.path.join(root, name))
      if why:
        skipped(epath.Path(root) / name, why)
      else:
        found.append(epath.Path(root) / name)
  return sorted(found)


def absolute(p: PathLike) -> epath.Path:
  """`p` made absolute where it is local (epath's `absolute` would prefix a URL with the cwd)."""
  return path(p) if is_remote(p) else path(p).absolute()


def umask() -> int:
  """The process's umask: from /proc on Linux; elsewhere by setting it and back (the lock keeps
  our own threads out meanwhile)."""
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  with _UMASK_LOCK:
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def _disk_full(p: PathLike, error: OSError) -> errors.DiskFullError:
  return errors.DiskFullError(
    f"{p}: disk full while writing ({error.strerror or error}); nothing was "
    f"written there, the previous version (if any) is unchanged"
  )


def write_atomic(p: PathLike, data: str | bytes) -> None:
  """Writes `p` whole or not at all: locally through a temporary file renamed into place
  (DiskFullError on ENOSPC), on an object store as one upload."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(p):
    try:
      path(p).parent.mkdir(parents=True, exist_ok=True)  # object stores: a no-op
      path(p).write_bytes(data)
    except Exception as e:
      raise storage_error(p, e, "write") from e
    return
  p = os.fspath(p)
  os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p) or ".", prefix=f".{os.path.basename(p)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      os.fchmod(f.fileno(), 0o666 & ~umask())
    os.replace(tmp, p)
  except BaseException as e:
    os.unlink(tmp)
    if isinstance(e, OSError) and errors.is_disk_full(e):
      raise _disk_full(p, e) from e
    raise


def read_json(p: PathLike, kind: type[errors.Error] = errors.DataError, hint: str = "") -> Any:
  """`p` parsed; a file that is not JSON, or not a regular file (a FIFO would block the read),
  raises `kind` naming it, then `hint` (what to do)."""
  if (why := not_a_file(p)) and path(p).exists():
    raise kind(f"{p}: {why}, not a JSON file{hint}")
  try:
    return json.loads(path(p).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise kind(f"{p}: not valid JSON ({e}){hint}") from None


def write_json(p: PathLike, obj) -> None:
  write_atomic(p, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_folder(out: PathLike, index: str, replace: bool = False) -> Iterator[epath.Path]:
  """Yields a temporary folder that becomes `out` when the block succeeds and is removed when
  it fails; `out` must not exist (errors.ExistsError when another writer completed it first),
  unless `replace`: then the old `out` is removed once the new one is complete. `index` names
  the file whose presence says the folder is complete: on an object store the folder is staged
  locally and uploaded with `index` last."""
  if is_remote(out):
    with _uploaded_folder(path(out), index, replace) as staging:
      yield staging
    return
  out = epath.Path(os.fspath(out))
  prefix = _staging_prefix(out)
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = epath.Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix))
  except OSError as e:
    if errors.is_disk_full(e):
      raise _disk_full(out, e) from e
    raise errors.WorkdirError(f"{out}: cannot write in {e.filename} ({e.strerror})") from None
  try:
    os.chmod(staging, 0o777 & ~umask())
    yield staging
    if not (staging / index).exists():
      raise AssertionError(f"{out}: the folder was written without its index file {index}")
    if replace and out.exists():
      old = epath.Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{prefix}old."))
      out.rename(old / out.name)
      staging.rename(out)
      shutil.rmtree(old)
    else:
      try:
        staging.rename(out)
      except OSError as e:  # another writer's folder arrived first
        if not isinstance(e, FileExistsError) and e.errno != errno.ENOTEMPTY:
          raise
        raise errors.ExistsError(f"{out} exists; nothing was written") from None
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    if isinstance(e, OSError) and errors.is_disk_full(e):
      raise _disk_full(out, e) from e
    raise


def _staging_prefix(out: epath.Path) -> str:
  """Names this process's staging folders of `out` (beside it, hidden), so that a later
  process can tell an abandoned one from one still being written."""
  return f".{out.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_abandoned(out: epath.Path) -> None:
  """Removes the staging folders of `out` that a process of this host left when it was killed
  (kill -9, a lost machine never comes back to clean up); a live process's are left alone."""
  host = f".{out.name}.{socket.gethostname()}."
  for name in os.listdir(out.parent):
    pid = name[len(host) :].split(".")[0] if name.startswith(host) else ""
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(out.parent / name, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


@contextlib.contextmanager
def _uploaded_folder(out: epath.Path, index: str, replace: bool) -> Iterator[epath.Path]:
  with tempfile.TemporaryDirectory(prefix=f"pouta_jax_{out.name}.") as tmp:
    staging = epath.Path(tmp)
    yield staging
    written = {str(p.relative_to(staging)): p for p in files_in(staging)}
    if index not in written:
      raise AssertionError(f"{out}: the folder was written without its index file {index}")
    order = sorted(written, key=lambda name: name == index)  # the index last
    try:
      if out.exists():
        if not replace:
          raise errors.ExistsError(f"{out} exists; nothing was written")
        (out / index).unlink(missing_ok=True)  # incomplete from here on
        out.rmtree()
      for name in order:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(written[name].read_bytes())
    except errors.Error:
      raise
    except Exception as e:
      with contextlib.suppress(Exception):
        out.rmtree()  # what was uploaded, without its index
      raise storage_error(out, e, "upload the folder") from e


class ObjectLog:
  """A growing file on an object store (training scalars, TensorBoard events). Objects cannot be
  appended to, so the content is kept here and the whole object uploaded again: as it grows at
  most every `interval_s` (None: never), at each `flush` and at `close`. A failed upload before
  `close` is logged once and retried at the next (tensorboardX flushes from its writer thread,
  which must not die, and a transient store error must not end a run); `close` raises it."""

  def __init__(self, p: PathLike, content: bytes = b"", interval_s: float | None = 30.0):
    self.name = os.fspath(p)
    self._content, self._interval = bytearray(content), interval_s
    self._uploaded, self._warned = 0.0, False

  def write(self, data: bytes) -> None:
    self._content += data
    if self._interval is not None and time.monotonic() - self._uploaded >= self._interval:
      self.flush()

  def flush(self) -> None:
    try:
      self.upload()
    except errors.Error as e:
      if not self._warned:
        logging.warning("%s not uploaded yet (retried at the next flush): %s", self.name, e)
        self._warned = True

  def upload(self) -> None:
    write_atomic(self.name, bytes(self._content))
    self._uploaded = time.monotonic()

  def close(self) -> None:
    self.upload()


class AppendLog:
  """A text file that grows by lines (the training scalars): locally each line is appended and
  flushed at once; on an object store an `ObjectLog` uploaded at most every
  `remote_interval_s`, at `flush` and at `close`."""

  def __init__(self, p: PathLike, text: str = "", remote_interval_s: float = 30.0):
    self.name = os.fspath(p)
    if is_remote(p):
      self._object: ObjectLog | None = ObjectLog(p, text.encode(), remote_interval_s)
      self._object.upload()  # an unwritable bucket is named now, before training
    else:
      self._object = None
      write_atomic(p, text)
      self._file = open(self.name, "a")

  def write(self, line: str) -> None:
    if self._object:
      self._object.write(line.encode())
    else:
      self._file.write(line)
      self._file.flush()

  def flush(self) -> None:
    if self._object:
      self._object.flush()

  def close(self) -> None:
    if self._object:
      self._object.close()
    else:
      self._file.close()


LOCK_NAME = ".lock"


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run.

  Local disk: `flock` on `<workdir>/.lock`, which names the holder (host, pid) for the message
  a second run gets. The kernel releases a flock when its holder exits, however it dies, so a
  lock file left by a dead process is simply taken over; a clean exit removes the file.

  Object store (no flock): the lock object names the holder and a heartbeat time its holder
  renews every `BEAT_S`; a lock not renewed for `STALE_S` (its holder was preempted or killed)
  is taken over. Two runs that start within a second of each other can both miss the other:
  an object store offers no compare-and-swap through epath.
  """

  BEAT_S = 60.0
  STALE_S = 180.0
  SETTLE_S = 1.0

  def __init__(self, workdir: PathLike):
    self.path = path(workdir) / LOCK_NAME
    self._fd: int | None = None
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._beat: threading.Thread | None = None

  def _holder(self) -> str:
    return f"host {socket.gethostname()} pid {os.getpid()}"

  def acquire(self) -> None:
    if is_remote(self.path):
      self._acquire_remote()
      return
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise self._busy(holder) from None
      # The holder we waited on may have removed the file meanwhile: lock the file in place.
      try:
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{self._holder()}\n".encode(), 0)
    self._fd = fd

  def _busy(self, holder: str) -> errors.WorkdirError:
    return errors.WorkdirError(
      f"workdir {self.path.parent} is in use by {holder}; wait for that run to end, or "
      f"use another --workdir"
    )

  def _read_remote(self) -> dict | None:
    try:
      record = json.loads(self.path.read_text())
      return record if isinstance(record, dict) else {}
    except FileNotFoundError:
      return None
    except (ValueError, UnicodeDecodeError):
      return {}  # damaged: treated as stale

  def _write_remote(self) -> None:
    write_json(self.path, {"holder": self._holder(), "token": self._token, "time": time.time()})

  def _acquire_remote(self) -> None:
    record = self._read_remote()
    if record is not None:
      age = time.time() - float(record.get("time", 0) or 0)
      if age < self.STALE_S:
        raise self._busy(
          f"{record.get('holder', 'another process')} (lock renewed {age:.0f} s ago; a lock "
          f"left by a killed run expires {self.STALE_S:.0f} s after its last renewal)"
        )
    self._write_remote()
    time.sleep(self.SETTLE_S)
    record = self._read_remote()
    if record is not None and record.get("token") != self._token:
      raise self._busy(record.get("holder", "another process"))
    self._beat = threading.Thread(target=self._renew, name="workdir-lock", daemon=True)
    self._beat.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.BEAT_S):
      with contextlib.suppress(Exception):  # a missed beat is retried; STALE_S spans three
        self._write_remote()

  def release(self) -> None:
    if self._beat is not None:
      self._stop.set()
      self._beat.join()
      self._beat = None
      record = self._read_remote()
      if record and record.get("token") == self._token:
        self.path.unlink(missing_ok=True)
    if self._fd is not None:
      self.path.unlink(missing_ok=True)  # before unlocking, so no one locks a removed file
      os.close(self._fd)  # closing the last descriptor releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
