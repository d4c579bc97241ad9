"""Hyperparameter sweeps from flags, and the table that gathers their results.

A sweep is a product of axes. `--sweep=optim.lr=1e-4,3e-4` is one axis; several `--zip=` flags
form one axis together (their i-th values go together, so they must have equal lengths);
`--seeds=N` adds `train.seed=0..N-1`. Each point is a set of `--config.<key>=<value>` overrides
with a workdir named after it. `aggregate` reads every run's config.json and metrics.json under a
root and writes one row per setting, one column per category, mean ± std over seeds, the best
mean first; `--split=validation` ranks by the validation split's metrics (data.val_fraction),
where settings are chosen without touching the test set.

    python -m pouta_jax.sweep --root=runs/ablation [--metric=pixel_ap] [--split=validation]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Collection, Sequence

import ml_collections
import numpy as np
from absl import flags
from etils.epath import Path

from pouta_jax import config as config_lib, errors, files, report
from pouta_jax.data import embedded


class SweepError(errors.Error, ValueError):
  """A sweep flag that cannot be expanded; the message names it."""


def _parse_axis(flag: str, spec: str, config: ml_collections.ConfigDict) -> tuple[str, list[str]]:
  key, sep, values = spec.partition("=")
  if not sep or not values:
    raise SweepError(f"--{flag}={spec}: expected key=value1,value2,...")
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f"--{flag}={spec}: the config has no key {key!r}")
    node = node[part]
  return key, _split_values(flag, spec, values)


def _split_values(flag: str, spec: str, values: str) -> list[str]:
  """`values` split at the commas outside brackets: a tuple value is written `(1,0.5,0.25)`."""
  found, depth, start = [], 0, 0
  for i, char in enumerate(values):
    depth += (char in "([") - (char in ")]")
    if depth < 0:
      break
    if char == "," and depth == 0:
      found.append(values[start:i])
      start = i + 1
  if depth:
    raise SweepError(f"--{flag}={spec}: unbalanced brackets in the values")
  return found + [values[start:]]


def expand(
  config: ml_collections.ConfigDict, sweeps: list[str], zips: list[str], seeds: int = 1
) -> list[dict[str, str]]:
  """Every point of the sweep as {config key: value string}, in a fixed order."""
  axes = [
    [{key: v} for v in values] for key, values in (_parse_axis("sweep", s, config) for s in sweeps)
  ]
  if zips:
    zipped = [_parse_axis("zip", z, config) for z in zips]
    lengths = {len(values) for _, values in zipped}
    if len(lengths) != 1:
      raise SweepError(
        f"--zip lists have different lengths: {', '.join(f'{k} ({len(v)})' for k, v in zipped)}"
      )
    axes.append(
      [dict(zip([k for k, _ in zipped], point)) for point in zip(*[values for _, values in zipped])]
    )
  if seeds > 1:
    axes.append([{"train.seed": str(s)} for s in range(seeds)])
  points = [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]
  return points or [{}]


def point_name(point: dict[str, str]) -> str:
  """A folder name for a sweep point, e.g. `optim.lr=3e-4,train.seed=1`."""
  return ",".join(f"{k}={v}" for k, v in point.items()).replace("/", "_") or "default"


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of `python -m pouta_jax.main`: a category at a sweep point, or, with
  `--one_program`, every category and stackable sweep point in one program; its own workdir."""

  category: str  # or STACKED_FOLDER
  workdir: str
  args: tuple[str, ...]  # pouta_jax.main's arguments

  def command(self, python: str = sys.executable) -> list[str]:
    return [python, "-m", "pouta_jax.main", *self.args]


STACKED_FOLDER = "stacked"


def jobs(
  config_path: str,
  preset: str,
  categories: list[str],
  workdir: str,
  points: list[dict[str, str]],
  extra: list[str],
  stacked: tuple[str, ...] | None = None,
) -> list[Job]:
  """Every (sweep point, category) run: `<workdir>/<point>/<category>` (no point folder without
  a sweep), the point's overrides and then `extra` appended to each command. With `stacked`
  (pouta_jax.main's --sweep, --zip and --seeds flags of the runs stacked in each program,
  see `split_axes`), one program per point trains every category and stacked point
  (`<workdir>/<point>/stacked`)."""
  groups = [[c] for c in categories] if stacked is None else [list(categories)]
  runs = []
  for point in points:
    for group in groups:
      arg = ",".join(group + ([preset] if preset else []))
      name = group[0] if stacked is None else STACKED_FOLDER
      folder = (
        os.path.join(workdir, point_name(point), name) if point else (os.path.join(workdir, name))
      )
      runs.append(
        Job(
          name,
          folder,
          (
            f"--config={config_path}:{arg}",
            f"--workdir={folder}",
            *(f"--config.{k}={v}" for k, v in point.items()),
            *(stacked or ()),
            *extra,
          ),
        )
      )
  return runs


def thread_env(threads: int) -> dict[str, str]:
  """Environment that limits XLA's and the BLAS libraries' CPU threads (the XLA_FLAGS already set
  kept)."""
  return {
    "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen="
    f"{'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}".strip(),
    "OMP_NUM_THREADS": str(threads),
    "OPENBLAS_NUM_THREADS": str(threads),
  }


def run_all(
  commands: list[list[str]],
  env: dict[str, str],
  slots: list[dict[str, str]],
  logs: list[str] | None = None,
) -> list:
  """Runs `commands`, one per slot at a time, each with `env` and its slot's variables (and its
  output appended to its file of `logs`, when given); the commands that failed."""
  pending = list(zip(commands, logs or [None] * len(commands)))
  running, failed = {}, []
  free = list(range(len(slots)))
  while pending or running:
    while pending and free:
      slot, (command, log) = free.pop(0), pending.pop(0)
      out = open(log, "ab") if log else None  # noqa: SIM115 (closed when the job ends)
      process = subprocess.Popen(
        command, env={**os.environ, **env, **slots[slot]}, stdout=out, stderr=out
      )
      running[process] = (command, slot, out)
    for process, (command, slot, out) in list(running.items()):
      if process.poll() is not None:
        del running[process]
        free.append(slot)
        if out:
          out.close()
        if process.returncode:
          failed.append(shlex.join(command))
    time.sleep(0.2)
  return failed


def split_axes(
  config: ml_collections.ConfigDict, sweeps: list[str], zips: list[str], seeds: int
) -> tuple[list[str], list[str], tuple[str, ...]]:
  """Which axes one program can stack (keys that leave its shapes and computation alike,
  `config.is_stackable`) and which need programs of their own: (--sweep axes and --zip axes
  of the separate programs, pouta_jax.main's flags for the stacked rest). The --zip axes
  stack only if all their keys do."""

  def stackable(spec: str) -> bool:
    return config_lib.is_stackable(config, _parse_axis("sweep", spec, config)[0])

  stacked = [f"--sweep={s}" for s in sweeps if stackable(s)]
  zips_stack = bool(zips) and all(stackable(z) for z in zips)
  stacked += [f"--zip={z}" for z in zips] if zips_stack else []
  stacked += [f"--seeds={seeds}"] if seeds > 1 else []
  separate = [s for s in sweeps if not stackable(s)]
  return separate, [] if zips_stack else list(zips), tuple(stacked)


def check_categories(categories: list[str], root: str) -> None:
  """Unknown category names fail before any job starts: the subfolders of `root`, or the
  embedded dataset's categories when there is no root."""
  if not root:
    known = sorted(embedded.CATEGORIES)
  elif files.is_dir(root, "dataset root", SweepError):
    known = sorted(p.name for p in files.path(root).iterdir() if p.is_dir())
  else:
    known = []
  unknown = [c for c in categories if c not in known]
  if unknown:
    where = f"folders of {root}" if root else "embedded categories (set config.data.root)"
    raise SweepError(f"--categories: {unknown} not among the {where}: {known}")


def define_launch_flags() -> None:
  """The flags every launcher in launch/ shares: what to run, and where its workdirs go."""
  flags.DEFINE_string("config", "configs/draem.py", "Config file (without argument).")
  flags.DEFINE_string("preset", "", "Size preset appended to each category, e.g. tiny.")
  flags.DEFINE_list("categories", None, "Categories, one run each; all: MVTec AD's 15.")
  flags.DEFINE_string("workdir", None, "Parent of the per-run workdirs.", required=True)
  flags.DEFINE_multi_string("sweep", [], "key=v1,v2,...: one product axis each.")
  flags.DEFINE_multi_string("zip", [], "key=v1,v2,...: all --zip flags form one axis.")
  flags.DEFINE_bool("config_sweep", False, "Also sweep the config file's get_sweep(arg).")
  flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 per setting.", lower_bound=1)
  flags.DEFINE_bool(
    "one_program",
    False,
    "Train all categories, seeds and sweep points that share a program's shapes in one program "
    "(each run its own model on a run axis) instead of one program each; keys that change "
    "shapes (e.g. model.base_width) still get programs of their own.",
  )


def jobs_from_flags(extra: list[str]) -> list[Job]:
  """The launch flags' jobs, checked (keys, categories) before anything runs; `extra` are
  pouta_jax.main arguments given after `--`."""
  f = flags.FLAGS
  if not f.categories:
    raise SweepError("--categories: expected category names (or all: MVTec AD's 15)")
  categories = config_lib.expand_categories(f.categories)
  arg = ",".join(p for p in (categories[0], f.preset) if p)
  base = config_lib.load_file(f.config, arg)
  sweeps, zips = list(f.sweep), list(f.zip)
  if f.config_sweep:
    spec = config_lib.load_sweep(f.config, arg)
    sweeps += [f"{k}={','.join(map(str, v))}" for k, v in spec.get("product", {}).items()]
    zips += [f"{k}={','.join(map(str, v))}" for k, v in spec.get("zip", {}).items()]
  root = next(
    (a.split("=", 1)[1] for a in reversed(extra) if a.startswith("--config.data.root=")),
    base.data.root,
  )
  check_categories(categories, root)
  if not f.one_program:
    points = expand(base, sweeps, zips, f.seeds)
    return jobs(f.config, f.preset, categories, f.workdir, points, extra)
  sweeps, zips, stacked = split_axes(base, sweeps, zips, f.seeds)
  points = expand(base, sweeps, zips)
  return jobs(f.config, f.preset, categories, f.workdir, points, extra, stacked)


def finished_runs(root: str | Path | list) -> list[tuple[dict, dict, Path]]:
  """(config, its model's metrics, metrics.json's path) of every run under `root` (a folder or
  a list of them) with metrics.json and config.json; each config as today's code reads it
  (config.upgrade: a key added since a run has its default, so settings compare)."""
  roots = root if isinstance(root, list) else [root]
  found = []
  for metrics_path in (p for r in roots for p in files.files_in(r) if p.name == "metrics.json"):
    config_path = metrics_path.parent / "config.json"
    if not config_path.is_file():
      continue  # e.g. the demo's combined metrics.json
    stored = files.read_json(config_path, SweepError)
    try:
      config = config_lib.upgrade(stored).to_dict()
    except (errors.ConfigError, KeyError, TypeError) as e:
      raise SweepError(f"{config_path}: not a config of this version ({e})") from None
    results = files.read_json(metrics_path, SweepError).get(config["model"]["name"])
    if not isinstance(results, dict):
      raise SweepError(f"{metrics_path}: no metrics of model {config['model']['name']!r}")
    found.append((config, results, metrics_path))
  return found


def run_categories(config: dict) -> list[str]:
  """The categories a finished run scored: its program's, or its one."""
  return config["data"].get("categories") or [config["data"]["category"]]


def setting_of(config: dict, keys: list[str]) -> tuple[str, ...]:
  """A run's values of the swept `keys`, as the tables show them."""
  return tuple(json.dumps(_get(config, k)) for k in keys)


def _get(config: dict, key: str):
  """The value at a dotted key, or None where a run's config lacks it (an older run)."""
  for part in key.split("."):
    if not isinstance(config, dict) or part not in config:
      return None
    config = config[part]
  return config


def paired_differences(roots: list, default_roots: list, keys: list[str], metric: str) -> dict:
  """{setting: (mean, standard error, pairs)}: the validation `metric` (in points) of each
  setting of `keys` among the runs under `roots`, less that of its model's default (the runs
  under `default_roots`, of that default setting whose values of the keys its model's defaults
  vary are the setting's; the default's own setting maps to None), paired over (category, seed):
  two such runs share their data stream and initialisation, so the pairs' spread is the
  setting's effect's noise, not the seeds'. A setting with fewer than 2 pairs is left out."""

  default_runs = paired_values(default_roots, keys, metric, "validation")
  defaults: dict[str, list[tuple[tuple, dict]]] = {}
  for setting, (model, pairs) in default_runs.items():
    defaults.setdefault(model, []).append((setting, pairs))
  differences: dict[tuple, tuple | None] = dict.fromkeys(default_runs)
  for setting, (model, pairs) in paired_values(roots, keys, metric, "validation").items():
    # A model with several default settings (a question re-scoring another's runs, each of its
    # few-shot sizes, say): the one with this setting's values of the keys they vary.
    candidates = defaults.get(model, [])
    varied = [i for i in range(len(keys)) if len({s[i] for s, _ in candidates}) > 1]
    matched = [p for s, p in candidates if all(s[i] == setting[i] for i in varied)]
    default = matched[0] if len(matched) == 1 else {}
    summary = mean_and_error([value - default[p] for p, value in pairs.items() if p in default])
    if summary is not None:
      differences[setting] = summary
  return differences


def paired_values(
  roots: list, keys: list[str], metric: str, split: str
) -> dict[tuple, tuple[str, dict[tuple[str, int], float]]]:
  """{setting of `keys`: (its model, {(category, seed): `metric` in points on `split`})} of the
  runs under `roots` (a pixel metric of an image-level dataset, None, is left out)."""
  found: dict[tuple, tuple[str, dict]] = {}
  for config, results, _ in finished_runs(roots):
    per_pair = found.setdefault(setting_of(config, keys), (config["model"]["name"], {}))[1]
    scored = results.get("validation", {}) if split == "validation" else results
    for category in run_categories(config):
      value = (scored.get(category) or {}).get(metric)
      if value is not None:
        per_pair[(category, config["train"]["seed"])] = 100 * value
  return found


def mean_and_error(differences: list[float]) -> tuple[float, float, int] | None:
  """(mean, its standard error, count) of paired differences; None for fewer than 2."""
  if len(differences) < 2:
    return None
  d = np.asarray(differences)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))), len(d)


def model_gaps(
  roots: list, keys: list[str], metric: str, split: str, model: str, peer: str
) -> list[tuple[tuple, tuple, dict[tuple[str, int], float]]]:
  """(a setting of `model`, one of `peer`'s, {(category, seed): model's `metric` less peer's,
  in points on `split`}) for each pair of settings that agree on every key both models vary
  (keys[0] is model.name). A key only one model varies, or neither (say POUTA's steps against
  DRAEM's in an equal-time question, or DRAEM's scorings against POUTA's one), pairs each of its
  values with every value of the other's: each such comparison is a row."""
  values = paired_values(roots, keys, metric, split)
  ours = {s: pairs for s, (m, pairs) in values.items() if m == model}
  theirs = {s: pairs for s, (m, pairs) in values.items() if m == peer}
  both_vary = [
    i
    for i in range(1, len(keys))
    if min(len({s[i] for s in settings}) for settings in (ours, theirs)) > 1
  ]
  gaps = []
  for setting, pairs in ours.items():
    for other, other_pairs in theirs.items():
      if all(setting[i] == other[i] for i in both_vary):
        shared = {p: v - other_pairs[p] for p, v in pairs.items() if p in other_pairs}
        gaps.append((setting, other, shared))
  return gaps


def gaps_table(
  roots: list, keys: list[str], metrics: Sequence[str], groups: dict, model: str, peer: str
) -> str:
  """Markdown: `model` less `peer` on the test sets, in points, paired over (category, seed) within
  each group of categories (`groups`: name -> categories; a study's datasets), one row per pair
  of settings `model_gaps` compares and group. Each side's eval.error_weight is shown (comparing
  scorings is not comparing models). Empty when the runs are not of both models."""
  keys = [*keys, *(["eval.error_weight"] if "eval.error_weight" not in keys else [])]
  gaps = {
    metric: {
      (ours, theirs): d for ours, theirs, d in model_gaps(roots, keys, metric, "test", model, peer)
    }
    for metric in metrics
  }
  if not gaps[metrics[0]]:
    return ""

  def named(setting: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(keys[1:], setting[1:]))

  header = [f"{model}'s setting", f"{peer}'s setting", "dataset"]
  header += [f"{metric}: {model} − {peer}" for metric in metrics]
  rows = []
  for ours, theirs in gaps[metrics[0]]:
    for name, categories in groups.items():
      cells = []
      for metric in metrics:
        found = gaps[metric][(ours, theirs)]
        summary = mean_and_error([d for (c, _), d in found.items() if c in categories])
        cells.append("–" if summary is None else "{:+.1f} ± {:.1f} (n={})".format(*summary))
      if any(c != "–" for c in cells):
        rows.append([named(ours), named(theirs), name, *cells])
  title = (
    f"{model} less {peer} on the test sets (points; mean ± s.e. over category × seed pairs, the "
    "two runs of a pair trained on the same data with the same seed):"
  )
  return "\n".join([title, "", *report.markdown_table(header, rows)])


def ranked_settings(ranked_csv: str, keys: list[str]) -> list[tuple[str, ...]]:
  """The settings (values of `keys`) of `aggregate`'s CSV, best first."""
  return [tuple(row[: len(keys)]) for row in list(csv.reader(io.StringIO(ranked_csv)))[1:]]


def choice(
  keys: list[str],
  ranked_csv: str,
  differences: dict,
  metric: str,
  allowed: Collection[tuple] | None = None,
  requirement: str = "",
) -> str:
  """The setting chosen per model: its best mean by validation `metric`, if that beats the
  model's default by more than 2 standard errors of the paired differences; else the default
  stays (a gain within the seeds' noise does not change a default). With `allowed` (the
  settings that meet `requirement`, say a cost target), only those may be chosen, and a default
  that does not meet it gives way to the best that does unless that one is worse by more than
  2 standard errors (then the default stays and the requirement is missed, said so)."""
  rows = ranked_settings(ranked_csv, keys)
  lines = []
  for model in dict.fromkeys(row[0] for row in rows):
    candidates = [row for row in rows if row[0] == model and (allowed is None or row in allowed)]
    if not candidates:
      lines.append(f"No setting of {json.loads(model)} is {requirement}.")
      continue
    best = candidates[0]
    named = ", ".join(f"{k}={v}" for k, v in zip(keys, best))
    if best not in differences:
      lines.append(f"{named} leads, but has fewer than 2 runs paired with the default's.")
      continue
    if differences[best] is None:
      lines.append(f"Chosen by validation {metric}: **{named}**, the default: the best mean.")
      continue
    mean, error, pairs = differences[best]
    against = f"{mean:+.1f} ± {error:.1f} points against the default over {pairs} pairs"
    default_allowed = allowed is None or any(
      row[0] == model and differences.get(row, 0) is None for row in allowed
    )
    if mean > 2 * error:
      lines.append(f"Chosen by validation {metric}: **{named}** ({against}).")
    elif not default_allowed and mean >= -2 * error:
      lines.append(
        f"Chosen by validation {metric}: **{named}**, the best mean of the settings "
        f"{requirement} ({against}, within 2 standard errors; the default is not {requirement})."
      )
    elif not default_allowed:
      lines.append(
        f"Chosen by validation {metric}: **the default** of {json.loads(model)}, which is not "
        f"{requirement}: the best that is, {named}, is {against}, worse by more than 2 "
        "standard errors."
      )
    else:
      lines.append(
        f"Chosen by validation {metric}: **the default** of {json.loads(model)}: the best "
        f"mean{' ' + requirement if requirement else ''}, {named}, is {against}, within 2 "
        "standard errors."
      )
  return "\n".join(lines)


def differences_table(keys: list[str], ranked_csv: str, differences: dict, metric: str) -> str:
  """Markdown: `paired_differences` per row of `ranked_csv` (aggregate's CSV), in its order."""
  header = keys + [f"{metric} less the default's (points, mean ± s.e. over category x seed)"]
  rows = []
  for setting in ranked_settings(ranked_csv, keys):
    if setting not in differences:
      cell = "– (fewer than 2 pairs)"
    elif differences[setting] is None:
      cell = "(the default)"
    else:
      mean, error, pairs = differences[setting]
      cell = f"{mean:+.1f} ± {error:.1f} (n={pairs})"
    rows.append([*setting, cell])
  return "\n".join(report.markdown_table(header, rows))


# And "validation/<kind>": the validation set's anomalies of one kind (data.val_defects) with its
# normal images.
SPLITS = ("test", "validation")


def aggregate(
  root: str | Path | list,
  swept: list[str] | None = None,
  metric: str = "pixel_ap",
  split: str = "test",
) -> tuple[str, str]:
  """Markdown and CSV: a row per setting of the `swept` keys (the best mean first), a column per
  category and the mean, each cell mean ± std over seeds of `metric` on the `split` (SPLITS),
  over the runs under `root` (or under each of a list of roots).
  `swept` defaults to every key that varies between runs."""
  base, _, kind = split.partition("/")
  if base not in SPLITS or (kind and base != "validation"):
    raise SweepError(f"--split={split!r}: expected one of {SPLITS} or validation/<kind>")
  runs = []
  for config, results, metrics_path in finished_runs(root):
    categories = run_categories(config)
    if base == "validation":
      if kind:
        per_kind = results.get("validation_by_defect", {})
        results = {c: v[kind] for c, v in per_kind.items() if kind in v}
      else:
        results = results.get("validation", {})
      missing = [c for c in categories if c not in results]
      if missing:
        raise SweepError(
          f"{metrics_path}: no {split} metrics of {missing} (trained without "
          f"data.val_fraction, or scored before data.val_defects had that kind); rank it with "
          f"--split=test"
        )
    runs.extend((config, category, results[category][metric]) for category in categories)
  if not runs:
    roots = root if isinstance(root, list) else [root]
    raise SweepError(f"no run with metrics.json and config.json under {', '.join(map(str, roots))}")
  if swept is None:
    flat = [{k: json.dumps(v) for k, v in config_lib.flatten(c).items()} for c, _, _ in runs]
    keys = set().union(*flat) - {"train.seed", "data.category", "data.categories"}
    swept = sorted(k for k in keys if len({f.get(k) for f in flat}) > 1)
  table: dict[tuple, dict[str, list[float]]] = {}
  for config, category, value in runs:
    if value is None:
      continue  # a pixel metric of an image-level dataset (metrics.json's notes say so)
    setting = setting_of(config, swept)
    table.setdefault(setting, {}).setdefault(category, []).append(value)
  categories = sorted({c for _, c, _ in runs})

  most = max(len(v) for per_category in table.values() for v in per_category.values())

  def cell(values: list[float]) -> str:  # with its count where it has fewer seeds than others
    if not values:
      return "–"
    count = f" (n={len(values)})" if len(values) < most else ""
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}{count}"

  # Rows are compared on the categories they all have: a mean over other categories than
  # another row's would rank settings by which runs are done.
  common = [c for c in categories if all(c in per_category for per_category in table.values())]
  if common == categories:
    mean_of, label = categories, "mean"
  elif common:
    mean_of, label = common, f"mean ({', '.join(common)})"
  else:
    mean_of, label = categories, "mean (each row's categories)"
  header = (swept or ["setting"]) + categories + [label]
  ranked = []
  for setting, per_category in table.items():
    mean = np.mean([np.mean(per_category[c]) for c in mean_of if c in per_category])
    row = (
      list(setting or ("default",))
      + [cell(per_category.get(c, [])) for c in categories]
      + [f"{100 * mean:.1f}"]
    )
    ranked.append((-mean, len(ranked), row))
  rows = [row for _, _, row in sorted(ranked)]
  where = f"validation set's {kind} anomalies" if kind else f"{split} set"
  title = f"**{metric}** on the {where} (%, mean ± std over seeds; the best mean first)"
  markdown = "\n".join([title, "", *report.markdown_table(header, rows)]) + "\n"
  out = io.StringIO()
  csv.writer(out).writerows([header] + rows)
  return markdown, out.getvalue()


def main(argv: list[str]) -> None:
  del argv
  root, metric, split = flags.FLAGS.root, flags.FLAGS.metric, flags.FLAGS.split
  markdown, table_csv = aggregate(root, metric=metric, split=split)
  base, _, kind = split.partition("/")
  name = f"sweep_{'val_' if base == 'validation' else ''}{f'{kind}_' if kind else ''}{metric}"
  files.write_atomic(Path(root) / f"{name}.md", markdown)
  files.write_atomic(Path(root) / f"{name}.csv", table_csv)
  print(markdown)


if __name__ == "__main__":
  # Defined here, not at import: the launcher imports this module and must not get these flags.
  flags.DEFINE_string("root", None, "Folder holding the sweep's runs.", required=True)
  flags.DEFINE_enum("metric", "pixel_ap", list(report.METRIC_COLUMNS), "Metric shown.")
  flags.DEFINE_string(
    "split",
    "test",
    "The metrics of the test or validation set, or of one kind of validation anomaly "
    "(validation/removed).",
  )
  errors.run(main)
