"""Outputs: scalar logs, results tables and heatmap panels (experiment.write_results puts the
tables and metrics.json together).

Every file is written to a temporary name and renamed into place (`files.write_atomic`), so a
crash never leaves a half-written results file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from typing import Iterator

import numpy as np
import tensorboardX.record_writer
from etils.epath import Path
from PIL import Image, ImageDraw
from tensorboardX import SummaryWriter

from pouta_jax import errors, files, metrics

# Panels of small test images are enlarged (nearest neighbour) to at least this height.
MIN_PANEL_HEIGHT = 256
METRIC_COLUMNS = metrics.METRIC_NAMES


# Scalars of the validation set (train.py: `val/<metric>`).
VALIDATION_PREFIX = "val/"


class _ObjectEventsFactory:
  """TensorBoard event files on an object store, through epath like every other output
  (tensorboardX's own gs:// writer needs google-cloud-storage): uploaded whole at each of
  tensorboardX's flushes."""

  def open(self, path: str) -> files.ObjectLog:
    return files.ObjectLog(path, interval_s=None)

  def directory_check(self, path: str) -> None:
    pass  # object stores have no folders to create


for _scheme in files.URL_SCHEMES:
  tensorboardX.record_writer.register_writer_factory(_scheme, _ObjectEventsFactory())


class _Events:
  """An event file's bytes, kept until the writer is closed (tensorboardX closes its files)."""

  def __init__(self):
    self.content = bytearray()

  def write(self, data: bytes) -> None:
    self.content += data

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class _MemoryEventsFactory:
  """TensorBoard event files written to memory (`MEMORY_SCHEME://<real path>`) by tensorboardX's
  writer thread, which cannot report a full disk (it would die with a traceback and leave a
  truncated file): `write_events` puts each on disk whole, from the calling thread."""

  def __init__(self):
    self.files: dict[str, _Events] = {}

  def open(self, path: str) -> _Events:
    return self.files.setdefault(path, _Events())

  def directory_check(self, path: str) -> None:
    pass


MEMORY_SCHEME = "pouta-jax-memory"
_MEMORY_EVENTS = _MemoryEventsFactory()
tensorboardX.record_writer.register_writer_factory(MEMORY_SCHEME, _MEMORY_EVENTS)


@contextlib.contextmanager
def events_written_whole(logdir: str | Path) -> Iterator[SummaryWriter]:
  """A SummaryWriter whose event files reach `logdir` whole when the block ends, or not at all
  (a DiskFullError from `files.write_atomic`, naming the file)."""
  prefix = f"{MEMORY_SCHEME}://"
  writer = SummaryWriter(prefix + os.fspath(logdir))
  try:
    yield writer
  finally:
    writer.close()
    written = [p for p in _MEMORY_EVENTS.files if p.startswith(prefix + os.fspath(logdir))]
    contents = {p[len(prefix) :]: _MEMORY_EVENTS.files.pop(p).content for p in written}
  for path, content in contents.items():
    files.write_atomic(path, bytes(content))


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
    self._jsonl = files.AppendLog(path, _records_until(path, start_step))
    # TensorBoard discards earlier events from purge_step on.
    self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=start_step + 1)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    try:
      self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    except OSError as e:
      if errors.is_disk_full(e):
        raise errors.DiskFullError(
          f"{self._jsonl.name}: disk full while logging step {step}; training stopped, the "
          f"newest checkpoint is intact"
        ) from None
      raise
    for name, value in scalars.items():  # validation metrics in their own section
      tag = name if name.startswith(VALIDATION_PREFIX) else f"train/{name}"
      self._tensorboard.add_scalar(tag, value, step)

  def flush(self) -> None:
    self._jsonl.flush()
    self._tensorboard.flush()

  def close(self) -> None:
    self._jsonl.close()
    self._tensorboard.close()


def _fmt(value: float | None) -> str:
  if value is None:
    return "n/a"  # a pixel metric of an image-level dataset
  return "–" if math.isnan(value) else f"{100 * value:.1f}"


SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")
# Why a category has no pixel metrics (metrics.json `notes`, results.md).
IMAGE_LEVEL_REASON = (
  "pixel metrics of a category whose defect images have no ground-truth masks (an image-level "
  "dataset: image metrics only)"
)


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
  # The discriminative part's FLOPs where a model splits them (DRAEM, POUTA: evaluate.profile).
  parts = any("flops" in p for p in profiles.values() if p)
  lines = [
    "| model | "
    + " | ".join(f"params {label}" for _, label in groups)
    + (" | GFLOPs discr." if parts else "")
    + " | GFLOPs / image | latency (ms) | "
    + " | ".join(f"mean {m}" for m in SUMMARY_METRICS)
    + " |",
    "|---" * (3 + len(groups) + parts + len(SUMMARY_METRICS)) + "|",
  ]
  for model, per_category in results.items():
    profile = profiles.get(model)
    if profile:
      p = profile["params"]
      cost = [f"{p[g] / 1e6:.3f}M" if g in p else "–" for g, _ in groups]
      if parts:
        flops = profile.get("flops")
        cost.append(f"{flops['discriminative'] / 1e9:.3f}" if flops else "–")
      cost += [f"{profile['flops_per_image'] / 1e9:.3f}", f"{profile['latency_ms']:.2f}"]
    else:
      cost = ["–"] * (len(groups) + parts + 2)
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
  if any(v is None for r in results.values() for m in r.values() for v in m.values()):
    lines += [f"n/a: {IMAGE_LEVEL_REASON}.", ""]
  categories = list(next(iter(results.values())).keys())
  present = {m for r in results.values() for c in r.values() for m in c}
  for metric in METRIC_COLUMNS + tuple(m for m in metrics.AT_VALIDATION_THRESHOLDS if m in present):
    lines += [
      f"**{metric}** (%)",
      "",
      "| model | " + " | ".join(categories) + " |",
      "|---" * (len(categories) + 1) + "|",
    ]
    for model, per_category in results.items():
      lines.append(
        f"| {model} | "
        + " | ".join(_fmt(per_category.get(c, {}).get(metric, math.nan)) for c in categories)
        + " |"
      )
    lines.append("")
  return "\n".join(lines)


DEFECT_METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro")


def defect_table(by_defect: dict[str, dict[str, dict[str, dict[str, float]]]]) -> str:
  """Markdown: a row per model, category and defect type, a column per summary metric (each
  type's images against all good ones); "" without any. `by_defect`: model -> category ->
  defect type -> metric -> value (evaluate.defect_metrics)."""
  rows = [
    f"| {model} | {category} | {defect} | "
    + " | ".join(_fmt(values.get(m)) for m in DEFECT_METRICS)
    + " |"
    for model, per_category in by_defect.items()
    for category, per_defect in per_category.items()
    for defect, values in per_defect.items()
  ]
  if not rows:
    return ""
  header = "| model | category | defect type | " + " | ".join(DEFECT_METRICS) + " |"
  lines = ["", "**Per defect type** (%, its images and every good one)", "", header]
  return "\n".join(lines + ["|---" * (3 + len(DEFECT_METRICS)) + "|", *rows, ""])


def colormap(values: np.ndarray) -> np.ndarray:
  """A perceptually ordered dark-blue -> red -> yellow map of values in [0, 1] (uint8 RGB)."""
  anchors = np.array([[0, 0, 0.3], [0.3, 0, 0.6], [0.85, 0.1, 0.3], [1, 0.6, 0], [1, 1, 0.6]])
  grid = np.linspace(0, 1, len(anchors))
  v = np.clip(values, 0, 1)
  rgb = np.stack([np.interp(v, grid, anchors[:, c]) for c in range(3)], axis=-1)
  return np.round(255 * rgb).astype(np.uint8)


def map_max(error_weight: float) -> float:
  """The top of an anomaly map's range: a probability plus `error_weight` (eval.error_weight)
  times the reconstruction error of images in [0, 1]."""
  return 1.0 + error_weight


def overlaid(image: np.ndarray, anomaly_map: np.ndarray) -> np.ndarray:
  """The anomaly map's colours blended half and half over the uint8 RGB image."""
  return np.round(0.5 * np.asarray(image, np.float32) + 0.5 * colormap(anomaly_map)).astype(
    np.uint8
  )


def heatmap_panel(
  image: np.ndarray,
  mask: np.ndarray,
  anomaly_map: np.ndarray,
  threshold: float,
  map_max: float = 1.0,
) -> np.ndarray:
  """image | ground truth | anomaly map over the image | map >= threshold, side by side; the
  colours span [0, map_max] (1 + eval.error_weight)."""
  gray = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)
  overlay = overlaid(image, anomaly_map / map_max)
  predicted = np.repeat((anomaly_map >= threshold)[..., None].astype(np.uint8) * 255, 3, -1)
  gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
  return np.concatenate([image, gap, gray, gap, overlay, gap, predicted], axis=1)


def heatmap_panels(
  test_set: dict, maps: np.ndarray, threshold: float, count: int, map_max: float = 1.0
) -> dict[str, np.ndarray]:
  """`heatmap_panel`s of up to `count` test images (-1: all of them) by `<defect>_<name>`,
  defective ones first, small ones enlarged to MIN_PANEL_HEIGHT."""
  # Defective first, grouped by defect type; stepping through spreads the picks over the types.
  order = np.lexsort((test_set["defect"], -test_set["label"]))
  count = len(order) if count == -1 else count
  step = max(1, len(order) // max(count, 1))
  panels = {}
  for i in order[::step][:count]:
    panel = heatmap_panel(test_set["image"][i], test_set["mask"][i], maps[i], threshold, map_max)
    scale = max(1, MIN_PANEL_HEIGHT // panel.shape[0])
    panels[str(test_set["name"][i]).replace("/", "_")] = np.repeat(
      np.repeat(panel, scale, axis=0), scale, axis=1
    )
  return panels


def write_heatmaps(folder: str | Path, panels: dict[str, np.ndarray]) -> list[Path]:
  """`heatmap_panels` as `<defect>_<name>.png` files."""
  written = []
  for name, panel in panels.items():
    path = Path(folder) / f"{name}.png"
    files.write_atomic(path, png_bytes(Image.fromarray(panel)))
    written.append(path)
  return written


# Heatmap panels shown in TensorBoard (all of them stay in the run's heatmaps/ folder).
TENSORBOARD_PANELS = 4


def write_evaluation_to_tensorboard(
  workdir: str | Path, step: int, metrics: dict[str, float], panels: dict[str, np.ndarray]
) -> None:
  """The test metrics (`eval/<metric>`) and the first TENSORBOARD_PANELS heatmap panels
  (`eval/heatmaps/<name>`) at `step`, beside the training scalars in `workdir/tensorboard`."""
  with events_written_whole(Path(workdir) / "tensorboard") as writer:
    for name, value in metrics.items():
      if value is not None:  # pixel metrics of an image-level dataset
        writer.add_scalar(f"eval/{name}", value, step)
    for name, panel in list(panels.items())[:TENSORBOARD_PANELS]:
      writer.add_image(f"eval/heatmaps/{name}", panel, step, dataformats="HWC")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table's lines: the header, its rule and the rows."""
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  return lines + ["| " + " | ".join(row) + " |" for row in rows]


def csv_text(rows: list[list]) -> str:
  out = io.StringIO()
  csv.writer(out, lineterminator="\n").writerows(rows)
  return out.getvalue()


PLOT_SIZE, PLOT_MARGIN = 360, 40
IMAGE_COLOR, PIXEL_COLOR = (40, 90, 200), (220, 60, 40)  # also good / defective in histograms


def _axes(title: str, xlabel: str, ylabel: str, xrange: tuple[float, float]) -> tuple:
  """A white canvas with a framed plot area; returns (image, draw, x_to_px, y_to_px)."""
  image = Image.new("RGB", (PLOT_SIZE, PLOT_SIZE), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  low, high, span = PLOT_MARGIN, PLOT_SIZE - PLOT_MARGIN // 2, PLOT_SIZE - 1.5 * PLOT_MARGIN
  draw.rectangle((low, PLOT_MARGIN // 2, high, PLOT_SIZE - PLOT_MARGIN), outline=(0, 0, 0))
  draw.text((low, 4), title, fill=(0, 0, 0))
  draw.text((low, PLOT_SIZE - PLOT_MARGIN + 16), xlabel, fill=(0, 0, 0))
  draw.text((4, PLOT_MARGIN // 2), ylabel[:6], fill=(0, 0, 0))
  x0, x1 = xrange
  draw.text((low, PLOT_SIZE - PLOT_MARGIN + 2), f"{x0:.3g}", fill=(0, 0, 0))
  draw.text((high - 24, PLOT_SIZE - PLOT_MARGIN + 2), f"{x1:.3g}", fill=(0, 0, 0))

  def x_px(x):
    return low + (np.asarray(x) - x0) / max(x1 - x0, 1e-12) * span

  def y_px(y):
    return PLOT_SIZE - PLOT_MARGIN - np.asarray(y) * span

  return image, draw, x_px, y_px


def _legend(draw, labels: list[tuple[str, tuple]]) -> None:
  for i, (label, color) in enumerate(labels):
    y = PLOT_MARGIN // 2 + 6 + 12 * i
    draw.text((PLOT_SIZE - 150, y), label, fill=color)


def curve_png(
  title: str, xlabel: str, ylabel: str, series: list[tuple[str, tuple, np.ndarray, np.ndarray]]
) -> bytes:
  """Line plots of (label, RGB, x, y) series on [0, 1] x [0, 1] (at most 4000 points each)."""
  image, draw, x_px, y_px = _axes(title, xlabel, ylabel, (0.0, 1.0))
  for _, color, x, y in series:
    keep = np.unique(np.linspace(0, len(x) - 1, min(len(x), 4000)).astype(int))
    points = list(zip(x_px(x[keep]).tolist(), y_px(y[keep]).tolist()))
    draw.line(points, fill=color, width=2)
  _legend(draw, [(label, color) for label, color, _, _ in series])
  return png_bytes(image)


def histogram_png(title: str, good: np.ndarray, defective: np.ndarray, bins: int = 30) -> bytes:
  """Image scores of good and defective test images as outlined histograms, each scaled to its
  own largest bin (so a small class stays visible)."""
  scores = np.r_[good, defective]
  edges = np.linspace(scores.min(), max(scores.max(), scores.min() + 1e-6), bins + 1)
  image, draw, x_px, y_px = _axes(title, "image score", "share", (edges[0], edges[-1]))
  for values, color in ((good, IMAGE_COLOR), (defective, PIXEL_COLOR)):
    if len(values):
      counts = np.histogram(values, edges)[0]
      heights = counts / counts.max()
      xs = np.repeat(edges, 2)[1:-1]
      points = list(zip(x_px(xs).tolist(), y_px(np.repeat(heights, 2)).tolist()))
      draw.line(points, fill=color, width=2)
  _legend(
    draw, [(f"good ({len(good)})", IMAGE_COLOR), (f"defective ({len(defective)})", PIXEL_COLOR)]
  )
  return png_bytes(image)


def write_curves(folder: str | Path, curves: dict, scores: np.ndarray, labels: np.ndarray) -> None:
  """roc.png and pr.png (image and pixel level: each where it has both classes) and scores.png
  (the image-score histogram)."""
  folder = Path(folder)
  levels = [(kind, c) for kind, c in curves.items() if c is not None and c.has_both_classes]
  colors = {"image": IMAGE_COLOR, "pixel": PIXEL_COLOR}
  if levels:
    roc = [(kind, colors[kind], *metrics.roc_points(c)) for kind, c in levels]
    pr = [(kind, colors[kind], *metrics.pr_points(c)) for kind, c in levels]
    files.write_atomic(folder / "roc.png", curve_png("ROC", "false positive rate", "TPR", roc))
    files.write_atomic(folder / "pr.png", curve_png("precision-recall", "recall", "prec.", pr))
  good, defective = scores[labels == 0], scores[labels == 1]
  files.write_atomic(folder / "scores.png", histogram_png("image scores", good, defective))


def png_bytes(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()
