import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
  average_precision_score,
  f1_score,
  precision_recall_curve,
  roc_auc_score,
)

from pouta_jax import metrics


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(300) < 0.3
  scores = np.round(rng.random(300) * 8) / 8 + 0.2 * labels  # many ties
  assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.average_precision(labels, scores) == pytest.approx(
    average_precision_score(labels, scores), abs=1e-12
  )
  p, r, _ = precision_recall_curve(labels, scores)
  f1 = np.max(2 * p * r / np.maximum(p + r, 1e-12))
  assert metrics.f1_max(labels, scores)[0] == pytest.approx(f1, abs=1e-12)


def test_results_do_not_depend_on_order_of_ties():
  labels = np.array([1, 0, 1, 0, 0, 1])
  scores = np.array([0.5, 0.5, 0.5, 0.1, 0.5, 0.9])
  perm = np.array([5, 4, 3, 2, 1, 0])
  for fn in (metrics.roc_auc, metrics.average_precision):
    assert fn(labels, scores) == fn(labels[perm], scores[perm])


@pytest.mark.parametrize("weight", [0.25, 3.0])
def test_weighted_f1_max_matches_sklearn_with_sample_weights(weight):
  rng = np.random.default_rng(7)
  labels = rng.random(120) < 0.7
  scores = np.round(rng.random(120) * 10) / 10 + 0.3 * labels
  f1, threshold = metrics.f1_max(labels, scores, positive_weight=weight)
  sample_weight = np.where(labels, weight, 1.0)
  best = max(f1_score(labels, scores >= t, sample_weight=sample_weight) for t in np.unique(scores))
  assert f1 == pytest.approx(best, abs=1e-12)
  assert f1_score(labels, scores >= threshold, sample_weight=sample_weight) == pytest.approx(f1)


def test_f1_max_threshold_reproduces_the_f1():
  labels = np.array([0, 0, 1, 1, 0, 1])
  scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
  f1, threshold = metrics.f1_max(labels, scores)
  pred = scores >= threshold
  tp = np.sum(pred & (labels == 1))
  assert f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()))


@pytest.mark.parametrize("seed", range(3))
def test_f1_at_a_fixed_threshold_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(200) < 0.3
  scores = np.round(rng.random(200) * 8) / 8 + 0.2 * labels  # many ties
  # At a score, between scores, below and above them all (nothing predicted positive: 0).
  for threshold in (*np.unique(scores)[::3], 0.4321, -1.0, 5.0):
    assert metrics.f1_at(labels, scores, threshold) == pytest.approx(
      f1_score(labels, scores >= threshold, zero_division=0.0), abs=1e-12
    )
  assert np.isnan(metrics.f1_at(np.zeros(4), np.arange(4), 1.0))


def test_single_class_gives_nan():
  assert np.isnan(metrics.roc_auc(np.zeros(4), np.arange(4)))
  assert np.isnan(metrics.average_precision(np.ones(4), np.arange(4)))


def _aupro_brute_force(masks, maps, max_fpr=0.3):
  """Every distinct score as a threshold; regions by scipy; the curve cut at max_fpr."""
  regions = []
  for i, m in enumerate(masks):
    lab, n = ndimage.label(m, structure=np.ones((3, 3)))
    regions += [(i, lab == k) for k in range(1, n + 1)]
  normal = ~masks
  points = [(0.0, 0.0)]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    fpr = (pred & normal).sum() / normal.sum()
    pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
    points.append((fpr, pro))
  fpr, pro = np.array(points).T
  keep = fpr <= max_fpr
  x, y = list(fpr[keep]), list(pro[keep])
  if not keep.all():
    j = np.argmax(~keep)
    x.append(max_fpr)
    y.append(np.interp(max_fpr, fpr[j - 1 : j + 1], pro[j - 1 : j + 1]))
  return np.trapezoid(y, x) / max_fpr


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  masks = np.zeros((3, 12, 12), bool)
  masks[0, 2:5, 2:6] = True
  masks[0, 8:11, 7:9] = True  # a second region in the same image
  masks[1, 5:7, 1:11] = True
  maps = np.round(rng.random(masks.shape) * 20) / 20 + 0.3 * masks  # ties on purpose
  assert metrics.aupro(masks, maps) == pytest.approx(_aupro_brute_force(masks, maps), abs=1e-9)


def test_aupro_weighs_regions_equally():
  masks = np.zeros((1, 10, 10), bool)
  masks[0, 0:6, 0:6] = True  # large region: found
  masks[0, 9, 9] = True  # one-pixel region: missed
  maps = np.where(masks, 0.0, 0.5)
  maps[0, 0:6, 0:6] = 1.0
  # Half the regions are found at FPR 0, the rest only at FPR 1: PRO = 0.5 up to 0.3.
  assert metrics.aupro(masks, maps) == pytest.approx(0.5)


def test_perfect_and_category_metrics():
  masks = np.zeros((4, 8, 8), bool)
  masks[2, 2:4, 2:4] = masks[3, 5:8, 0:2] = True
  maps = masks.astype(float)
  labels = np.array([0, 0, 1, 1])
  result = metrics.category_metrics(labels, maps.max(axis=(1, 2)), masks, maps)
  assert result == {k: pytest.approx(1.0) for k in result}
  mean = metrics.mean_over_categories({"a": result, "b": {k: 0.0 for k in result}})
  assert mean == {k: pytest.approx(0.5) for k in result}
  assert list(result) == list(metrics.METRIC_NAMES)

  # Without masks (an image-level dataset): the image metrics alone, the pixel ones None, and
  # a mean over categories that would mix the two kinds is None too.
  image_level = metrics.category_metrics(labels, np.array([0.1, 0.4, 0.3, 0.9]), None, maps)
  assert list(image_level) == list(metrics.METRIC_NAMES)
  assert image_level["image_auroc"] == pytest.approx(0.75)
  assert image_level["image_ap"] == pytest.approx(average_precision_score(labels, [1, 4, 3, 9]))
  pixel = ("pixel_auroc", "pixel_ap", "aupro", "pixel_f1_max")
  assert all(image_level[k] is None for k in pixel)
  mixed = metrics.mean_over_categories({"a": result, "b": image_level})
  assert mixed["image_auroc"] == pytest.approx(0.875) and mixed["pixel_ap"] is None


def test_curve_counts_each_distinct_score_once():
  rng = np.random.default_rng(0)
  labels = rng.random(500) < 0.2
  scores = (np.round(rng.random(500) * 30) / 30).astype(np.float32)  # float32, with ties
  c = metrics.curve(labels, scores)
  np.testing.assert_array_equal(c.thresholds, np.unique(scores)[::-1])
  for t, tp, fp in zip(c.thresholds, c.positives, c.negatives):
    assert (tp, fp) == (np.sum(labels & (scores >= t)), np.sum(~labels & (scores >= t)))
  assert (c.num_positive, c.num_negative) == (labels.sum(), (~labels).sum())


def test_pixel_metrics_from_one_shared_curve_match_sklearn():
  """At pixel scale (float32 maps, small defects, ties), within 1e-6 of scikit-learn; the
  metrics read from one shared curve equal those computed each on its own."""
  rng = np.random.default_rng(1)
  masks = np.zeros((12, 48, 48), bool)
  for i in range(6):
    y, x = rng.integers(0, 40, 2)
    masks[i, y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = True
  maps = (np.round(rng.random(masks.shape) * 500) / 500 + 0.4 * masks).astype(np.float32)
  labels = masks.any(axis=(1, 2))
  scores = maps.max(axis=(1, 2))
  flat_masks, flat_maps = masks.ravel(), maps.ravel()
  shared = metrics.category_metrics(
    labels, scores, masks, maps, (metrics.curve(labels, scores), metrics.curve(masks, maps))
  )
  assert shared == metrics.category_metrics(labels, scores, masks, maps)
  assert shared["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
  assert shared["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
  assert shared["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-6)
  assert shared["pixel_ap"] == pytest.approx(
    average_precision_score(flat_masks, flat_maps), abs=1e-6
  )
  p, r, _ = precision_recall_curve(flat_masks, flat_maps)
  assert shared["pixel_f1_max"] == pytest.approx(np.max(2 * p * r / (p + r + 1e-12)), abs=1e-6)
  assert shared["aupro"] == metrics.aupro(masks, maps)


def test_bad_scores_are_refused():
  with pytest.raises(ValueError, match="1 of 4 scores are NaN"):
    metrics.curve(np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.3, 0.2]))
  with pytest.raises(ValueError, match="3 labels but 2 scores"):
    metrics.curve(np.zeros(3), np.zeros(2))
