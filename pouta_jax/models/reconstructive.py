"""DRAEM's reconstructive subnetwork: a plain (skip-free) conv autoencoder.

DRAEM and POUTA share this module. Besides the reconstruction it returns the encoder and
decoder features of every level, because POUTA reads the encoder features as features of the
input image and the same-resolution decoder features as features of its reconstruction.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from pouta_jax.models.layers import Conv3x3, DoubleConv, Encoder, UpConv

# Channel multipliers (x base width) of the encoder blocks, finest first, and of the decoder
# stages, deepest first: (width of the upsampling conv and first conv, output width).
ENCODER_MULTIPLIERS = (1, 2, 4, 8, 8)
DECODER_MULTIPLIERS = ((8, 4), (4, 2), (2, 1), (1, 1))


class ReconstructiveNetwork(nn.Module):
  """Encoder of 5 double-conv blocks (4 max-pools), decoder of 4 upsampling stages.

  Returns a dict with `reconstruction` (B, H, W, out_channels, unbounded), `encoder` (the
  5 block outputs, finest first) and `decoder` (the 4 stage outputs, finest first, so that
  decoder[i] has the resolution of encoder[i]).
  """

  base_width: int = 128
  out_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict:
    w = self.base_width
    encoder = Encoder(tuple(m * w for m in ENCODER_MULTIPLIERS), name="encoder")(x, train)
    x = encoder[-1]

    decoder = []
    for stage, (mult, out_mult) in enumerate(DECODER_MULTIPLIERS):
      level = len(DECODER_MULTIPLIERS) - 1 - stage
      x = UpConv(mult * w, name=f"up_{level}")(x, train)
      x = DoubleConv(mult * w, out_mult * w, name=f"decoder_{level}")(x, train)
      decoder.insert(0, x)

    reconstruction = Conv3x3(self.out_channels, name="head")(x)
    return {"reconstruction": reconstruction, "encoder": encoder, "decoder": decoder}
