"""Losses, and each model's total objective.

An objective maps (model outputs, batch) to (scalar loss, dict of named scalar terms); the train
loop only ever sees that signature, so it never branches on the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(prediction - target))


@functools.lru_cache(maxsize=None)
def gaussian_blur_matrix(length: int, size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """(length, length) matrix M with M @ z = z correlated with a normalised 1-D Gaussian of `size`
  taps, zero 'same' padding (a banded Toeplitz matrix, cut at the edges)."""
  taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2.0 * sigma**2))
  taps /= taps.sum()
  offsets = np.arange(length)[None, :] - np.arange(length)[:, None] + size // 2
  inside = (offsets >= 0) & (offsets < size)
  return np.where(inside, taps[np.clip(offsets, 0, size - 1)], 0.0).astype(np.float32)


def ssim(
  x: jax.Array, y: jax.Array, size: int = 11, sigma: float = 1.5, data_range: float = 1.0
) -> jax.Array:
  """Mean SSIM of NHWC images, per channel with a Gaussian window and zero 'same' padding.

  This is the official DRAEM SSIM with its dynamic range fixed to `data_range` (the official code
  infers 1 for images in [0, 1], which ours always are). The 2-D Gaussian is separable, so each
  blur is two matrix products, along the rows and along the columns: XLA's CPU backend ran the
  11x11 depthwise convolution (and its gradient) 35x slower, 45% of a tiny DRAEM train step.
  """
  rows = jnp.asarray(gaussian_blur_matrix(x.shape[1], size, sigma), x.dtype)
  cols = jnp.asarray(gaussian_blur_matrix(x.shape[2], size, sigma), x.dtype)
  exact = jax.lax.Precision.HIGHEST  # TPUs would otherwise multiply in bfloat16

  def blur(z: jax.Array) -> jax.Array:
    z = jnp.einsum("hk,nkwc->nhwc", rows, z, precision=exact)
    return jnp.einsum("wk,nhkc->nhwc", cols, z, precision=exact)

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x**2
  var_y = blur(y * y) - mu_y**2
  cov = blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
    (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  )
  return jnp.mean(ssim_map)


def focal_loss(
  probs: jax.Array,
  mask: jax.Array,
  gamma: float = 2.0,
  smooth: float = 1e-5,
  alpha: float | None = None,
) -> jax.Array:
  """Focal loss on 2-class softmax probabilities (..., 2) against a binary mask (...).

  As in the official DRAEM: the one-hot target is clamped to [smooth, 1 - smooth], the true-class
  probability is pt = <target, p> + smooth, loss = -(1 - pt)^gamma log(pt), mean over pixels.
  With `alpha` (PRN), anomalous pixels weigh alpha and normal ones 1 - alpha.
  """
  target = jnp.stack([1.0 - mask, mask], axis=-1)
  target = jnp.clip(target, smooth, 1.0 - smooth)
  pt = jnp.sum(target * probs, axis=-1) + smooth
  loss = -jnp.power(1.0 - pt, gamma) * jnp.log(pt)
  if alpha is not None:
    loss = loss * jnp.where(mask > 0.5, alpha, 1.0 - alpha)
  return jnp.mean(loss)


def smooth_l1(prediction: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
  """Huber-like: quadratic below `beta`, linear above (PyTorch's SmoothL1Loss), mean."""
  diff = jnp.abs(prediction - target)
  return jnp.mean(jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta))


def prn_map_terms(
  logits: jax.Array,
  mask: jax.Array,
  smooth_l1_weight: float = 1.0,
  focal_weight: float = 5.0,
  alpha: float = 0.5,
  gamma: float = 4.0,
) -> dict[str, jax.Array]:
  """PRN's loss on its map: smooth_l1_weight x Smooth-L1 of the anomaly probability against
  the mask, plus focal_weight x focal (alpha 0.5, gamma 4 by default)."""
  probs = jax.nn.softmax(logits, axis=-1)
  return {
    "smooth_l1": smooth_l1_weight * smooth_l1(probs[..., 1], mask),
    "focal": focal_weight * focal_loss(probs, mask, gamma=gamma, alpha=alpha),
  }


def reconstruction_terms(outputs: dict, batch: dict) -> dict[str, jax.Array]:
  """L2 and 1 - SSIM of the reconstruction against the clean (pre-synthesis) image."""
  recon, clean = outputs["reconstruction"], batch["image"]
  return {"l2": mse(recon, clean), "ssim": 1.0 - ssim(recon, clean)}


def segmentation_focal(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Focal loss of 2-class logits (B, h, w, 2) against a mask (B, H, W) max-pooled to h x w.

  Max pooling keeps a small defect visible at coarse levels: a cell is anomalous if any of its
  pixels is.
  """
  factor = mask.shape[1] // logits.shape[1]
  if factor > 1:
    mask = jax.lax.reduce_window(
      mask, -jnp.inf, jax.lax.max, (1, factor, factor), (1, factor, factor), "VALID"
    )
  return focal_loss(jax.nn.softmax(logits, axis=-1), mask)


# An objective: (outputs, batch, weights) -> (loss, terms). `weights` are the config's numeric
# loss.* settings (models.loss_weights), passed as arrays so that runs stacked in one program
# each train with their own values; settings that change the computation are built in.


def draem_objective(outputs: dict, batch: dict, weights: dict) -> tuple[jax.Array, dict]:
  """L2 + (1 - SSIM) on the reconstruction of the clean image, focal on the segmentation."""
  del weights  # DRAEM's terms are unweighted
  terms = {
    **reconstruction_terms(outputs, batch),
    "focal": segmentation_focal(outputs["logits"], batch["mask"]),
  }
  return sum(terms.values()), terms


@functools.lru_cache(maxsize=None)  # one function per setting: a stable jit cache key
def pouta_objective(deep_supervision: bool):
  """POUTA's loss: reconstruction terms, focal on the final map (`final_weight`) and (MSS) on
  every level (`level_weights`, finest first, each times max(0, 1 - `level_decay` x the
  training progress in [0, 1] when the step gives it): with `deep_supervision` off only the
  final map is supervised."""

  def objective(outputs: dict, batch: dict, weights: dict) -> tuple[jax.Array, dict]:
    terms = {
      **reconstruction_terms(outputs, batch),
      "focal": weights["final_weight"] * segmentation_focal(outputs["logits"], batch["mask"]),
    }
    if deep_supervision:
      decay = jnp.maximum(1.0 - weights["level_decay"] * weights.get("progress", 0.0), 0.0)
      for level, logits in enumerate(outputs["level_logits"]):
        weight = weights["level_weights"][level] * decay
        terms[f"focal_level{level}"] = weight * segmentation_focal(logits, batch["mask"])
    return sum(terms.values()), terms

  return objective


def prn_objective(outputs: dict, batch: dict, weights: dict) -> tuple[jax.Array, dict]:
  """PRN's loss: `prn_map_terms` on the final map (it has no reconstruction)."""
  terms = prn_map_terms(
    outputs["logits"],
    batch["mask"],
    weights["smooth_l1_weight"],
    weights["focal_weight"],
    weights["focal_alpha"],
    weights["focal_gamma"],
  )
  return sum(terms.values()), terms
