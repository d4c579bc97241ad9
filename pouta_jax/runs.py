"""The runs one program trains: its categories times its stacked sweep points (seeds and
hyperparameters), each run its own model on a leading run axis of the train state (a single run is a
stack of one: every program has the axis).

`config.stack` holds the sweep in the launchers' syntax (`sweep`: product axes such as
"optim.lr=1e-4,3e-4"; `zip`: axes whose i-th values go together; `seeds`: train.seed 0..N-1).
Only keys that leave the program's shapes and computation unchanged may differ between runs
(`config.STACKABLE_KEYS`): the optimizer's and the losses' numbers travel into the step as per-run
arrays, and the synthesis settings and seeds drive each run's own data stream. Any other key
needs programs of its own; the launchers split a sweep so.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os

import ml_collections

from pouta_jax import config as config_lib, sweep


@dataclasses.dataclass(frozen=True)
class Run:
  """One model of a program: its category, its sweep point, its outputs' folder (relative to
  the program's workdir; "" for a program of one run) and its config, which is the config a
  separate run with the same settings would have."""

  name: str
  category: str
  point: tuple[tuple[str, str], ...]
  config: ml_collections.ConfigDict


def points(config: ml_collections.ConfigDict) -> list[dict[str, str]]:
  """The stacked sweep's points ({key: value string}), checked to be stackable."""
  stack = config.stack
  found = sweep.expand(config, list(stack.sweep), list(stack.zip), stack.seeds)
  for key in sorted({k for point in found for k in point}):
    if not config_lib.is_stackable(config, key):
      raise sweep.SweepError(
        f"config.stack: {key} changes the program's shapes or computation, so runs with "
        f"different values cannot share one program; sweep it with separate programs "
        f"(launch/local.py --sweep={key}=... runs one per value)"
      )
  return found


def count(config: ml_collections.ConfigDict) -> int:
  """How many runs the program stacks on its run axis (1: a single run, a stack of one)."""
  return len(config_lib.categories_of(config)) * len(points(config))


def runs_of(config: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the program, sweep points outer and categories inner (the launchers'
  `<point>/<category>` folders)."""
  categories = config_lib.categories_of(config)
  found = points(config)
  single = len(categories) * len(found) == 1
  runs = []
  for point in found:
    for category in categories:
      run_config = copy.deepcopy(config)
      run_config.data.category = category
      run_config.data.categories = ()
      run_config.stack = config_lib.base_config(config.model.name).stack
      for key, text in point.items():
        _set(run_config, key, text)
      if single:
        name = ""
      else:
        name = os.path.join(sweep.point_name(point), category) if point else category
      runs.append(Run(name, category, tuple(point.items()), run_config))
  return runs


def padded(program: list, rows: int) -> list:
  """`program` (runs, or anything listed per run) filled up to `rows` with copies of its last
  entry: the rows a run axis needs to split evenly over its devices (sharding.run_rows).
  A copy computes exactly what its original does, so its results are never written or
  counted; as many rows as there are runs leave `program` as it is."""
  return list(program) + [program[-1]] * max(rows - len(program), 0)


def _set(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `key` from a sweep's value string, typed like its default (as `--config.<key>=`)."""
  *sections, name = key.split(".")
  node = config
  for section in sections:
    node = node[section]
  current = node[name]
  value = _parse(text, current)
  if value is None:
    raise sweep.SweepError(
      f"config.stack: {key}={text!r} is not a {type(current).__name__} like its default {current!r}"
    )
  node[name] = value


def _parse(text: str, current: object) -> object | None:
  """`text` as a value of `current`'s type, or None if it is not one."""
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None
  if isinstance(current, bool):
    return value if isinstance(value, bool) else None
  if isinstance(current, int):
    return value if isinstance(value, int) and not isinstance(value, bool) else None
  if isinstance(current, float):
    ok = config_lib.is_number(value) and not isinstance(value, tuple)
    return float(value) if ok else None
  if isinstance(current, tuple):
    ok = (
      isinstance(value, (tuple, list))
      and len(value) == len(current)
      and config_lib.is_number(value)
    )
    return tuple(float(v) for v in value) if ok else None
  return None
