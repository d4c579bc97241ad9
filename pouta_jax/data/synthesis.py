"""DRAEM's anomaly synthesis in vectorised numpy: Perlin masks, texture augmenters, blending.

Every function takes its `np.random.Generator`, so a sample is a pure function of the seed it is
built from (see pipeline.py). The Perlin noise follows Perlin's improved noise (2002): random unit
gradients on a lattice, quintic fade; see third_party/README.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage


def _fade(t: np.ndarray) -> np.ndarray:
  return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(rng: np.random.Generator, size: int, res: tuple[int, int]) -> np.ndarray:
  """Single-octave 2-D gradient noise (size, size) with `res` lattice cells per axis."""
  ry, rx = res
  angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
  gy, gx = np.sin(angles), np.cos(angles)
  y = np.arange(size) * ry / size
  x = np.arange(size) * rx / size
  yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
  fy, fx = (y - yi)[:, None], (x - xi)[None, :]

  def corner(dy: int, dx: int) -> np.ndarray:
    rows, cols = (yi + dy)[:, None], (xi + dx)[None, :]
    return gy[rows, cols] * (fy - dy) + gx[rows, cols] * (fx - dx)

  u, v = _fade(fy), _fade(fx)
  top = corner(0, 0) * (1 - v) + corner(0, 1) * v
  bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
  return np.sqrt(2) * (top * (1 - u) + bottom * u)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Rotation about the centre, same size, bilinear, zeros outside."""
  return ndimage.rotate(image, degrees, axes=(1, 0), reshape=False, order=1, mode="constant",
                        cval=0.0)


def perlin_mask(rng: np.random.Generator, size: int, max_scale_log2: int = 5,
                threshold: float = 0.5) -> np.ndarray:
  """DRAEM's anomaly mask: noise at 2^k cells per axis (k in [0, max]), rotated, thresholded."""
  res = tuple(2 ** rng.integers(0, max_scale_log2 + 1, size=2))
  noise = rotate(perlin_noise(rng, size, res), rng.uniform(-90, 90))
  return noise > threshold


# --- The ten augmenters of DRAEM (uint8 HxWx3 in, uint8 out); three are applied per sample.


def _gamma_contrast(rng, x):
  gamma = rng.uniform(0.5, 2.0, size=3)
  return np.round(255 * (x / 255.0) ** gamma).astype(np.uint8)


def _multiply_add_brightness(rng, x):
  y = x.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def _sharpness(rng, x):
  return np.asarray(ImageEnhance.Sharpness(Image.fromarray(x)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(rng, x):
  hsv = np.asarray(Image.fromarray(x).convert("HSV")).astype(np.int32)
  # imgaug's range (-50, 50) is in its 0..180 hue units; PIL's hue spans 0..255.
  hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51) * 255 / 180)) % 256
  hsv[..., 1] = np.clip(hsv[..., 1] + rng.integers(-50, 51), 0, 255)
  return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))


def _solarize(rng, x):
  if rng.random() >= 0.5:
    return x
  return np.where(x >= rng.integers(32, 129), 255 - x, x).astype(np.uint8)


def _posterize(rng, x):
  return np.asarray(ImageOps.posterize(Image.fromarray(x), int(rng.integers(1, 9))))


def _invert(rng, x):
  return (255 - x).astype(np.uint8)


def _autocontrast(rng, x):
  return np.asarray(ImageOps.autocontrast(Image.fromarray(x)))


def _equalize(rng, x):
  return np.asarray(ImageOps.equalize(Image.fromarray(x)))


def _affine_rotate(rng, x):
  return np.round(rotate(x.astype(np.float32), rng.uniform(-45, 45))).astype(np.uint8)


AUGMENTERS = (_gamma_contrast, _multiply_add_brightness, _sharpness, _hue_saturation, _solarize,
              _posterize, _invert, _autocontrast, _equalize, _affine_rotate)


def augment_texture(rng: np.random.Generator, texture: np.ndarray, count: int = 3) -> np.ndarray:
  """Applies `count` distinct augmenters, drawn without replacement, in sequence."""
  for i in rng.choice(len(AUGMENTERS), size=count, replace=False):
    texture = AUGMENTERS[i](rng, texture)
  return texture


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
  anomaly_prob: float = 0.5  # share of samples that get an anomaly
  rotate_prob: float = 0.3  # share of normal images first rotated by U(-90, 90) degrees
  beta_max: float = 0.8  # opacity of the original under the texture: beta ~ U[0, beta_max)
  perlin_max_scale_log2: int = 5
  num_augmenters: int = 3


def synthesize(rng: np.random.Generator, image: np.ndarray, texture: np.ndarray,
               config: SynthesisConfig) -> dict[str, np.ndarray]:
  """One DRAEM training sample from a clean uint8 image and a uint8 source texture.

  Returns float32 `image` (the reconstruction target), `augmented` (the network input),
  `mask` (H, W) and the scalar `has_anomaly`.
  """
  size = image.shape[0]
  clean = image.astype(np.float32) / 255.0
  if rng.random() < config.rotate_prob:
    clean = np.clip(rotate(clean, rng.uniform(-90, 90)), 0.0, 1.0)
  mask = np.zeros((size, size), np.float32)
  augmented = clean
  if rng.random() < config.anomaly_prob:
    mask = perlin_mask(rng, size, config.perlin_max_scale_log2).astype(np.float32)
    source = augment_texture(rng, texture, config.num_augmenters).astype(np.float32) / 255.0
    beta = rng.uniform(0.0, config.beta_max)
    m = mask[..., None]
    augmented = clean * (1 - m) + (1 - beta) * source * m + beta * clean * m
  return {
      "image": clean,
      "augmented": augmented.astype(np.float32),
      "mask": mask,
      "has_anomaly": np.float32(mask.any()),
  }
