"""DRAEM (Zavrtanik et al., ICCV 2021): reconstructive + discriminative subnetworks.

The discriminative subnetwork is a U-Net on concat(reconstruction, input); its 2-channel
softmax gives the anomaly map. `base_width` is the reconstructive width (128 at full size);
the discriminative width is half of it (64), as in the official release.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pouta_jax.models.layers import Conv3x3, DoubleConv, Encoder, UpConv, conv_weight_grad
from pouta_jax.models.reconstructive import ReconstructiveNetwork

# Channel multipliers (x base width) of the encoder blocks, finest first, and of the decoder
# stages, finest first (each stage: upsampling conv, concat with the skip, two convs).
DISCRIMINATIVE_MULTIPLIERS = (1, 2, 4, 8, 8, 8)
DISCRIMINATIVE_DECODER_MULTIPLIERS = (1, 1, 2, 4, 8)


class DiscriminativeNetwork(nn.Module):
  """U-Net with skips: 6 encoder blocks (5 max-pools), 5 decoder stages, 2 output logits."""

  base_width: int = 64
  out_channels: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w = self.base_width
    skips = Encoder(tuple(m * w for m in DISCRIMINATIVE_MULTIPLIERS), name="encoder")(x, train)
    x = skips[-1]

    for level in reversed(range(len(DISCRIMINATIVE_DECODER_MULTIPLIERS))):
      width = DISCRIMINATIVE_DECODER_MULTIPLIERS[level] * w
      x = UpConv(width, name=f"up_{level}")(x, train)
      x = jnp.concatenate([x, skips[level]], axis=-1)
      x = DoubleConv(width, name=f"decoder_{level}")(x, train)
    return Conv3x3(self.out_channels, name="head")(x)


class DRAEM(nn.Module):
  """Reconstruct the (possibly anomalous) input, then segment from concat(recon, input)."""

  base_width: int = 128
  conv_weight_grad: str = "auto"  # see layers.CONV_WEIGHT_GRAD_MODES

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict:
    with conv_weight_grad(self.conv_weight_grad):
      recon = ReconstructiveNetwork(self.base_width, name="reconstructive")(x, train)
      reconstruction = recon["reconstruction"]
      # Trained end to end; at test time the official code detaches the reconstruction.
      seg_input = reconstruction if train else jax.lax.stop_gradient(reconstruction)
      logits = DiscriminativeNetwork(self.base_width // 2, name="discriminative")(
        jnp.concatenate([seg_input, x], axis=-1), train
      )
    return {
      "reconstruction": reconstruction,
      "logits": logits,
      "anomaly_map": jax.nn.softmax(logits, axis=-1)[..., 1],
    }
