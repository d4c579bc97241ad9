"""The false-positive-rate threshold against a brute-force oracle over every candidate."""

import numpy as np
import pytest

from pouta_jax import calibrate, errors


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.1, 0.25, 0.5, 0.99])
def test_threshold_is_the_lowest_that_keeps_the_rate(seed, fpr):
  rng = np.random.default_rng(seed)
  scores = rng.random(int(rng.integers(1, 60))).astype(np.float32)
  scores[: len(scores) // 3] = scores[0]  # ties
  threshold, observed = calibrate.threshold_at_fpr(scores, fpr)
  assert isinstance(threshold, float) and observed == np.mean(scores >= threshold) <= fpr
  # Oracle: the lowest float32 threshold that flags at most fpr of the scores is just above
  # one of them (or any value above all); every lower candidate flags too many.
  candidates = np.nextafter(np.unique(scores), np.float32(np.inf))
  lowest = min(t for t in candidates if np.mean(scores >= t) <= fpr)
  assert threshold == lowest


def test_rates_outside_zero_to_one_are_refused():
  for fpr in (-0.1, 1.0, 2.0):
    with pytest.raises(errors.ConfigError, match=rf"--fpr={fpr}: expected a false-positive rate"):
      calibrate.threshold_at_fpr(np.ones(3), fpr)
