import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from pouta_jax import objectives


def _ssim_oracle(x: np.ndarray, y: np.ndarray) -> float:
  """SSIM with scipy correlation: 11x11 Gaussian (sigma 1.5), zero padding, C1/C2 for L=1."""
  g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  blur = lambda z: ndimage.correlate(z, w, mode="constant", cval=0.0)
  maps = []
  for b in range(x.shape[0]):
    for c in range(x.shape[-1]):
      a, d = x[b, ..., c].astype(np.float64), y[b, ..., c].astype(np.float64)
      mu_a, mu_d = blur(a), blur(d)
      va, vd = blur(a * a) - mu_a**2, blur(d * d) - mu_d**2
      cov = blur(a * d) - mu_a * mu_d
      c1, c2 = 0.01**2, 0.03**2
      maps.append(
        (2 * mu_a * mu_d + c1) * (2 * cov + c2) / ((mu_a**2 + mu_d**2 + c1) * (va + vd + c2))
      )
  return float(np.mean(maps))


def test_ssim_matches_scipy_oracle():
  rng = np.random.default_rng(0)
  x = rng.random((2, 24, 20, 3)).astype(np.float32)
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(objectives.ssim(x, y), _ssim_oracle(x, y), atol=1e-5)


def test_ssim_of_identical_images_is_one():
  x = np.random.default_rng(1).random((1, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(objectives.ssim(x, x), 1.0, atol=1e-5)


def test_blur_matrix_is_a_normalised_gaussian_correlation_with_zero_padding():
  m = objectives.gaussian_blur_matrix(20, 11, 1.5)
  np.testing.assert_allclose(m[10].sum(), 1.0, rtol=1e-6)  # a full window away from the edges
  assert m[10].argmax() == 10
  z = np.random.default_rng(2).random(20)
  taps = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
  oracle = ndimage.correlate1d(z, taps / taps.sum(), mode="constant", cval=0.0)
  np.testing.assert_allclose(m @ z, oracle, rtol=1e-6)


def test_ssim_of_images_smaller_than_the_window_matches_the_oracle():
  rng = np.random.default_rng(3)
  x = rng.random((1, 7, 9, 3)).astype(np.float32)
  y = rng.random((1, 7, 9, 3)).astype(np.float32)
  np.testing.assert_allclose(objectives.ssim(x, y), _ssim_oracle(x, y), atol=1e-5)


def test_focal_loss_hand_computed():
  # Two pixels: anomaly prob 0.9 on an anomalous pixel, 0.2 on a normal one.
  probs = jnp.array([[0.1, 0.9], [0.8, 0.2]])
  mask = jnp.array([1.0, 0.0])
  s = 1e-5
  pt1 = (1 - s) * 0.9 + s * 0.1 + s
  pt2 = (1 - s) * 0.8 + s * 0.2 + s
  want = np.mean([-((1 - pt1) ** 2) * np.log(pt1), -((1 - pt2) ** 2) * np.log(pt2)])
  np.testing.assert_allclose(objectives.focal_loss(probs, mask), want, rtol=1e-5)
  # Focusing: a confident correct pixel costs far less than its cross-entropy.
  assert float(objectives.focal_loss(probs, mask)) < 0.1 * -np.log(0.85)


def test_mse_and_draem_objective_terms():
  rng = np.random.default_rng(2)
  image = rng.random((1, 16, 16, 3)).astype(np.float32)
  recon = image + 0.5
  np.testing.assert_allclose(objectives.mse(recon, image), 0.25, rtol=1e-6)
  logits = np.zeros((1, 16, 16, 2), np.float32)  # p = 0.5 everywhere
  batch = {"image": image, "mask": np.zeros((1, 16, 16), np.float32)}
  outputs = {"reconstruction": recon, "logits": logits}
  loss, terms = objectives.draem_objective(outputs, batch, {})
  pt = 0.5 + 1e-5
  np.testing.assert_allclose(terms["focal"], -((1 - pt) ** 2) * np.log(pt), rtol=1e-4)
  np.testing.assert_allclose(terms["ssim"], 1 - _ssim_oracle(recon, image), atol=1e-5)
  np.testing.assert_allclose(loss, sum(terms.values()), rtol=1e-6)


def test_alpha_focal_and_smooth_l1_hand_computed():
  probs = jnp.asarray([[0.9, 0.1], [0.3, 0.7]])
  mask = jnp.asarray([0.0, 1.0])
  pt = np.array([0.9, 0.7]) * (1 - 1e-5) + np.array([0.1, 0.3]) * 1e-5 + 1e-5
  per_pixel = -((1 - pt) ** 4) * np.log(pt)
  np.testing.assert_allclose(
    objectives.focal_loss(probs, mask, gamma=4.0, alpha=0.25),
    np.mean(per_pixel * [0.75, 0.25]),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    objectives.smooth_l1(jnp.asarray([0.2, 3.0]), jnp.zeros(2)),
    np.mean([0.5 * 0.04, 2.5]),
    rtol=1e-6,
  )
  logits = jnp.log(probs)
  terms = objectives.prn_map_terms(logits, mask)
  np.testing.assert_allclose(terms["smooth_l1"], np.mean([0.5 * 0.01, 0.5 * 0.09]), rtol=1e-5)
  np.testing.assert_allclose(terms["focal"], 5 * np.mean(per_pixel * 0.5), rtol=1e-5)
