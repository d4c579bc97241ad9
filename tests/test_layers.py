import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from pouta_jax.models import layers
from pouta_jax.models.draem import DRAEM
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


@pytest.mark.parametrize(
  "shape",
  [
    (2, 9, 7, 3, 5),  # small image, narrow: XLA's gradients inside the custom VJP
    (1, 32, 32, 3, 64),  # large image: kernel gradient by matmuls
    (1, 4, 4, 512, 512),  # small and wide: both gradients by matmuls
  ],
)
def test_shifted_matmul_gradients_equal_xla_gradients_in_float64(shape):
  b, h, w, c_in, c_out = shape
  with jax.enable_x64():
    x = jax.random.normal(jax.random.key(1), (b, h, w, c_in), jnp.float64)
    kernel = jax.random.normal(jax.random.key(2), (3, 3, c_in, c_out), jnp.float64)
    weights = jax.random.normal(jax.random.key(3), (b, h, w, c_out), jnp.float64)
    loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * weights)
    got = jax.value_and_grad(loss(layers.conv3x3_shifted_matmul_grad), (0, 1))(x, kernel)
    want = jax.value_and_grad(loss(layers._conv_same), (0, 1))(x, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_shifted_matmul_gradient_under_vmap_matches_per_item_gradients():
  # Stacked categories vmap the step over per-category kernels.
  xs = jax.random.normal(jax.random.key(2), (3, 2, 8, 8, 4))
  kernels = jax.random.normal(jax.random.key(3), (3, 3, 3, 4, 6))
  grad = jax.grad(lambda k, x: jnp.sum(layers.conv3x3_shifted_matmul_grad(x, k) ** 2))
  reference = jax.grad(lambda k, x: jnp.sum(layers._conv_same(x, k) ** 2))
  np.testing.assert_allclose(
    jax.vmap(grad)(kernels, xs),
    jnp.stack([reference(k, x) for k, x in zip(kernels, xs)]),
    rtol=1e-4,
    atol=1e-4,
  )


def test_conv_weight_grad_modes():
  with layers.conv_weight_grad("auto"):
    expected = "shifted_matmul" if jax.default_backend() == "cpu" else "xla"
    assert layers._weight_grad_mode.get() == expected
  assert layers._weight_grad_mode.get() == "xla"  # restored on exit
  with pytest.raises(ValueError, match="'fast'"):
    with layers.conv_weight_grad("fast"):
      pass


def test_model_field_selects_the_gradient_path_of_every_conv3x3():
  # The gradients themselves are compared at layer level above; here: the field reaches every
  # Conv3x3 of the model (51 in DRAEM) and nothing else changes in the traced computation.
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: DRAEM(4).init(jax.random.key(0), x, train=False))
  counts = {}
  for mode in ("xla", "shifted_matmul"):
    model = DRAEM(4, conv_weight_grad=mode)

    def loss(variables, model=model):
      out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
      return jnp.mean(out["anomaly_map"])

    jaxpr = jax.make_jaxpr(loss)(variables)
    counts[mode] = collections.Counter(e.primitive.name for e in jaxpr.eqns)
  num_3x3 = sum(
    1
    for leaf in jax.tree.leaves(variables["params"])
    if leaf.ndim == 4 and leaf.shape[:2] == (3, 3)
  )
  assert counts["xla"]["conv_general_dilated"] == num_3x3
  assert counts["shifted_matmul"]["custom_vjp_call"] == num_3x3
  assert counts["shifted_matmul"]["conv_general_dilated"] == 0
  for name in ("conv_general_dilated", "custom_vjp_call"):
    del counts["xla"][name], counts["shifted_matmul"][name]
  assert counts["xla"] == counts["shifted_matmul"]
