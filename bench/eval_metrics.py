"""Evaluation metrics at sweep scale: ours (one shared curve per category) against
scikit-learn, and, with the bench extra, anomalib's AUPRO.

    .venv/bin/python bench/eval_metrics.py [--num_maps=150] [--image_size=256] [--repeats=5]

Every contender scores the same maps: `num_maps` float32 anomaly maps, half with defects (a few
blobs each, scored higher than the smooth background noise, which they overlap). The pixel
metrics are AUROC, AP and F1-max: scikit-learn's roc_auc_score, average_precision_score and
precision_recall_curve against ours read from one `metrics.curve`. AUPRO is ours alone, and
anomalib's where installed. Values are checked to agree within 1e-6 before anything is timed.
Each contender runs in a process of its own, in turns (harness.interleaved).

Ends with `eval_metrics_speedup=<scikit-learn's seconds / ours>` (target >= 5) and
`aupro_seconds=<ours>` (target <= 2 on 2 cores).
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import harness
import numpy as np
from absl import app, flags
from scipy import ndimage

from pouta_jax import metrics

_NUM_MAPS = flags.DEFINE_integer("num_maps", 150, "Anomaly maps per category.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Side of each map.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed turns per contender.")


def make_maps(num_maps: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Ground-truth masks (N, H, W) bool and anomaly maps (N, H, W) float32, reproducibly."""
  rng = np.random.default_rng(0)
  noise = ndimage.gaussian_filter(rng.random((num_maps, size, size)), sigma=(0, 3, 3))
  masks = np.zeros((num_maps, size, size), bool)
  yy, xx = np.mgrid[:size, :size]
  for i in range(num_maps // 2):
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.integers(0, size, 2)
      ry, rx = rng.integers(2, size // 8, 2)
      masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  blurred = ndimage.gaussian_filter(masks.astype(np.float64), sigma=(0, 2, 2))
  return masks, (noise + 0.1 * blurred).astype(np.float32)


def pixel_metrics_ours(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float, float]:
  c = metrics.curve(masks, maps)
  return metrics.roc_auc(c), metrics.average_precision(c), metrics.f1_max(c)[0]


def pixel_metrics_sklearn(masks: np.ndarray, maps: np.ndarray) -> tuple[float, float, float]:
  from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

  labels, scores = masks.ravel(), maps.ravel()
  precision, recall, _ = precision_recall_curve(labels, scores)
  f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
  return roc_auc_score(labels, scores), average_precision_score(labels, scores), float(f1)


def aupro_anomalib(masks: np.ndarray, maps: np.ndarray) -> float:
  import torch
  from anomalib.metrics.aupro import _AUPRO

  metric = _AUPRO(fpr_limit=0.3)
  metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
  return float(metric.compute())


def contender(name: str, num_maps: int, size: int) -> tuple[Callable[[], None], dict]:
  fn = {
    "ours": pixel_metrics_ours,
    "scikit-learn": pixel_metrics_sklearn,
    "aupro ours": metrics.aupro,
    "aupro anomalib": aupro_anomalib,
  }[name]
  masks, maps = make_maps(num_maps, size)

  def run() -> None:  # timed whole
    fn(masks, maps)

  return run, {"value": fn(masks, maps)}


def main(argv: list[str]) -> None:
  del argv
  num_maps, size = _NUM_MAPS.value, _IMAGE_SIZE.value
  names = ["ours", "scikit-learn", "aupro ours"]
  if importlib.util.find_spec("anomalib") is not None:
    names.append("aupro anomalib")
  times = harness.interleaved({n: (contender, (n, num_maps, size)) for n in names}, _REPEATS.value)
  values = {n: facts["value"] for n, (_, facts) in times.items()}
  np.testing.assert_allclose(values["ours"], values["scikit-learn"], atol=1e-6, rtol=0)
  seconds = {n: t for n, (t, _) in times.items()}
  lines = [
    f"Machine: {harness.machine()}",
    "",
    f"{num_maps} maps of {size}x{size} (float32, half with defects), median of "
    f"{_REPEATS.value} turns.",
    "",
    "| contender | what | seconds | value |",
    "|---|---|---|---|",
    *(
      f"| {n} | {'AUPRO' if n.startswith('aupro') else 'pixel AUROC, AP, F1-max'} "
      f"| {seconds[n]:.3f} | {np.round(values[n], 6).tolist()} |"
      for n in names
    ),
  ]
  figures = {
    "eval_metrics_speedup": seconds["scikit-learn"] / seconds["ours"],
    "aupro_seconds": seconds["aupro ours"],
  }
  if "aupro anomalib" in seconds:
    figures["aupro_speedup_anomalib"] = seconds["aupro anomalib"] / seconds["aupro ours"]
  harness.Report("Evaluation metrics at sweep scale", lines, figures).show()


if __name__ == "__main__":
  app.run(main)
