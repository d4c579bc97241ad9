"""The project's error types and how every command line reports them.

An `Error` (or an `artifact.ArtifactError`) is a problem the user can fix (a config key, a
file, a workdir, the disk): entry points print it as one `FATAL: <message>` line and exit 1.
Anything else is a bug and keeps its traceback. Each type also derives from the builtin it
refines, so callers may catch either.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import threading
from typing import Callable

from absl import app, flags

# The artifact reader imports nothing of the project (it is copied into downstream code), so
# its error type lives there; entry points report it like the others.
from pouta_jax.artifact import ArtifactError


class Error(Exception):
  """An input, config, file or environment problem; the message names the key or path."""


class ConfigError(Error, ValueError):
  """A setting that cannot work, or one that differs from the workdir's stored run."""


class DataError(Error, ValueError):
  """A dataset that does not have the expected layout or holds an unreadable file."""


class NotFoundError(Error, FileNotFoundError):
  """A file or folder the command needs is missing."""


class ExistsError(Error, FileExistsError):
  """An output that must not be overwritten exists already."""


class WorkdirError(Error, PermissionError):
  """A workdir that cannot be written, or that another run holds."""


class DiskFullError(Error, OSError):
  """The disk filled while writing; the message says what was kept."""


class DivergedError(Error, FloatingPointError):
  """Training produced a non-finite loss or gradient; nothing after the last good step saved."""


def check(config, ok: bool, key: str, expected: str) -> None:
  """Raises ConfigError `config.<key>=<its value>: expected <expected>` unless `ok`; `key` is
  dotted ("optim.lr"). The one way every config check words its error."""
  if ok:
    return
  value = config
  for part in key.split("."):
    value = value[part]
  raise ConfigError(f"config.{key}={value!r}: expected {expected}")


def key_problems(
  expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]]
) -> list[str]:
  """Every missing, extra and mis-shaped key between two {key: shape} maps: what weight files
  are checked by (see `listing`)."""
  problems = [f"missing {k} {tuple(shape)}" for k, shape in expected.items() if k not in given]
  problems += [f"extra {k}" for k in given if k not in expected]
  problems += [
    f"mis-shaped {k}: {tuple(given[k])}, expected {tuple(shape)}"
    for k, shape in expected.items()
    if k in given and tuple(given[k]) != tuple(shape)
  ]
  return problems


def listing(problems: list[str], limit: int = 20) -> str:
  """`key_problems`' lines for a message: their count, then the first `limit` of them (a file
  of another network differs in hundreds of keys)."""
  shown = problems[:limit] + ([f"... and {len(problems) - limit} more"] if problems[limit:] else [])
  return f"({len(problems)} problems):\n  " + "\n  ".join(shown)


def is_disk_full(error: BaseException) -> bool:
  """Whether `error`, or anything in its cause chain, is ENOSPC (orbax and tensorstore wrap it;
  tensorstore only says so in its message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


# What a command stopped by Ctrl-C returns (the shell's convention for SIGINT).
INTERRUPTED_EXIT_CODE = 128 + 2


def _exit_on_thread_error(args: threading.ExceptHookArgs) -> None:
  """A background thread (checkpoint writer, data reader) that dies would leave the main loop
  waiting on it forever: report it and end the whole process with exit 1."""
  threading.__excepthook__(args)
  name = args.thread.name if args.thread is not None else "?"
  print(
    f"FATAL: background thread {name!r} failed ({args.exc_type.__name__}: "
    f"{args.exc_value}); the run stopped",
    file=sys.stderr,
    flush=True,
  )
  os._exit(1)


def main_wrapper(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with the project's errors as one FATAL line and exit 1, and background-thread
  failures ending the process."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    threading.excepthook = _exit_on_thread_error
    interrupted = threading.Event()

    def interrupt(signum: int, frame: object) -> None:
      interrupted.set()  # seen even where the exception is swallowed (an XLA callback)
      signal.default_int_handler(signum, frame)

    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGINT, interrupt)
    try:
      main(argv)
    except (Error, ArtifactError) as e:
      sys.exit(f"FATAL: {e}")
    except KeyboardInterrupt:
      interrupted.set()
    if interrupted.is_set():
      print("FATAL: interrupted (Ctrl-C); nothing unfinished was kept", file=sys.stderr)
      sys.exit(INTERRUPTED_EXIT_CODE)

  return wrapped


def run(
  main: Callable[[list[str]], None],
  flags_parser: Callable[[list[str]], list[str]] | None = None,
  **kwargs,
) -> None:
  """`absl.app.run` for every command line of the project (see `main_wrapper`); a flag that
  does not parse (`--config.optim.lr=abc`, an unknown key) is one FATAL line too."""
  parse = flags_parser or flags.FLAGS

  def parse_or_exit(argv: list[str]) -> list[str]:
    try:
      return parse(argv)
    except (flags.Error, Error) as e:
      sys.exit(f"FATAL: {e}")

  app.run(main_wrapper(main), flags_parser=parse_or_exit, **kwargs)
