"""The benchmark harness (bench/harness.py): turns, per-process contenders, failures, no peer."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402


def sleeper(seconds: float, label: str):
  """A contender whose iteration takes `seconds`; its facts name its process."""
  return (lambda: time.sleep(seconds)), {"label": label, "pid": os.getpid()}


def self_timed(seconds: float):
  return (lambda: seconds), {}


def environment_reader(*names: str):
  return (lambda: None), {name: os.environ.get(name) for name in names}


def broken():
  raise FileNotFoundError("no weights at /nowhere")


def test_interleaved_times_each_contender_in_its_own_process():
  results = harness.interleaved(
    {
      "fast": (sleeper, (0.01, "a")),
      "slow": (sleeper, (0.2, "b")),
      "reported": (self_timed, (123.0,)),
    },
    repeats=3,
    pause_s=0.0,
  )
  fast, slow = results["fast"], results["slow"]
  assert 0.01 <= fast[0] < 0.15 and 0.2 <= slow[0] < 0.5
  assert results["reported"][0] == 123.0  # an iteration may report the part that counts
  assert fast[1]["label"] == "a" and slow[1]["label"] == "b"
  assert len({fast[1]["pid"], slow[1]["pid"], os.getpid()}) == 3


def test_env_reaches_every_contender_and_leaves_ours_alone(monkeypatch):
  monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
  monkeypatch.setenv("MALLOC_MMAP_MAX_", "7")
  names = tuple(harness.MALLOC_ENV)
  results = harness.interleaved(
    {"a": (environment_reader, names), "b": (environment_reader, names)},
    repeats=1,
    pause_s=0.0,
    env=harness.MALLOC_ENV,
  )
  assert results["a"][1] == results["b"][1] == harness.MALLOC_ENV
  assert "MALLOC_ARENA_MAX" not in os.environ and os.environ["MALLOC_MMAP_MAX_"] == "7"
  plain = harness.interleaved({"c": (environment_reader, names)}, repeats=1, pause_s=0.0)
  assert plain["c"][1]["MALLOC_MMAP_MAX_"] == "7" and plain["c"][1]["MALLOC_ARENA_MAX"] is None


def test_a_contender_that_fails_to_build_is_named():
  with pytest.raises(harness.ContenderError, match="peer: FileNotFoundError: no weights"):
    harness.interleaved({"peer": (broken, ())}, repeats=1)


def test_missing_peer_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # importing either now fails
  monkeypatch.setitem(sys.modules, "anomalib", None)
  with pytest.raises(SystemExit, match=r"(torch|anomalib) missing.*pip install -e '\.\[bench\]'"):
    harness.require_peer()


def test_eval_metrics_bench_checks_values_and_prints_its_figures():
  """bench/eval_metrics.py on small maps: ours agrees with scikit-learn (the script asserts
  it before timing) and the headline figures end the output."""
  bench = Path(__file__).resolve().parents[1] / "bench" / "eval_metrics.py"
  result = subprocess.run(
    [sys.executable, str(bench), "--num_maps=6", "--image_size=32", "--repeats=1"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  figures = dict(line.split("=") for line in result.stdout.splitlines() if "=" in line)
  assert float(figures["eval_metrics_speedup"]) > 0 and float(figures["aupro_seconds"]) > 0
  assert "| scikit-learn | pixel AUROC, AP, F1-max |" in result.stdout


def test_pod_sim_replaces_its_own_section_of_the_results_file(tmp_path):
  """bench/pod_sim.py's table goes into results.md without touching the other benchmarks'."""
  import pod_sim

  results = tmp_path / "results.md"
  results.write_text("# Benchmarks\n\n## Train step\n\nold table\n")
  pod_sim._write_section(results, f"{pod_sim.SECTION}\n\nfirst\n")
  pod_sim._write_section(results, f"{pod_sim.SECTION}\n\nsecond\n")
  assert results.read_text() == (
    f"# Benchmarks\n\n## Train step\n\nold table\n\n{pod_sim.SECTION}\n\nsecond\n"
  )
  results.write_text(f"# B\n\n{pod_sim.SECTION}\n\nold\n\n## Later\n\nkept\n")
  pod_sim._write_section(results, f"{pod_sim.SECTION}\n\nnew\n")
  assert results.read_text() == f"# B\n\n{pod_sim.SECTION}\n\nnew\n\n## Later\n\nkept\n"


def test_train_step_bench_times_the_model_of_a_stored_config():
  """bench/train_step.py's step serves pouta_vs_draem.py's train_step_ratio: POUTA's config
  gives POUTA's step (fewer FLOPs than DRAEM's at the same widths), and each run steps."""
  import json

  import train_step

  from pouta_jax import config as config_lib

  setting = train_step.Setting("test", base_width=8, image_size=32, batch_size=2, malloc_env=False)
  pouta = json.loads(config_lib.load("pouta").to_json_best_effort())
  steps = {
    "draem": train_step.jax_step(setting, "auto"),
    "pouta": train_step.jax_step(setting, "auto", pouta),
  }
  for run, facts in steps.values():
    run()
    assert facts["start_s"] > 0
  assert 0 < steps["pouta"][1]["flops"] < steps["draem"][1]["flops"]
