import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from pouta_jax.models.layers import upsample_bilinear


def test_upsample_matches_align_corners_oracle():
  # scipy's zoom with grid_mode=False maps corner to corner, like align_corners=True.
  x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
  got = np.asarray(upsample_bilinear(jnp.asarray(x), 2))
  want = ndimage.zoom(x, (1, 2, 2, 1), order=1, grid_mode=False, mode="nearest")
  assert got.shape == (2, 10, 14, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Corners are copied exactly.
  np.testing.assert_allclose(got[:, [0, -1]][:, :, [0, -1]], x[:, [0, -1]][:, :, [0, -1]])


def test_upsample_of_single_pixel_is_constant():
  x = jnp.full((1, 1, 1, 2), 3.0)
  np.testing.assert_allclose(upsample_bilinear(x, 2), np.full((1, 2, 2, 2), 3.0))
