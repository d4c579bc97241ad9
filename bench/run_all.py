"""Every peer benchmark in one run: one table per benchmark, written to bench/results.md.

    make bench        (installs the bench extra into .venv, then runs this)
    .venv/bin/python bench/run_all.py [--quick]

The last lines printed are `name=value`, one per headline figure: train_step_speedup,
flop_utilisation, inference_speedup, synthesis_speedup, parity_max_abs_diff.
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import harness
import inference
import parity
import synthesis
import train_step
from absl import app, flags

HEADLINE = (
  "train_step_speedup",
  "flop_utilisation",
  "inference_speedup",
  "synthesis_speedup",
  "parity_max_abs_diff",
)

_QUICK = flags.DEFINE_bool(
  "quick",
  False,
  "Tiny settings only (minutes instead of ~15 on 2 "
  "CPU cores); the headline figures then describe them.",
)
_OUT = flags.DEFINE_string(
  "out", str(Path(__file__).with_name("results.md")), "Where the tables go."
)


def main(argv: list[str]) -> None:
  del argv
  harness.require_peer()
  quick = _QUICK.value
  reports = [
    train_step.run(["tiny"] if quick else ["headline", "tiny"], repeats=3 if quick else 5),
    inference.run(16 if quick else 128, 64 if quick else 256, repeats=3 if quick else 5),
    synthesis.run(256, 2, repeats=3),
    parity.run(16 if quick else 128, 64),
  ]
  figures = {name: value for report in reports for name, value in report.figures.items()}
  if quick:
    figures.setdefault("train_step_speedup", figures["train_step_speedup_tiny"])
    figures.setdefault("flop_utilisation", figures["flop_utilisation_tiny"])
  header = [
    f"# Benchmarks against anomalib ({'quick: tiny settings' if quick else 'full'})",
    "",
    f"{datetime.date.today().isoformat()}, {harness.machine()}.",
    "",
  ]
  text = "\n".join(header + [report.markdown() for report in reports])
  out = Path(_OUT.value)
  with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
    f.write(text)
  Path(f.name).replace(out)  # whole or not at all
  print(text)
  print(f"written to {out}")
  for name in HEADLINE:
    print(f"{name}={figures[name]:.4g}")


if __name__ == "__main__":
  app.run(main)
