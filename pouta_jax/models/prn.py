"""PRN's trainable network (Zhang et al., CVPR 2023): from backbone features and their
prototype residuals to a 2-class anomaly map. Our reading of the paper; no official code exists,
and sizes beyond its description follow the one public reimplementation's defaults
(third_party/ALGORITHMS.md).

Inputs: the frozen backbone's features of layers 1-3 (strides 4, 8, 16), their residuals
against the nearest prototype (models/prototypes.py), and layer 4 (stride 32).
  MSF  (multi-scale fusion): every scale receives every other, HRNet-like: finer ones through
       strided 3x3 convolutions, coarser ones upsampled and projected by a 1x1 convolution;
       once for features and once for residuals, and again after MSA;
  MSA  (multi-size self-attention): at each scale, attention among the pixels of windows of
       several sizes (the whole map, halves, quarters, eighths), queries, keys and values from
       depthwise 1x1 convolutions; the sizes' outputs concatenated, projected and added back;
  decoder: from layer 4 up to the input size, concatenating the fused scales on the way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pouta_jax import errors
from pouta_jax.models import backbone as backbone_lib, prototypes as prototypes_lib
from pouta_jax.models.layers import (
  Conv3x3,
  ConvBNReLU,
  batch_norm,
  conv1x1,
  conv_kernel_init,
  conv_weight_grad,
  upsample_bilinear,
)

NUM_SCALES = 3  # layers 1-3 carry prototypes and residuals
WINDOW_DIVISORS = (1, 2, 4, 8)  # MSA windows: the map's side / divisor
MSA_BLOCKS = 3


class StridedDown(nn.Module):
  """Halves the resolution `times` times with 3x3 stride-2 convolutions (BN, ReLU between)."""

  features: int
  times: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.times):
      x = nn.Conv(self.features, (3, 3), strides=(2, 2), padding=1, kernel_init=conv_kernel_init)(x)
      x = batch_norm(train)(x)
      if i + 1 < self.times:
        x = nn.relu(x)
    return x


class MultiScaleFusion(nn.Module):
  """MSF: scale i = relu(sum over j of x_j brought to scale i); finest first, each half the
  resolution of the previous one."""

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, xs: list[jax.Array], train: bool) -> list[jax.Array]:
    fused = []
    for i, width in enumerate(self.widths):
      total = conv1x1(width, f"to{i}_from{i}")(xs[i])
      for j, x in enumerate(xs):
        if j < i:
          total = total + StridedDown(width, i - j, name=f"to{i}_from{j}")(x, train)
        elif j > i:
          total = total + upsample_bilinear(conv1x1(width, f"to{i}_from{j}")(x), 2 ** (j - i))
      fused.append(nn.relu(total))
    return fused


def window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
  """Single-head scaled dot-product attention among the pixels of each window x window tile of
  (B, H, W, C) maps; H and W must be multiples of `window`."""
  b, h, w, c = q.shape

  def tiles(x):
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)

  weights = jax.nn.softmax(jnp.einsum("btqc,btkc->btqk", tiles(q), tiles(k)) / jnp.sqrt(c), -1)
  out = jnp.einsum("btqk,btkc->btqc", weights, tiles(v))
  out = out.reshape(b, h // window, w // window, window, window, c)
  return out.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def window_size(side: int, divisor: int) -> int:
  """The largest window that tiles `side` exactly and is at most side / divisor (>= 1)."""
  return max(w for w in range(1, max(side // divisor, 1) + 1) if side % w == 0)


class DepthwiseProjection(nn.Module):
  """Depthwise 1x1 convolution: a per-channel scale and bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    return x * self.param("scale", nn.initializers.ones, (c,)) + self.param(
      "bias", nn.initializers.zeros, (c,)
    )


class MultiSizeAttention(nn.Module):
  """One MSA block: attention in windows of every size in WINDOW_DIVISORS, concatenated,
  projected back to the input width, batch-normalised and added to the input."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    side = x.shape[1]
    outs = []
    for divisor in WINDOW_DIVISORS:
      window = window_size(side, divisor)
      q, k, v = (DepthwiseProjection(name=f"{n}_{divisor}")(x) for n in "qkv")
      outs.append(window_attention(q, k, v, window))
    y = conv1x1(x.shape[-1], "project")(jnp.concatenate(outs, -1))
    y = batch_norm(train)(y)
    return nn.relu(x + y)


class PRNHead(nn.Module):
  """Everything of PRN after the frozen backbone and the prototypes; `width` is the channels
  of the finest scale (doubled at each coarser one)."""

  width: int = 64

  @nn.compact
  def __call__(
    self,
    features: list[jax.Array],
    residuals: list[jax.Array],
    deepest: jax.Array,
    output_size: int,
    train: bool,
  ) -> jax.Array:
    if len(features) != NUM_SCALES or len(residuals) != NUM_SCALES:
      raise ValueError(f"PRN takes {NUM_SCALES} scales of features and residuals")
    widths = tuple(self.width * 2**i for i in range(NUM_SCALES))
    features = MultiScaleFusion(widths, name="msf_features")(features, train)
    residuals = MultiScaleFusion(widths, name="msf_residuals")(residuals, train)
    scales = []
    for i, (f, r) in enumerate(zip(features, residuals)):
      x = ConvBNReLU(widths[i], name=f"join_{i}")(jnp.concatenate([f, r], -1), train)
      for block in range(MSA_BLOCKS):
        x = MultiSizeAttention(name=f"msa_{i}_{block}")(x, train)
      scales.append(x)
    scales = MultiScaleFusion(widths, name="msf_out")(scales, train)

    x = ConvBNReLU(widths[-1], name="bottom")(deepest, train)
    for i in reversed(range(NUM_SCALES)):
      x = upsample_bilinear(x, 2)
      x = ConvBNReLU(widths[i], name=f"decode_{i}")(jnp.concatenate([x, scales[i]], -1), train)
    while x.shape[1] < output_size:  # stride 4 -> the input size
      x = ConvBNReLU(self.width // 2, name=f"up_{x.shape[1]}")(upsample_bilinear(x, 2), train)
    return Conv3x3(2, name="head")(x)


class PRN(nn.Module):
  """Frozen backbone -> prototype residuals of layers 1-3 -> PRNHead.

  Variables: `params`/`batch_stats` under "backbone" (frozen: loaded from converted weights,
  never updated) and "discriminative" (trained), and the "prototypes" collection, one (K, h, w, c)
  array per scale, computed before training by `fit_prototypes`.
  """

  backbone: str = "resnet18"
  width: int = 64
  num_prototypes: int = 1
  conv_weight_grad: str = "auto"  # see layers.CONV_WEIGHT_GRAD_MODES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict:
    if self.num_prototypes < 1:
      raise ValueError(
        f"PRN(num_prototypes={self.num_prototypes}): resolve the count from the "
        f"data first (models.resolve)"
      )
    features = backbone_lib.ResNetFeatures(self.backbone, name="backbone")(x)
    features = [jax.lax.stop_gradient(f) for f in features]
    scales = features[:NUM_SCALES]
    protos = [
      self.variable(
        "prototypes", f"scale_{i}", jnp.zeros, (self.num_prototypes,) + f.shape[1:], f.dtype
      ).value
      for i, f in enumerate(scales)
    ]
    residuals = [prototypes_lib.residual(f, p) for f, p in zip(scales, protos)]
    with conv_weight_grad(self.conv_weight_grad):
      logits = PRNHead(self.width, name="discriminative")(
        scales, residuals, features[NUM_SCALES], x.shape[1], train
      )
    return {"logits": logits, "anomaly_map": jax.nn.softmax(logits, axis=-1)[..., 1]}


def num_prototypes(num_train_images: int, fraction: float) -> int:
  """K = `fraction` of the training images, at least 1."""
  return max(1, int(round(fraction * num_train_images)))


def fit_prototypes(
  model: PRN, variables: dict, images: np.ndarray, key: jax.Array, batch_size: int = 16
) -> dict:
  """The "prototypes" collection: per scale, k-means (K = model.num_prototypes) over the
  backbone features of the normal training `images` (N, H, W, 3) in [0, 1], each image's
  flattened feature map one point. Deterministic given `key`."""
  if model.num_prototypes > len(images):
    raise errors.ConfigError(
      f"{model.num_prototypes} prototypes need at least as many training images "
      f"(there are {len(images)})"
    )
  backbone = backbone_lib.ResNetFeatures(model.backbone)
  backbone_vars = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
  extract = jax.jit(lambda v, x: backbone.apply(v, x)[:NUM_SCALES])
  per_batch = [
    extract(backbone_vars, jnp.asarray(images[i : i + batch_size]))
    for i in range(0, len(images), batch_size)
  ]
  result = {}
  for scale in range(NUM_SCALES):
    features = jnp.concatenate([b[scale] for b in per_batch])
    centroids, _ = prototypes_lib.kmeans(
      features.reshape(len(images), -1), model.num_prototypes, jax.random.fold_in(key, scale)
    )
    result[f"scale_{scale}"] = centroids.reshape((model.num_prototypes,) + features.shape[1:])
  return result
