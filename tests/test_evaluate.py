import numpy as np
import optax
import pytest
from scipy import ndimage

from pouta_jax import evaluate, metrics, train
from pouta_jax.errors import DivergedError
from pouta_jax.models.draem import DRAEM


def test_mean_filter_max_matches_zero_padded_uniform_filter():
  maps = np.random.default_rng(0).random((3, 20, 17)).astype(np.float32)
  maps[1, 0, 0] = 50.0  # a corner peak: zero padding must dilute it
  got = np.asarray(evaluate.mean_filter_max(maps, 5))
  want = [ndimage.uniform_filter(m, 5, mode="constant", cval=0.0).max() for m in maps]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_predict_pads_the_last_batch_and_matches_direct_apply():
  model = DRAEM(4)
  state = train.fresh_state(model, optax.adam(1e-3), 32, 0)
  images = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype(np.uint8)
  predict_fn = evaluate.model_predict_fn(model, state.variables, filter_size=3)
  maps, scores = evaluate.predict(predict_fn, images, batch_size=4)
  direct = model.apply(state.variables, images.astype(np.float32) / 255.0, train=False)
  assert maps.shape == (5, 32, 32) and scores.shape == (5,)
  np.testing.assert_allclose(maps, direct["anomaly_map"], atol=1e-5)
  np.testing.assert_allclose(scores, evaluate.mean_filter_max(direct["anomaly_map"], 3), atol=1e-5)


def _fake_predict(images: np.ndarray):
  """Maps = the images' red channel, scores = their maximum: a known predictor."""
  maps = images[..., 0]
  return maps, maps.max(axis=(1, 2))


def test_evaluate_reports_metrics_and_f1_thresholds_from_the_same_curves():
  rng = np.random.default_rng(0)
  masks = np.zeros((6, 16, 16), bool)
  masks[3, 2:6, 2:6] = masks[4, 8:12, 1:4] = masks[5, 0:3, 10:16] = True
  images = (rng.random((6, 16, 16, 3)) * 120 + 100 * masks[..., None]).astype(np.uint8)
  test_set = {"image": images, "label": masks.any(axis=(1, 2)), "mask": masks}
  result = evaluate.evaluate(_fake_predict, test_set, batch_size=4)
  maps, scores = _fake_predict(images.astype(np.float32) / 255.0)
  np.testing.assert_allclose(result.maps, maps)
  assert result.metrics == metrics.category_metrics(test_set["label"], scores, masks, maps)
  assert result.thresholds == {
    "image": metrics.f1_max(test_set["label"], scores)[1],
    "pixel": metrics.f1_max(masks, maps)[1],
  }
  assert result.by_defect == {}  # a test set without defect types

  # Per defect type: its images and every good one, as a test set of their own.
  test_set["defect"] = np.array(["good"] * 3 + ["hole", "scratch", "hole"])
  result = evaluate.evaluate(_fake_predict, test_set, batch_size=4)
  assert set(result.by_defect) == {"hole", "scratch"}
  for defect in ("hole", "scratch"):
    keep = (test_set["defect"] == "good") | (test_set["defect"] == defect)
    assert result.by_defect[defect] == metrics.category_metrics(
      test_set["label"][keep], scores[keep], masks[keep], maps[keep]
    )
  normal_only = {k: v[:3] for k, v in test_set.items()}
  assert evaluate.evaluate(_fake_predict, normal_only, 4).thresholds == {
    "image": None,
    "pixel": None,
  }


def test_a_balanced_image_threshold_does_not_follow_the_share_of_anomalous_images():
  """2 good images and 8 anomalous ones, 2 of them scoring below the good ones: F1-max calls
  every image anomalous; with both classes weighed alike it separates the good ones."""
  red = np.array([40, 50, 10, 20, 100, 110, 120, 130, 140, 150], np.uint8)
  images = np.broadcast_to(red[:, None, None, None], (10, 4, 4, 3)).copy()
  labels = np.array([0, 0] + [1] * 8, bool)
  masks = np.broadcast_to(labels[:, None, None], (10, 4, 4)).copy()
  test_set = {"image": images, "label": labels, "mask": masks}
  plain = evaluate.evaluate(_fake_predict, test_set, batch_size=4)
  balanced = evaluate.evaluate(_fake_predict, test_set, batch_size=4, balanced_threshold=True)
  assert plain.thresholds["image"] == pytest.approx(10 / 255)  # everything anomalous
  assert balanced.thresholds["image"] == pytest.approx(100 / 255)  # both good images pass
  assert balanced.thresholds["pixel"] == plain.thresholds["pixel"]  # pixels: F1-max as before
  assert balanced.metrics == plain.metrics


def test_nan_maps_are_one_clear_error():
  test_set = {
    "image": np.zeros((2, 8, 8, 3), np.uint8),
    "label": np.array([False, True]),
    "mask": np.zeros((2, 8, 8), bool),
  }

  def nan_predict(images):
    maps = np.full(images.shape[:3], np.nan, np.float32)
    return maps, maps.max(axis=(1, 2))

  with pytest.raises(DivergedError, match=r"anomaly maps hold 128 NaN values \(of 128\)"):
    evaluate.evaluate(nan_predict, test_set, batch_size=2)
