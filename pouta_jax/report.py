"""Outputs: scalar logs, results tables and heatmap panels (experiment.write_results puts the
tables and metrics.json together).

Every file is written to a temporary name and renamed into place (`files.write_atomic`), so a
crash never leaves a half-written results file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from pouta_jax import errors, files

# Panels of small test images are enlarged (nearest neighbour) to at least this height.
MIN_PANEL_HEIGHT = 256
METRIC_COLUMNS = (
  "image_auroc",
  "image_ap",
  "pixel_auroc",
  "pixel_ap",
  "aupro",
  "image_f1_max",
  "pixel_f1_max",
)


def _records_until(path: Path, step: int) -> str:
  """The lines of a scalars.jsonl up to `step`; a line cut short by a crash is dropped."""
  kept = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and record.get("step", step + 1) <= step:
      kept.append(line + "\n")
  return "".join(kept)


class ScalarWriter:
  """Training scalars as `scalars.jsonl` (one JSON object per line) and TensorBoard events.

  A run that starts at `start_step` (resumed from a checkpoint, or 0) first drops what an
  earlier attempt logged after that step, in both, so the curves of a resumed run are those of
  an uninterrupted one.
  """

  def __init__(self, workdir: str | Path, start_step: int = 0):
    path = Path(workdir) / "scalars.jsonl"
    files.write_atomic(path, _records_until(path, start_step))
    self._jsonl = open(path, "a")
    # TensorBoard discards earlier events from purge_step on.
    self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    try:
      self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
      self._jsonl.flush()
    except OSError as e:
      if errors.is_disk_full(e):
        raise errors.DiskFullError(
          f"{self._jsonl.name}: disk full while logging step {step}; training stopped, the "
          f"newest checkpoint is intact"
        ) from None
      raise
    for name, value in scalars.items():
      self._tensorboard.add_scalar(f"train/{name}", value, step)

  def close(self) -> None:
    self._jsonl.close()
    self._tensorboard.close()


def _fmt(value: float) -> str:
  return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


# Parameter groups of the summary, in this order where any model has them (evaluate.profile).
PARAM_GROUPS = (
  ("reconstructive", "recon."),
  ("backbone", "backbone"),
  ("discriminative", "discr."),
  ("total", "total"),
)


def _summary(results: dict, profiles: dict) -> list[str]:
  """One row per model: size, cost and the mean of the main metrics."""
  present = {g for p in profiles.values() if p for g in p["params"]}
  groups = [(g, label) for g, label in PARAM_GROUPS if g in present] or [("total", "total")]
  lines = [
    "| model | "
    + " | ".join(f"params {label}" for _, label in groups)
    + " | GFLOPs / image | latency (ms) | "
    + " | ".join(f"mean {m}" for m in SUMMARY_METRICS)
    + " |",
    "|---" * (3 + len(groups) + len(SUMMARY_METRICS)) + "|",
  ]
  for model, per_category in results.items():
    profile = profiles.get(model)
    if profile:
      p = profile["params"]
      cost = [f"{p[g] / 1e6:.3f}M" if g in p else "–" for g, _ in groups]
      cost += [f"{profile['flops_per_image'] / 1e9:.3f}", f"{profile['latency_ms']:.2f}"]
    else:
      cost = ["–"] * (len(groups) + 2)
    means = [_fmt(per_category["mean"][m]) for m in SUMMARY_METRICS]
    lines.append(f"| {model} | " + " | ".join(cost + means) + " |")
  return lines + [""]


def results_table(
  results: dict[str, dict[str, dict[str, float]]], profiles: dict, caption: str = ""
) -> str:
  """Markdown: a summary row per model, then per metric a row per model and a column per
  category and the mean. `results`: model -> category (and "mean") -> metric -> value;
  `profiles`: model -> `evaluate.profile` output (models without one show dashes).
  """
  lines = [caption, ""] if caption else []
  lines += _summary(results, profiles)
  categories = list(next(iter(results.values())).keys())
  for metric in METRIC_COLUMNS:
    lines += [
      f"**{metric}** (%)",
      "",
      "| model | " + " | ".join(categories) + " |",
      "|---" * (len(categories) + 1) + "|",
    ]
    for model, per_category in results.items():
      lines.append(
        f"| {model} | "
        + " | ".join(_fmt(per_category.get(c, {}).get(metric)) for c in categories)
        + " |"
      )
    lines.append("")
  return "\n".join(lines)


def colormap(values: np.ndarray) -> np.ndarray:
  """A perceptually ordered dark-blue -> red -> yellow map of values in [0, 1] (uint8 RGB)."""
  anchors = np.array([[0, 0, 0.3], [0.3, 0, 0.6], [0.85, 0.1, 0.3], [1, 0.6, 0], [1, 1, 0.6]])
  grid = np.linspace(0, 1, len(anchors))
  v = np.clip(values, 0, 1)
  rgb = np.stack([np.interp(v, grid, anchors[:, c]) for c in range(3)], axis=-1)
  return np.round(255 * rgb).astype(np.uint8)


def heatmap_panel(
  image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray, threshold: float
) -> np.ndarray:
  """image | ground truth | anomaly map over the image | map >= threshold, side by side."""
  gray = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
  overlay = np.round(0.5 * image + 0.5 * colormap(anomaly_map)).astype(np.uint8)
  predicted = np.repeat((anomaly_map >= threshold)[..., None].astype(np.uint8) * 255, 3, -1)
  gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
  return np.concatenate([image, gap, gray, gap, overlay, gap, predicted], axis=1)


def write_heatmaps(
  folder: str | Path, test_set: dict, maps: np.ndarray, threshold: float, count: int
) -> list[Path]:
  """Panels of up to `count` test images, defective ones first, as `<defect>_<name>.png`."""
  # Defective first, grouped by defect type; stepping through spreads the picks over the types.
  order = np.lexsort((test_set["defect"], -test_set["label"]))
  step = max(1, len(order) // max(count, 1))
  written = []
  for i in order[::step][:count]:
    panel = heatmap_panel(test_set["image"][i], test_set["mask"][i], maps[i], threshold)
    scale = max(1, MIN_PANEL_HEIGHT // panel.shape[0])
    panel = np.repeat(np.repeat(panel, scale, axis=0), scale, axis=1)
    path = Path(folder) / (str(test_set["name"][i]).replace("/", "_") + ".png")
    files.write_atomic(path, _png_bytes(panel))
    written.append(path)
  return written


def csv_text(rows: list[list]) -> str:
  out = io.StringIO()
  csv.writer(out, lineterminator="\n").writerows(rows)
  return out.getvalue()


def _png_bytes(array: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()
