"""Anomaly-detection metrics in plain numpy, exact, ties handled as scikit-learn.

Every threshold metric reads one `Curve`: the positives and negatives at or above each distinct
score. It is built from one sort of the scores (values only; an index sort of the positives
alone, which are few among pixels), so one category's pixel AUROC, AP, F1-max and AUPRO share
it. Equal scores form one threshold, so no result depends on the order of tied items; an AUROC
tie counts half, as in the Mann-Whitney U statistic. Nothing here knows of models or configs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class Curve:
  """Counts at or above each distinct score, highest score first.

  `positive_order` sorts the positive items by score (ascending) and `positives_below` says,
  per threshold, how many of them score below it: with these, any weighting of the positives
  (AUPRO's per-region weights) is one cumulative sum, without sorting again.
  """

  thresholds: np.ndarray
  positives: np.ndarray  # int64: positive items scoring >= the threshold (true positives)
  negatives: np.ndarray  # int64: negative items scoring >= the threshold (false positives)
  positive_order: np.ndarray
  positives_below: np.ndarray

  @property
  def num_positive(self) -> int:
    return int(self.positives[-1])

  @property
  def num_negative(self) -> int:
    return int(self.negatives[-1])

  @property
  def has_both_classes(self) -> bool:
    return self.num_positive > 0 and self.num_negative > 0


def curve(labels: np.ndarray, scores: np.ndarray) -> Curve:
  """The `Curve` of binary `labels` and their `scores` (any shape, flattened alike)."""
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores).ravel()
  if labels.size != scores.size:
    raise ValueError(f"{labels.size} labels but {scores.size} scores")
  if labels.size == 0:
    raise ValueError("no scores to evaluate")
  ascending = np.sort(scores)
  if np.isnan(ascending[-1]):  # sorted last: one look instead of a pass over the scores
    raise ValueError(f"{int(np.isnan(ascending).sum())} of {scores.size} scores are NaN")
  starts = np.flatnonzero(np.r_[True, ascending[1:] != ascending[:-1]])
  positive_scores = scores[labels]
  positive_order = np.argsort(positive_scores)
  below = np.searchsorted(positive_scores[positive_order], ascending[starts], side="left")
  at_or_above = scores.size - starts
  positives = positive_scores.size - below
  return Curve(
    thresholds=ascending[starts][::-1],
    positives=positives[::-1],
    negatives=(at_or_above - positives)[::-1],
    positive_order=positive_order,
    positives_below=below[::-1],
  )


def _as_curve(labels_or_curve, scores) -> Curve:
  return labels_or_curve if isinstance(labels_or_curve, Curve) else curve(labels_or_curve, scores)


def roc_auc(labels: np.ndarray | Curve, scores: np.ndarray | None = None) -> float:
  """Area under the ROC curve; nan when only one class is present. Takes labels and scores, or
  their `Curve` (so do the other threshold metrics)."""
  c = _as_curve(labels, scores)
  if not c.has_both_classes:
    return float("nan")
  fpr, tpr = roc_points(c)
  return float(np.trapezoid(tpr, fpr))


def roc_points(c: Curve) -> tuple[np.ndarray, np.ndarray]:
  """False and true positive rates from (0, 0), one point per threshold; needs both classes."""
  return np.r_[0.0, c.negatives / c.num_negative], np.r_[0.0, c.positives / c.num_positive]


def _precision_recall(c: Curve, positive_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """Per threshold; `positive_weight`: each positive item counts this many times."""
  weighted = positive_weight * c.positives
  return weighted / (weighted + c.negatives), c.positives / c.num_positive


def pr_points(c: Curve) -> tuple[np.ndarray, np.ndarray]:
  """Recall and precision, one point per threshold; needs both classes."""
  precision, recall = _precision_recall(c)
  return recall, precision


def average_precision(labels: np.ndarray | Curve, scores: np.ndarray | None = None) -> float:
  """Step-wise area under the precision-recall curve (scikit-learn's definition)."""
  c = _as_curve(labels, scores)
  if not c.has_both_classes:
    return float("nan")
  precision, recall = _precision_recall(c)
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(
  labels: np.ndarray | Curve, scores: np.ndarray | None = None, positive_weight: float = 1.0
) -> tuple[float, float]:
  """The best F1 over all thresholds, and that threshold (predict positive at score >= it).
  `positive_weight`: each positive item counts this many times (scikit-learn's sample_weight),
  e.g. negatives / positives to weigh both classes alike."""
  c = _as_curve(labels, scores)
  if not c.has_both_classes:
    return float("nan"), float("nan")
  precision, recall = _precision_recall(c, positive_weight)
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
  best = int(np.argmax(f1))
  return float(f1[best]), float(c.thresholds[best])


def f1_at(labels: np.ndarray | Curve, scores: np.ndarray | None, threshold: float) -> float:
  """F1 of predicting positive at score >= `threshold`: a fixed threshold's result (one chosen
  on validation data, applied to the test set), beside f1_max's best case. nan without
  positives; 0 where nothing scores at or above it."""
  c = _as_curve(labels, scores)
  if c.num_positive == 0:
    return float("nan")
  at_or_above = int(np.searchsorted(-c.thresholds, -threshold, side="right"))
  if at_or_above == 0:
    return 0.0
  tp, fp = c.positives[at_or_above - 1], c.negatives[at_or_above - 1]
  return float(2 * tp / (tp + fp + c.num_positive))


def aupro(
  masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, pixel_curve: Curve | None = None
) -> float:
  """Normalised area under the per-region-overlap curve up to `max_fpr` (Bergmann et al.).

  Each 8-connected region of each ground-truth mask weighs equally in the mean overlap; the
  false-positive rate is over all defect-free pixels. Exact: every distinct score is a threshold.
  `pixel_curve`: `curve(masks, maps)`, when the caller has it already.
  """
  masks = np.asarray(masks).astype(bool)
  c = curve(masks, maps) if pixel_curve is None else pixel_curve
  regions = np.zeros(masks.shape, np.int64)
  offset = 0
  for i, mask in enumerate(masks):
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    regions[i] = np.where(labelled > 0, labelled + offset, 0)
    offset += count
  if offset == 0 or c.num_negative == 0:
    return float("nan")
  region_of_positive = regions[masks]  # the same order as the curve's positive items
  region_sizes = np.bincount(region_of_positive, minlength=offset + 1).astype(np.float64)
  weights = 1.0 / (offset * region_sizes[region_of_positive])
  weight_below = np.r_[0.0, np.cumsum(weights[c.positive_order])]
  pro = np.r_[0.0, weight_below[-1] - weight_below[c.positives_below]]
  fpr = np.r_[0.0, c.negatives / c.num_negative]
  # Cut the curve at max_fpr, interpolating the overlap there.
  end = int(np.searchsorted(fpr, max_fpr, side="right"))
  if end < fpr.size:
    pro_at_max = np.interp(max_fpr, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])
    fpr, pro = np.r_[fpr[:end], max_fpr], np.r_[pro[:end], pro_at_max]
  return float(np.trapezoid(pro, fpr) / max_fpr)


# What `category_metrics` reports, in the results tables' order; higher is better for each.
METRIC_NAMES = (
  "image_auroc",
  "image_ap",
  "pixel_auroc",
  "pixel_ap",
  "aupro",
  "image_f1_max",
  "pixel_f1_max",
)


# Test F1 at the thresholds chosen on the validation set (data.val_fraction): what a deployment
# gets, beside the test set's own F1-max (an oracle). Only runs with a validation set have them.
AT_VALIDATION_THRESHOLDS = ("image_f1_at_val_thr", "pixel_f1_at_val_thr")


def category_metrics(
  labels: np.ndarray,
  scores: np.ndarray,
  masks: np.ndarray | None,
  maps: np.ndarray,
  curves: tuple[Curve, Curve | None] | None = None,
) -> dict[str, float | None]:
  """All reported metrics of one category: image labels/scores, pixel masks/maps. `curves`:
  the (image, pixel) `Curve`s, when the caller has them already. Without `masks` (an
  image-level dataset) the pixel metrics are None."""
  if masks is None:
    image = curves[0] if curves else curve(labels, scores)
    found = {
      "image_auroc": roc_auc(image),
      "image_ap": average_precision(image),
      "image_f1_max": f1_max(image)[0],
    }
    return {name: found.get(name) for name in METRIC_NAMES}
  image, pixel = curves or (curve(labels, scores), curve(masks, maps))
  return {
    "image_auroc": roc_auc(image),
    "image_ap": average_precision(image),
    "pixel_auroc": roc_auc(pixel),
    "pixel_ap": average_precision(pixel),
    "aupro": aupro(masks, maps, pixel_curve=pixel),
    "image_f1_max": f1_max(image)[0],
    "pixel_f1_max": f1_max(pixel)[0],
  }


def mean_over_categories(per_category: dict[str, dict[str, float | None]]) -> dict:
  """Each metric's mean over the categories; None where any category lacks it (pixel metrics
  of an image-level dataset): a mean over some categories would not compare with others'."""
  names = next(iter(per_category.values())).keys()
  values = {n: [m[n] for m in per_category.values()] for n in names}
  return {n: None if None in v else float(np.mean(v)) for n, v in values.items()}
