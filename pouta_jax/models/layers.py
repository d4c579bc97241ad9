"""Building blocks shared by every network: conv-BN-ReLU, pooling, upsampling.

Initialisers follow the official DRAEM code (PyTorch): conv kernels N(0, 0.02), conv biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default), BatchNorm scale N(1, 0.02), bias 0.
BatchNorm uses PyTorch's momentum 0.1 (Flax: 0.9) and epsilon 1e-5 so converted checkpoints
behave the same.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

conv_kernel_init = nn.initializers.normal(stddev=0.02)


def _bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)

  def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv3x3(nn.Module):
  """3x3 'same' convolution with bias, initialised like the official DRAEM."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = 9 * x.shape[-1]
    return nn.Conv(
        self.features,
        (3, 3),
        padding=1,
        kernel_init=conv_kernel_init,
        bias_init=_torch_bias_init(fan_in),
    )(x)


class ConvBNReLU(nn.Module):
  """Conv3x3 -> BatchNorm -> ReLU, the unit every DRAEM/POUTA block is made of."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv3x3(self.features)(x)
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=_bn_scale_init,
    )(x)
    return nn.relu(x)


class DoubleConv(nn.Module):
  """Two ConvBNReLU; the second has `out_features` (default: `features`)."""

  features: int
  out_features: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBNReLU(self.features)(x, train)
    return ConvBNReLU(self.out_features or self.features)(x, train)


class UpConv(nn.Module):
  """Bilinear x2 upsampling (align_corners=True) followed by one ConvBNReLU."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return ConvBNReLU(self.features)(upsample_bilinear(x, 2), train)


def max_pool2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2))


class Encoder(nn.Module):
  """DoubleConv blocks of the given widths, a 2x2 max-pool before each but the first.

  Returns every block's output, finest first: the skips of a U-Net, the features POUTA reuses.
  """

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    features = []
    for level, width in enumerate(self.widths):
      if level:
        x = max_pool2(x)
      x = DoubleConv(width, name=f"block_{level}")(x, train)
      features.append(x)
    return features


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights with the corner pixels aligned."""
  if n_out == 1 or n_in == 1:
    pos = np.zeros(n_out)
  else:
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = pos - lo
  weights = np.zeros((n_out, n_in), np.float32)
  np.add.at(weights, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(n_out), hi), frac)
  return weights


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
  """Bilinear resize of NHWC `x` by `factor`, as PyTorch's align_corners=True.

  Written as two small matrix products (rows, then columns): exact, and cheap next to the convs.
  """
  _, h, w, _ = x.shape
  rows = jnp.asarray(_align_corners_matrix(h, h * factor), x.dtype)
  cols = jnp.asarray(_align_corners_matrix(w, w * factor), x.dtype)
  x = jnp.einsum("oh,bhwc->bowc", rows, x)
  return jnp.einsum("pw,bowc->bopc", cols, x)
