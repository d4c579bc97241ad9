"""POUTA (Produce Once, Utilize Twice; Wang et al., TCSVT 2024): our reading of the paper.

The reconstructive network is DRAEM's. Its encoder features stand for the input image and the
same-resolution decoder features for its reconstruction, so the discriminative part needs no
encoder of its own. For each decoder level, deepest first:
  FCM  (feature comparison): 1x1 projections P(E_i), P(D_i) to the level's width, then a
       ConvBNReLU over [P(E_i), P(D_i), |P(E_i) - P(D_i)|];
  HSG  (high-level semantic guidance): the refined feature of the coarser level, upsampled,
       gates the compared feature (sigmoid of a 1x1 conv) and is concatenated to it before a
       ConvBNReLU: semantics flow coarse to fine;
  MSS  (multi-scale supervision): a 1x1 head per level predicts 2-class logits at that level's
       resolution; a 3x3 head on the finest refined feature gives the final map.
No public code exists; module contents beyond the paper's description are our design. The
design study's alternatives (configs/pouta_study.py) are options here: what FCM compares
(`compare`), HSG without its gate (`guidance_gate`), the discriminative width and each level's
multiple of it (`level_multipliers`), FCM's fuse per pixel (`fuse_kernel=1`: the comparison is
pointwise; HSG's 3x3 refine adds the context), the features detached from the discriminative
losses (`detach_features`), and the finest level also given the pixels (`pixel_input`: the
image, its reconstruction and their difference, as DRAEM's discriminator sees them). Most of
the discriminative FLOPs are the finest level's 3x3 convolutions at full resolution, which
`fuse_kernel=1` and a smaller finest multiplier cut.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pouta_jax.models.layers import (
  Conv3x3,
  ConvBNReLU,
  conv1x1,
  conv_weight_grad,
  upsample_bilinear,
)
from pouta_jax.models.reconstructive import ReconstructiveNetwork

# Default width of each supervised level (x the discriminative base width), finest first; the
# four levels are the resolutions of the reconstructive decoder's four stages (H, H/2, H/4, H/8).
LEVEL_MULTIPLIERS = (1, 1, 2, 4)
FUSE_KERNELS = (1, 3)
# What FCM compares: "both" [P(E), P(D), |P(E) - P(D)|], one side only, the difference only,
# or [P(E), P(D)] with their cosine distance (E and D themselves differ in width).
COMPARE_MODES = ("both", "encoder", "decoder", "difference", "cosine")


def unit_width(base_width: int, width: int, fraction: float) -> int:
  """The levels' unit width: `width`, or when 0 that fraction of the base width (rounded half
  up, at least 1), so a config's proportions hold at every size (16 -> 6 and 128 -> 48 at 3/8)."""
  return width or max(1, int(base_width * fraction + 0.5))


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """1 - cos(a, b) over the channels, per pixel: (..., 1), in [0, 2]."""
  dot = jnp.sum(a * b, -1, keepdims=True)
  norms = jnp.linalg.norm(a, axis=-1, keepdims=True) * jnp.linalg.norm(b, axis=-1, keepdims=True)
  return 1.0 - dot / jnp.maximum(norms, 1e-6)


class FeatureComparison(nn.Module):
  """FCM: compares encoder (input) and decoder (reconstruction) features of one level."""

  features: int
  compare: str = "both"
  kernel: int = 3  # the fuse convolution's

  @nn.compact
  def __call__(
    self, encoder: jax.Array, decoder: jax.Array, train: bool, pixels: jax.Array | None = None
  ) -> jax.Array:
    e = conv1x1(self.features, "project_encoder")(encoder) if self.compare != "decoder" else None
    d = conv1x1(self.features, "project_decoder")(decoder) if self.compare != "encoder" else None
    parts = {
      "both": lambda: [e, d, jnp.abs(e - d)],
      "encoder": lambda: [e],
      "decoder": lambda: [d],
      "difference": lambda: [jnp.abs(e - d)],
      "cosine": lambda: [e, d, cosine_distance(e, d)],
    }[self.compare]()
    if pixels is not None:
      parts.append(pixels)
    return ConvBNReLU(self.features, self.kernel, name="fuse")(jnp.concatenate(parts, -1), train)


class HighLevelGuidance(nn.Module):
  """HSG: calibrates a level's feature by the refined feature of the coarser level."""

  features: int
  gate: bool = True  # False: the coarser level concatenated as it is

  @nn.compact
  def __call__(self, feature: jax.Array, coarser: jax.Array, train: bool) -> jax.Array:
    guide = upsample_bilinear(coarser, feature.shape[1] // coarser.shape[1])
    if self.gate:
      feature = feature * jax.nn.sigmoid(conv1x1(self.features, "gate")(guide))
    return ConvBNReLU(self.features, name="refine")(jnp.concatenate([feature, guide], -1), train)


class POUTADiscriminative(nn.Module):
  """Coarse-to-fine discriminative layers over the reconstructive network's features."""

  base_width: int = 64
  compare: str = "both"
  guidance: bool = True
  guidance_gate: bool = True
  level_multipliers: tuple[int, ...] = LEVEL_MULTIPLIERS
  fuse_kernel: int = 3

  @nn.compact
  def __call__(
    self, encoder: list, decoder: list, train: bool, pixels: jax.Array | None = None
  ) -> dict:
    """`pixels`, when given, join the finest level's comparison."""
    level_logits = []
    refined = None
    for level in reversed(range(len(self.level_multipliers))):
      width = self.level_multipliers[level] * self.base_width
      feature = FeatureComparison(width, self.compare, self.fuse_kernel, name=f"compare_{level}")(
        encoder[level], decoder[level], train, pixels if level == 0 else None
      )
      if self.guidance and refined is not None:
        feature = HighLevelGuidance(width, self.guidance_gate, name=f"guide_{level}")(
          feature, refined, train
        )
      refined = feature
      level_logits.insert(0, conv1x1(2, f"head_{level}")(refined))
    return {"logits": Conv3x3(2, name="head")(refined), "level_logits": level_logits}


class POUTA(nn.Module):
  """DRAEM's reconstructive network whose features are reused, produced once, by POUTA's layers.

  `level_logits` (finest first) are returned for deep supervision; `logits` is the final map.
  """

  # Defaults: configs/pouta.py's (the design study's choice).
  base_width: int = 128
  compare: str = "difference"
  guidance: bool = True
  guidance_gate: bool = True
  discriminative_width: int = 0  # 0: unit_width's rule
  discriminative_fraction: float = 0.375
  level_multipliers: tuple[int, ...] = LEVEL_MULTIPLIERS
  fuse_kernel: int = 1
  detach_features: bool = False  # the discriminative losses stop at the shared features
  pixel_input: bool = True
  conv_weight_grad: str = "auto"  # see layers.CONV_WEIGHT_GRAD_MODES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict:
    with conv_weight_grad(self.conv_weight_grad):
      recon = ReconstructiveNetwork(self.base_width, name="reconstructive")(x, train)
      shared = (recon["encoder"], recon["decoder"], recon["reconstruction"])
      if self.detach_features:
        shared = jax.lax.stop_gradient(shared)
      encoder, decoder, reconstruction = shared
      pixels = None
      if self.pixel_input:
        pixels = jnp.concatenate([x, reconstruction, jnp.abs(x - reconstruction)], -1)
      seg = POUTADiscriminative(
        unit_width(self.base_width, self.discriminative_width, self.discriminative_fraction),
        self.compare,
        self.guidance,
        self.guidance_gate,
        tuple(self.level_multipliers),
        self.fuse_kernel,
        name="discriminative",
      )(encoder, decoder, train, pixels)
    return {
      "reconstruction": recon["reconstruction"],
      "logits": seg["logits"],
      "level_logits": seg["level_logits"],
      "anomaly_map": jax.nn.softmax(seg["logits"], axis=-1)[..., 1],
    }
