"""Building blocks shared by every network: conv-BN-ReLU, pooling, upsampling.

Initialisers follow the official DRAEM code (PyTorch): conv kernels N(0, 0.02), conv biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default), BatchNorm scale N(1, 0.02), bias 0.
BatchNorm uses PyTorch's momentum 0.1 (Flax: 0.9) and epsilon 1e-5 so converted checkpoints
behave the same.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

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


# How the 3x3 convolutions compute their gradients (`model.conv_weight_grad`):
#   "xla":            XLA's transposed convolutions;
#   "shifted_matmul": a custom VJP that computes a gradient as nine matrix products, one per
#                     kernel tap, where that is faster on XLA:CPU (measured per layer shape of
#                     DRAEM, bench/train_step.py): the kernel gradient of large images, where
#                     XLA's runs at a fifth of its forward speed, and both gradients of small,
#                     wide layers, where XLA's input gradient transposes the whole kernel first.
#                     Same results up to float rounding;
#   "auto":           shifted_matmul on the CPU backend, xla on accelerators.
CONV_WEIGHT_GRAD_MODES = ("auto", "xla", "shifted_matmul")
_weight_grad_mode = contextvars.ContextVar("conv_weight_grad", default="xla")
# The shapes where the matmuls win: kernel gradient of images >= 32x32 with >= 64 outputs;
# both gradients of images < 32x32 with >= 512 inputs and outputs.
LARGE_IMAGE_PIXELS = 32 * 32
MIN_KERNEL_GRAD_FEATURES = 64
MIN_WIDE_FEATURES = 512


@contextlib.contextmanager
def conv_weight_grad(mode: str) -> Iterator[None]:
  """Within this block, Conv3x3 layers built (traced) use `mode` for their gradients.

  A model's top module enters it in its __call__, so the choice is part of the model's
  definition (its field), not global state: it holds exactly while the model is traced.
  """
  if mode not in CONV_WEIGHT_GRAD_MODES:
    raise ValueError(f"conv weight gradient {mode!r}: expected one of {CONV_WEIGHT_GRAD_MODES}")
  if mode == "auto":
    mode = "shifted_matmul" if jax.default_backend() == "cpu" else "xla"
  token = _weight_grad_mode.set(mode)
  try:
    yield
  finally:
    _weight_grad_mode.reset(token)


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS
  )


def _pad1(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _kernel_grad_matmuls(x: jax.Array, grad: jax.Array) -> jax.Array:
  """dK[i, j] = x shifted by (i - 1, j - 1), transposed, times grad: over every pixel."""
  _, h, w, c = x.shape
  padded, flat_grad = _pad1(x), grad.reshape(-1, grad.shape[-1])
  return jnp.stack(
    [
      jnp.stack([padded[:, i : i + h, j : j + w, :].reshape(-1, c).T @ flat_grad for j in range(3)])
      for i in range(3)
    ]
  )


def _input_grad_matmuls(kernel: jax.Array, grad: jax.Array) -> jax.Array:
  """dx = sum over taps of (grad @ K[i, j]^T) shifted back by (i - 1, j - 1)."""
  b, h, w, _ = grad.shape
  flat_grad = grad.reshape(-1, grad.shape[-1])
  padded = jnp.zeros((b, h + 2, w + 2, kernel.shape[2]), grad.dtype)
  for i in range(3):
    for j in range(3):
      tap = jax.lax.dot_general(flat_grad, kernel[i, j], (((1,), (1,)), ((), ())))
      padded = padded.at[:, i : i + h, j : j + w, :].add(tap.reshape(b, h, w, -1))
  return padded[:, 1:-1, 1:-1, :]


@jax.custom_vjp
def conv3x3_shifted_matmul_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'same' convolution (NHWC, HWIO) whose gradients use matmuls where those are faster."""
  return _conv_same(x, kernel)


def _conv3x3_fwd(x: jax.Array, kernel: jax.Array):
  return _conv_same(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, grad: jax.Array):
  x, kernel = residuals
  _, h, w, _ = x.shape
  c_in, c_out = kernel.shape[2:]
  large = h * w >= LARGE_IMAGE_PIXELS
  wide = not large and min(c_in, c_out) >= MIN_WIDE_FEATURES
  if wide:
    grad_x = _input_grad_matmuls(kernel, grad)
  else:
    _, input_vjp = jax.vjp(lambda v: _conv_same(v, kernel), x)
    (grad_x,) = input_vjp(grad)
  if wide or (large and c_out >= MIN_KERNEL_GRAD_FEATURES):
    grad_kernel = _kernel_grad_matmuls(x, grad).astype(kernel.dtype)
  else:
    _, kernel_vjp = jax.vjp(lambda k: _conv_same(x, k), kernel)
    (grad_kernel,) = kernel_vjp(grad)
  return grad_x, grad_kernel


conv3x3_shifted_matmul_grad.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _flax_conv_fn(
  lhs, rhs, window_strides, padding, dimension_numbers=None, feature_group_count: int = 1, **unused
) -> jax.Array:
  """nn.Conv's `conv_general_dilated` hook: the shifted-matmul convolution for Conv3x3."""
  del unused  # dilations of 1 and default precision: what Conv3x3 passes
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS)
  if (
    tuple(window_strides) != (1, 1)
    or tuple(map(tuple, padding)) != ((1, 1), (1, 1))
    or dimension_numbers != nhwc
    or feature_group_count != 1
    or rhs.shape[:2] != (3, 3)
  ):
    raise ValueError("the shifted-matmul gradient serves 3x3 'same' NHWC convolutions only")
  return conv3x3_shifted_matmul_grad(lhs, rhs)


class Conv3x3(nn.Module):
  """3x3 'same' convolution with bias, initialised like the official DRAEM."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = 9 * x.shape[-1]
    custom = _weight_grad_mode.get() == "shifted_matmul"
    return nn.Conv(
      self.features,
      (3, 3),
      padding=1,
      kernel_init=conv_kernel_init,
      bias_init=_torch_bias_init(fan_in),
      conv_general_dilated=_flax_conv_fn if custom else None,
    )(x)


def batch_norm(train: bool, name: str | None = None, **kwargs) -> nn.BatchNorm:
  """BatchNorm with PyTorch's BatchNorm2d settings (its momentum 0.1 is flax's 0.9), the one
  setting every network here uses; running averages outside training."""
  return nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name, **kwargs
  )


def conv1x1(features: int, name: str | None = None) -> nn.Conv:
  return nn.Conv(features, (1, 1), kernel_init=conv_kernel_init, name=name)


class ConvBNReLU(nn.Module):
  """Conv (3x3, or 1x1 for a per-pixel mix) -> BatchNorm -> ReLU, the unit every DRAEM/POUTA
  block is made of."""

  features: int
  kernel: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = Conv3x3(self.features)(x) if self.kernel == 3 else conv1x1(self.features)(x)
    x = batch_norm(train, scale_init=_bn_scale_init)(x)
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


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """Max pooling, padding with -inf. Spelled as the ONNX converter (jax2onnx) wants it: it
  replaces flax's max_pool with its own, which takes the window by keyword and no padding."""
  if padding:
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    x = jnp.pad(x, pad, constant_values=-jnp.inf)
  return nn.max_pool(x, window_shape=(window, window), strides=(stride, stride))


def max_pool2(x: jax.Array) -> jax.Array:
  return max_pool(x, 2, 2)


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
