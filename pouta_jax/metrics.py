"""Anomaly-detection metrics in plain numpy, exact (sort-based), ties handled as scikit-learn.

Equal scores form one threshold, so no result depends on the order of tied items; an AUROC tie
counts half, as in the Mann-Whitney U statistic. Nothing here knows of models or configs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _curve(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None):
  """Cumulative (positives, negatives) above each distinct threshold, highest threshold first.

  With `weights`, positives and negatives are summed weights instead of counts.
  """
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores).ravel()
  order = np.argsort(scores, kind="stable")[::-1]
  scores, labels = scores[order], labels[order]
  last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
  if weights is None:
    pos = np.cumsum(labels, dtype=np.float64)
    neg = np.arange(1, labels.size + 1, dtype=np.float64) - pos
  else:
    weights = np.asarray(weights, np.float64).ravel()[order]
    pos = np.cumsum(np.where(labels, weights, 0.0))
    neg = np.cumsum(np.where(labels, 0.0, weights))
  return pos[last_of_tie], neg[last_of_tie], scores[last_of_tie]


def _both_classes(labels: np.ndarray) -> bool:
  labels = np.asarray(labels).astype(bool)
  return bool(labels.any() and not labels.all())


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve; nan when only one class is present."""
  if not _both_classes(labels):
    return float("nan")
  tp, fp, _ = _curve(labels, scores)
  tpr, fpr = np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]
  return float(np.trapezoid(tpr, fpr))


def _precision_recall(labels: np.ndarray, scores: np.ndarray):
  tp, fp, thresholds = _curve(labels, scores)
  return tp / (tp + fp), tp / tp[-1], thresholds


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """Step-wise area under the precision-recall curve (scikit-learn's definition)."""
  if not _both_classes(labels):
    return float("nan")
  precision, recall, _ = _precision_recall(labels, scores)
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
  """The best F1 over all thresholds, and that threshold (predict positive at score >= it)."""
  if not _both_classes(labels):
    return float("nan"), float("nan")
  precision, recall, thresholds = _precision_recall(labels, scores)
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
  best = int(np.argmax(f1))
  return float(f1[best]), float(thresholds[best])


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
  """Normalised area under the per-region-overlap curve up to `max_fpr` (Bergmann et al.).

  Each 8-connected region of each ground-truth mask weighs equally in the mean overlap; the
  false-positive rate is over all defect-free pixels. Exact: every distinct score is a threshold.
  """
  masks = np.asarray(masks).astype(bool)
  maps = np.asarray(maps, np.float64)
  regions = np.zeros(masks.shape, np.int64)
  offset = 0
  for i, mask in enumerate(masks):
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    regions[i] = np.where(labelled > 0, labelled + offset, 0)
    offset += count
  num_normal = int((~masks).sum())
  if offset == 0 or num_normal == 0:
    return float("nan")
  region_sizes = np.bincount(regions.ravel(), minlength=offset + 1).astype(np.float64)
  weights = np.where(masks, 1.0 / (offset * region_sizes[regions]), 1.0 / num_normal)
  pro, fpr, _ = _curve(masks, maps, weights)
  fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
  # Cut the curve at max_fpr, interpolating the overlap there.
  end = int(np.searchsorted(fpr, max_fpr, side="right"))
  if end < fpr.size:
    pro_at_max = np.interp(max_fpr, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])
    fpr, pro = np.r_[fpr[:end], max_fpr], np.r_[pro[:end], pro_at_max]
  return float(np.trapezoid(pro, fpr) / max_fpr)


def category_metrics(
  labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray
) -> dict[str, float]:
  """All reported metrics of one category: image labels/scores, pixel masks/maps."""
  pixel_labels, pixel_scores = masks.ravel(), maps.ravel()
  return {
    "image_auroc": roc_auc(labels, scores),
    "pixel_auroc": roc_auc(pixel_labels, pixel_scores),
    "pixel_ap": average_precision(pixel_labels, pixel_scores),
    "aupro": aupro(masks, maps),
    "image_f1_max": f1_max(labels, scores)[0],
    "pixel_f1_max": f1_max(pixel_labels, pixel_scores)[0],
  }


def mean_over_categories(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
  names = next(iter(per_category.values())).keys()
  return {n: float(np.mean([m[n] for m in per_category.values()])) for n in names}
