"""Runs a design study (configs/pouta_study.py) on this machine and writes its report.

    python launch/study.py --workdir=outputs/study --real_root=../shared/data/mtoc \
        --out=docs/pouta_study.md [--study=configs/pouta_study.py] [--only=models,level_weights] \
        [--parallel=2] [--report_only] [--dry_run]

Every run is a program of its own, in `<workdir>/<question>/<dataset>/<model>/<point>/<category>`
(the point includes the seed). A run whose metrics.json exists is done and skipped, so the study
resumes where it stopped and grows with new questions; a finished run scored on an older
validation set (before data.val_defects) is evaluated again from its checkpoint
(`--mode=eval`), not retrained, and so is one whose scoring keys (config.SCORING_KEYS) differ
from today's (a default changed since); a run that differs from another only in how a model is
scored (a question over eval.error_weight, say) evaluates a copy of that run's checkpoints
instead of training the same model again (`plan`); `--report_only` writes the report from the
runs done so far.
Single-run programs, not stacked ones: on 2 CPU cores the unrolled step of 12 stacked tiny
runs was still compiling after 3 minutes, while the single-run programs of one model and image
size are one program (hyperparameters and seeds are its inputs), compiled once
into the shared compilation cache `<workdir>/compilation_cache`. `--real_root` is the real
dataset's root (its categories as the study names them); without it those runs are left out and
the report says so. A started run whose stored config differs from the one its command gives
today (the study file or a config file's default changed under it) is refused, naming it and
the keys. The report
(`--out`) ranks each question's settings by validation metrics, mean ± std over seeds per
category, and names the setting with the best mean of the study's `select` metric once all of
the question's runs are done; a question's `cost_at_most` (discriminative FLOPs over DRAEM's)
limits the choice to the settings within it, and replaces a default over it by the best within
it unless that one is worse by more than 2 standard errors (`sweep.choice`); questions marked
`test` also show the test sets' tables and, where both models ran, POUTA less DRAEM on each
dataset's test set in pixel AP and AUPRO (the targets; `sweep.gaps_table`).
"""

from __future__ import annotations

import csv
import datetime
import fnmatch
import io
import json
import os
import shlex
import sys

import numpy as np
from absl import flags
from etils.epath import Path
from ml_collections import config_flags

from pouta_jax import config as config_lib, errors, files, sweep
from pouta_jax.report import markdown_table

_STUDY = flags.DEFINE_string("study", "configs/pouta_study.py", "The study file (get_study()).")
_WORKDIR = flags.DEFINE_string("workdir", "outputs/study", "Parent of the study's runs.")
_REAL_ROOT = flags.DEFINE_string("real_root", "", "Root of the real dataset (MVTec AD layout).")
_OUT = flags.DEFINE_string("out", "", "Markdown report to write (default <workdir>/study.md).")
_ONLY = flags.DEFINE_list("only", [], "Questions to run (default: all); the report has all.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs at a time.", lower_bound=1)
_THREADS = flags.DEFINE_integer("threads_per_process", 1, "CPU threads per run.", lower_bound=1)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report; run nothing.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the missing runs' commands; run nothing.")

STUDY_KEYS = {"preset", "seeds", "select", "report", "common", "datasets", "questions"}
# `pinned` (optional): {config file: flags} that pin the values a config file's defaults had when
# the study's runs were made, so that a default changed since (the study's outcome) keeps them
# the study's; a question with pinned=False runs today's defaults.
OPTIONAL_KEYS = {"pinned"}
QUESTION_KEYS = {
  "name",
  "question",
  "configs",
  "sweep",
  "zip",
  "include",
  "test",
  "pinned",
  "cost_at_most",
}


def load(path: str) -> dict:
  """The study file's get_study(), its questions checked (names, keys, config files, axes)."""
  study = config_lib.load_study(path)
  if not STUDY_KEYS <= set(study) <= STUDY_KEYS | OPTIONAL_KEYS:
    raise errors.ConfigError(
      f"{path}: get_study() has {sorted(study)}; expected the keys {sorted(STUDY_KEYS)} "
      f"(optional: {sorted(OPTIONAL_KEYS)})"
    )
  if study["select"] not in study["report"]:
    raise errors.ConfigError(f"{path}: select={study['select']!r} is not among report")
  names = [q.get("name") for q in study["questions"]]
  if len(set(names)) != len(names) or not all(names):
    raise errors.ConfigError(f"{path}: question names must be given and distinct: {names}")
  for q in study["questions"]:
    unknown = set(q) - QUESTION_KEYS
    if unknown:
      raise errors.ConfigError(f"{path}: question {q['name']}: unknown keys {sorted(unknown)}")
    limit = q.get("cost_at_most", 1.0)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
      raise errors.ConfigError(
        f"{path}: question {q['name']}: cost_at_most={limit!r} is not a positive number (the "
        "discriminative FLOPs over DRAEM's a chosen setting may have)"
      )
    for entry in q.get("include", ()):
      if not all(isinstance(g, str) and g for g in _globs(entry)):
        raise errors.ConfigError(
          f"{path}: question {q['name']}: include entry {entry!r} is not a glob or a tuple of "
          "globs (folders relative to the study's workdir)"
        )
    for config_path in q["configs"]:  # every axis key checked against every config it runs
      sweep.expand(
        config_lib.load_file(config_path), list(q.get("sweep", ())), list(q.get("zip", ()))
      )
  return study


def jobs(study: dict, workdir: str, real_root: str, only: list[str]) -> list[sweep.Job]:
  """Every run of the `only` questions (all when empty) that the datasets at hand allow."""
  questions = {q["name"]: q for q in study["questions"]}
  unknown = [name for name in only if name not in questions]
  if unknown:
    raise errors.ConfigError(f"--only: no questions {unknown} in the study: {sorted(questions)}")
  found = []
  for name, q in questions.items():
    if only and name not in only:
      continue
    for dataset, spec in study["datasets"].items():
      root = real_root if dataset == "real" else ""
      if dataset == "real" and not real_root:
        continue
      extra = [*study["common"], *spec["args"]] + ([f"--config.data.root={root}"] if root else [])
      axes = set(axis_keys(q))
      for config_path in q["configs"]:
        model = Path(config_path).stem
        sweep.check_categories(list(spec["categories"]), root)
        pins = study.get("pinned", {}).get(config_path, ()) if q.get("pinned", True) else ()
        # A pinned key the question varies is the question's.
        pins = [f for f in pins if f.partition("=")[0].removeprefix("--config.") not in axes]
        points = sweep.expand(
          config_lib.load_file(config_path),
          list(q.get("sweep", ())),
          list(q.get("zip", ())),
          study["seeds"],
        )
        found += sweep.jobs(
          config_path,
          study["preset"],
          list(spec["categories"]),
          os.path.join(workdir, name, dataset, model),
          points,
          [*pins, *extra],
        )
  return found


def is_finished(workdir: str) -> bool:
  return (files.path(workdir) / "metrics.json").is_file()


def is_done(job: sweep.Job) -> bool:
  return is_finished(job.workdir)


def is_scored_on_an_older_validation_set(job: sweep.Job) -> bool:
  """A finished run whose validation metrics came from the validation set before
  data.val_defects (the training synthesis's anomalies only: no `validation_by_defect`)."""
  document = files.read_json(files.path(job.workdir) / "metrics.json", hint="; remove the run")
  return any(
    "validation" in entry and "validation_by_defect" not in entry
    for entry in document.values()
    if isinstance(entry, dict)
  )


def job_config(job: sweep.Job) -> dict:
  """The config `job`'s command line gives pouta_jax.main today (its config file's current
  defaults with the job's overrides), as config.json stores it."""
  argv = ["pouta_jax.main", *(a for a in job.args if a.startswith("--config"))]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  config_lib.parse_flags(argv, values)
  return json.loads(values.config.to_json_best_effort())


def check_configs(found: list[sweep.Job]) -> None:
  """A started run whose stored config is not the one its command gives today (the study
  file's preset, common flags or a dataset root changed since, or a default in a config file)
  is refused, naming it and the keys, before anything runs, rather than counted as this
  study's: a run is its config, not its command line (a study file that spells out a value
  the default already had keeps its runs). Scoring keys alone may differ (with
  train.select=last): that run's model is evaluated again with today's (`needs_scoring`)."""
  for job in found:
    workdir = files.path(job.workdir)
    if not (workdir / "config.json").is_file():
      continue
    stored, today = stored_config(job.workdir), job_config(job)
    # A copy not yet evaluated holds its source's scoring keys, too (`plan`).
    scoring = config_lib.SCORING_KEYS if same_model_scored_anew(stored, today) else ()
    changed = [
      f"config.{key}: stored {old!r}, now {new!r}"
      for key, old, new in config_lib.differences(stored, today)
      if key not in config_lib.OUTPUT_ONLY_KEYS and key not in scoring
    ]
    if changed:
      raise errors.ConfigError(
        f"{job.workdir} was run with another config ({'; '.join(changed)}); remove it, or "
        f"give this study another --workdir"
      )


def same_model_scored_anew(stored: dict, today: dict) -> bool:
  """Whether a run stored with config `stored` trained the model `today`'s config trains."""
  return config_lib.training_identity(stored) == config_lib.training_identity(today)


def scoring_changed(job: sweep.Job) -> bool:
  """A started run whose scoring keys differ from today's (a default changed since): the same
  model, evaluated again with today's (`check_configs` refused any other difference)."""
  differences = config_lib.differences(stored_config(job.workdir), job_config(job))
  return any(key in config_lib.SCORING_KEYS for key, _, _ in differences)


def stored_config(workdir: str) -> dict:
  """The config a run stored, as today's code reads it (as JSON)."""
  stored = files.read_json(files.path(workdir) / "config.json", errors.ConfigError, "; remove it")
  return json.loads(config_lib.upgrade(stored).to_json_best_effort())


# In a run made from another's checkpoints (`plan`): {"source": that run's workdir}.
SCORED_FROM = "scored_from.json"


def plan(
  pending: list[sweep.Job], trained: list[sweep.Job]
) -> tuple[list, dict[sweep.Job, str | None]]:
  """Which of the `pending` runs train, and which are another run's model scored their own way:
  runs whose configs differ only in config.SCORING_KEYS train the same model
  (config.training_identity), so one trains and the others evaluate copies of its checkpoints.
  Returns (the runs to train, {run to score: the workdir of the run it copies}); that run is
  one of the `trained` (finished) runs, or one of those to train, whose copies wait for it. A run
  started as a copy goes on as one (None: its copy is made); one started training goes on
  training."""
  sources = {}
  for job in trained:
    sources.setdefault(config_lib.training_identity(stored_config(job.workdir)), job.workdir)
  to_train, to_score = [], {}
  for job in pending:
    workdir = files.path(job.workdir)
    if (workdir / SCORED_FROM).is_file():
      to_score[job] = None
      continue
    identity = config_lib.training_identity(job_config(job))
    if identity in sources and not workdir.exists():
      to_score[job] = sources[identity]
    else:
      sources.setdefault(identity, job.workdir)
      to_train.append(job)
  return to_train, to_score


def copy_trained(source: str, workdir: str) -> None:
  """Makes `workdir` a run of `source`'s config and checkpoints, none of its results, marked with
  SCORED_FROM: assembled aside and moved into place whole, so a stopped copy is no run."""
  checkpoints = files.path(source) / "checkpoints"
  with files.atomic_folder(workdir, SCORED_FROM) as staging:
    for file in [files.path(source) / "config.json", *files.files_in(checkpoints)]:
      target = staging / file.relative_to(files.path(source))
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(file.read_bytes())
    files.write_json(staging / SCORED_FROM, {"source": source})


# Lets a run's scoring keys change (`check_configs` refused any other change).
ALLOW_SCORING = f"--allow_config_change={','.join(sorted(config_lib.SCORING_KEYS))}"


def scoring_command(job: sweep.Job) -> list[str]:
  """The command that evaluates `job`'s trained model (its own, or a copy's) again, with
  `job`'s scoring keys and on the current validation set."""
  return [*job.command(), "--mode=eval", ALLOW_SCORING]


def training_command(job: sweep.Job) -> list[str]:
  """`job`'s command; a started run goes on with today's scoring keys."""
  started = (files.path(job.workdir) / "config.json").is_file()
  return [*job.command(), *([ALLOW_SCORING] if started else [])]


def needs_scoring(job: sweep.Job) -> bool:
  """A finished run to evaluate again from its checkpoints, not retrain: scored on the
  validation set of before data.val_defects, or with scoring keys other than today's."""
  return is_done(job) and (is_scored_on_an_older_validation_set(job) or scoring_changed(job))


def axis_keys(question: dict) -> list[str]:
  """The config keys a question varies (its sweep and zip axes), in their order."""
  return [a.partition("=")[0] for a in (*question.get("sweep", ()), *question.get("zip", ()))]


def _globs(entry: str | tuple[str, ...]) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry)


def runs_of(question: dict) -> list[str]:
  """The folders (globs, relative to the workdir) whose runs a question ranks: its own, and
  those it `include`s from other questions: the first entry, the default setting's runs (each
  model's default, which the others are measured against; a tuple of globs when the models'
  defaults live in different questions), then any others to rank beside."""
  return [question["name"], *(g for entry in question.get("include", ()) for g in _globs(entry))]


def default_runs(question: dict) -> tuple[str, ...]:
  """The globs of the default setting's runs: the first entry of `include`."""
  include = question.get("include", ())
  return _globs(include[0]) if include else ()


def matches(job: sweep.Job, workdir: str, pattern: str) -> bool:
  return fnmatch.fnmatch(os.path.relpath(job.workdir, workdir), f"{pattern}/*")


def kinds_table(roots: list, keys: list[str], metric: str, ranked_csv: str) -> str:
  """Markdown: `metric` per kind of validation anomaly (columns), each setting's mean over the
  categories (rows in `ranked_csv`'s order, the select metric's table); runs scored before
  data.val_defects have no kinds (launch/study.py re-scores them)."""
  order = sweep.ranked_settings(ranked_csv, keys)
  columns = {}
  for kind in config_lib.VALIDATION_DEFECTS:
    try:
      _, kind_csv = sweep.aggregate(roots, keys, metric, f"validation/{kind}")
    except sweep.SweepError:
      return "(per kind of validation anomaly: not every run is scored on the kinds yet)"
    columns[kind] = {
      tuple(r[: len(keys)]): r[-1] for r in list(csv.reader(io.StringIO(kind_csv)))[1:]
    }
  header = (keys or ["setting"]) + list(columns)
  rows = [[*setting, *(columns[k].get(setting, "–") for k in columns)] for setting in order]
  title = (
    f"{metric} per kind of validation anomaly (%, the mean over seeds and the categories every "
    "row has):"
  )
  return "\n".join([title, "", *markdown_table(header, rows)])


def cost_ratios(roots: list, keys: list[str], draem_roots: list) -> dict[tuple, float]:
  """Each setting's discriminative FLOPs per image (evaluate.profile, in its runs'
  metrics.json) over DRAEM's discriminative subnetwork's at the same image size (`draem_roots`:
  DRAEM's runs), the mean over its runs."""
  draem = {
    config["data"]["image_size"]: results["flops"]["discriminative"]
    for config, results, _ in sweep.finished_runs(draem_roots)
    if config["model"]["name"] == "draem" and "flops" in results
  }
  ratios = {}
  for config, results, _ in sweep.finished_runs(roots):
    size = config["data"]["image_size"]
    if size in draem and "flops" in results:
      ratio = results["flops"]["discriminative"] / draem[size]
      ratios.setdefault(sweep.setting_of(config, keys), []).append(ratio)
  return {setting: float(np.mean(r)) for setting, r in ratios.items()}


def cost_table(means: dict[tuple, float], keys: list[str], ranked_csv: str) -> str:
  """Markdown: `cost_ratios`' `means`, rows in `ranked_csv`'s order; the cost target is 0.25."""
  if not means:
    return "(cost: no DRAEM run of the same image size is done yet)"
  if max(means.values()) - min(means.values()) < 0.005:
    return (
      f"Cost: every setting's discriminative part has {min(means.values()):.2f}x the FLOPs per "
      "image of DRAEM's discriminative subnetwork (the target is at most 0.25)."
    )
  order = sweep.ranked_settings(ranked_csv, keys)
  header = (keys or ["setting"]) + ["discriminative FLOPs / DRAEM's"]
  rows = [[*setting, f"{means[setting]:.2f}" if setting in means else "–"] for setting in order]
  title = (
    "Cost: the discriminative part's FLOPs per image over DRAEM's discriminative subnetwork's "
    "(the target is at most 0.25):"
  )
  return "\n".join([title, "", *markdown_table(header, rows)])


# The targets (issue #18): POUTA at least DRAEM on each dataset's test set in these metrics.
TARGET_METRICS = ("pixel_ap", "aupro")


def report(study: dict, workdir: str, all_jobs: list[sweep.Job], command: str) -> str:
  """The study's markdown: per question, a table per reported metric (validation split) and the
  setting chosen by the `select` metric; `all_jobs`: every run of the study, to say how many of
  each question's are done; `command`: how to write it again."""
  lines = [
    "# POUTA design study",
    "",
    f"Written on {datetime.date.today()} by `{command}` from the runs under `{workdir}` (without "
    f"`--report_only` it first runs what is missing). Preset `{study['preset']}`, "
    f"{study['seeds']} seeds per setting, {', '.join(study['common'])}; datasets: "
    + "; ".join(
      f"{name} ({', '.join([*spec['categories'], *spec['args']])})"
      for name, spec in study["datasets"].items()
    )
    + ". Every number is on the **validation split** (held-out normal training images, and the "
    "same images with an anomaly of each kind in data.val_defects): no test label chose "
    "anything here.",
  ]
  draem_roots = [  # the reference of the cost tables
    j.workdir for j in all_jobs if f"{os.sep}draem{os.sep}" in j.workdir and is_done(j)
  ]
  for q in study["questions"]:
    mine = [j for j in all_jobs if any(matches(j, workdir, pattern) for pattern in runs_of(q))]
    expected = len(mine)
    keys = axis_keys(q)
    several_models = len(q["configs"]) > 1 or q.get("include")  # included runs may be others'
    keys = (["model.name"] if several_models else []) + keys
    lines += ["", f"## {q['name']}: {q['question']}", ""]
    done = sum(is_done(j) for j in mine)
    own = [j for j in mine if os.path.relpath(j.workdir, workdir).startswith(f"{q['name']}/")]
    if not any(is_done(j) for j in own):  # at most the included runs: nothing to compare yet
      lines.append(
        f"Not run yet (0 of its {len(own)} runs; {done} of {expected} with those it includes)."
      )
      continue
    lines.append(f"{done} of {expected} runs done.")
    # The study's own runs only: a folder left by an older version of the study file (a
    # setting since removed) is not ranked.
    roots = [j.workdir for j in mine if is_done(j)]
    costs = cost_ratios(roots, keys, draem_roots)
    limit = q.get("cost_at_most")
    allowed = None if limit is None else {s for s, ratio in costs.items() if ratio <= limit}
    requirement = f"within {limit}x DRAEM's discriminative FLOPs" if limit is not None else ""
    for metric in study["report"]:
      table, table_csv = sweep.aggregate(roots, keys, metric, "validation")
      lines += ["", table.rstrip()]
      if metric == study["select"]:
        best = sweep.ranked_settings(table_csv, keys)[0]
        best = ", ".join(f"{k}={v}" for k, v in zip(keys, best)) if keys else "the only one"
        defaults = [j.workdir for j in mine if any(matches(j, workdir, g) for g in default_runs(q))]
        others = [j.workdir for j in mine if j.workdir not in defaults]
        differences = sweep.paired_differences(
          [r for r in others if r in roots], [r for r in defaults if r in roots], keys, metric
        )
        if differences:
          lines += ["", sweep.differences_table(keys, table_csv, differences, metric)]
        lines.append("")
        if done < expected:  # a partial table can rank on fewer seeds or categories
          lines.append(f"Ahead so far by validation {metric}: {best} (not chosen before all runs)")
        elif keys == ["model.name"]:  # a comparison of models, nothing to choose
          lines.append(f"Ahead by validation {metric}: **{best}**.")
        elif differences:
          lines.append(sweep.choice(keys, table_csv, differences, metric, allowed, requirement))
        else:
          lines.append(f"Chosen by validation {metric}: **{best}**.")
        lines += ["", kinds_table(roots, keys, metric, table_csv)]
        lines += ["", cost_table(costs, keys, table_csv)]
    if q.get("test"):  # reported beside, never used to choose
      lines += ["", "Reported on the test sets (chosen by nothing):"]
      for metric in study["report"]:
        lines += ["", sweep.aggregate(roots, keys, metric, "test")[0].rstrip()]
      if keys and keys[0] == "model.name":
        datasets = {name: spec["categories"] for name, spec in study["datasets"].items()}
        table = sweep.gaps_table(roots, keys, TARGET_METRICS, datasets, "pouta", "draem")
        if table:
          lines += ["", "The targets: POUTA at least DRAEM in these, on each dataset.", "", table]
  return "\n".join(lines) + "\n"


def plan_now(
  study: dict, workdir: str, real_root: str, found: list[sweep.Job]
) -> tuple[list, dict[sweep.Job, str | None]]:
  """`plan` of the `found` runs not done, against every finished run of the study (any
  question's model may serve theirs)."""
  trained = [j for j in jobs(study, workdir, real_root, []) if is_done(j)]
  return plan([j for j in found if not is_done(j)], trained)


def run_missing(study: dict, workdir: str, real_root: str, env: dict[str, str]) -> list[str]:
  """Runs what the `--only` questions lack, in rounds (a copy of a run's checkpoints waits for
  its training: `plan`), until nothing is left or a run fails; the failed commands."""
  first, ran = True, set()
  while True:
    found = jobs(study, workdir, real_root, _ONLY.value)
    check_configs(found)
    to_train, to_score = plan_now(study, workdir, real_root, found)
    pending = [j for j in found if not is_done(j)]
    rescore = [j for j in found if needs_scoring(j)]
    ready = [j for j, source in to_score.items() if source is None or is_finished(source)]
    if first:
      print(
        f"{len(pending)} runs to do and {len(rescore)} to score on the current validation set "
        f"or with today's scoring keys, {_PARALLEL.value} at a time",
        flush=True,
      )
      if to_score:
        print(
          f"{len(to_score)} of the runs to do differ from another only in "
          f"{', '.join(sorted(config_lib.SCORING_KEYS))}: they evaluate copies of its "
          "checkpoints instead of training",
          flush=True,
        )
    first = False
    for job in ready:
      if to_score[job] is not None:
        copy_trained(to_score[job], job.workdir)
    runs = [
      *((scoring_command(j), f"{j.workdir}.eval.log") for j in rescore),
      *((scoring_command(j), f"{j.workdir}.log") for j in ready),
      *((training_command(j), f"{j.workdir}.log") for j in to_train),
    ]
    if not runs:
      return []
    this_round = {j.workdir for j in [*rescore, *ready, *to_train]}
    if this_round & ran:  # each round finishes what it runs; one that did not would run forever
      return [
        f"{w}: its run ended without an error and without metrics.json"
        for w in sorted(this_round & ran)
      ]
    ran |= this_round
    for _, log in runs:
      Path(log).parent.mkdir(parents=True, exist_ok=True)
    failed = sweep.run_all([c for c, _ in runs], env, [{}] * _PARALLEL.value, [g for _, g in runs])
    if failed:
      return failed


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
  study = load(_STUDY.value)
  workdir, real_root = _WORKDIR.value, _REAL_ROOT.value
  env = {
    **sweep.thread_env(_THREADS.value),
    "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.abspath(os.path.join(workdir, "compilation_cache")),
  }
  if _DRY_RUN.value:
    found = jobs(study, workdir, real_root, _ONLY.value)
    to_train, to_score = plan_now(study, workdir, real_root, found)
    for job in to_train:
      print(shlex.join(training_command(job)))
    for job, source in to_score.items():
      copy = f"a copy of {source}'s checkpoints" if source else "the copy made before"
      print(f"{shlex.join(scoring_command(job))}  # on {copy}")
    for job in found:
      if needs_scoring(job):
        print(shlex.join(scoring_command(job)))
    return
  failed = []
  if not _REPORT_ONLY.value:
    failed = run_missing(study, workdir, real_root, env)
    if failed:
      print("failed runs (logs beside their workdirs):\n" + "\n".join(failed), file=sys.stderr)
  out = _OUT.value or os.path.join(workdir, "study.md")
  if not real_root and "real" in study["datasets"]:
    print("--real_root not given: the real dataset's runs are left out", file=sys.stderr)
  command = shlex.join(
    ["python", "launch/study.py", f"--study={_STUDY.value}", f"--workdir={workdir}"]
    + ([f"--real_root={real_root}"] if real_root else [])
    + [f"--out={out}", "--report_only"]
  )
  files.write_atomic(
    Path(out), report(study, workdir, jobs(study, workdir, real_root, []), command)
  )
  print(f"Report: {out}")
  if not _REPORT_ONLY.value and failed:
    sys.exit(1)


if __name__ == "__main__":
  errors.run(main)
