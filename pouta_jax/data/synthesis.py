"""Anomaly synthesis in vectorised numpy: DRAEM's Perlin masks, texture augmenters and blending
("unseen" anomalies), and real defects pasted onto normal images ("seen" ones, PRN).

Every function takes its `np.random.Generator`, so a sample is a pure function of the seed it is
built from (see pipeline.py). The Perlin noise follows Perlin's improved noise (2002): random unit
gradients on a lattice, quintic fade; see third_party/README.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage, special


def _fade(t: np.ndarray) -> np.ndarray:
  return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(rng: np.random.Generator, size: int, res: tuple[int, int]) -> np.ndarray:
  """Single-octave 2-D gradient noise (size, size) float32 with `res` lattice cells per axis.

  When the cells tile the image exactly (the usual case: sizes are multiples of 32), every cell
  has the same fractional coordinates, so each corner's contribution is a broadcast over
  (cells_y, pixels_y, cells_x, pixels_x) instead of a gather per pixel.
  """
  ry, rx = res
  angles = 2 * np.pi * rng.random((ry + 1, rx + 1))
  gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
  if size % ry or size % rx:
    y, x = np.arange(size) * ry / size, np.arange(size) * rx / size
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi).astype(np.float32)[:, None], (x - xi).astype(np.float32)[None, :]

    def grid(g, dy, dx):
      return g[(yi + dy)[:, None], (xi + dx)[None, :]]
  else:
    fy = (np.arange(size // ry) * ry / size).astype(np.float32)[None, :, None, None]
    fx = (np.arange(size // rx) * rx / size).astype(np.float32)[None, None, None, :]

    def grid(g, dy, dx):
      return g[dy : dy + ry, dx : dx + rx][:, None, :, None]

  def corner(dy: int, dx: int) -> np.ndarray:
    return grid(gy, dy, dx) * (fy - dy) + grid(gx, dy, dx) * (fx - dx)

  u, v = _fade(fy), _fade(fx)
  top = corner(0, 0) * (1 - v) + corner(0, 1) * v
  bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
  return (np.sqrt(np.float32(2)) * (top * (1 - u) + bottom * u)).reshape(size, size)


def _inside_rotated(height: int, width: int, degrees: float) -> np.ndarray:
  """Output pixels whose source point lies in the input: scipy.ndimage.rotate's constant mode.

  Computed with scipy's own matrix, offset and order of operations, so the decision on the rim
  of the rotated square is scipy's.
  """
  c, s = special.cosdg(degrees), special.sindg(degrees)
  centre = (np.array([height, width]) - 1) / 2
  offset = centre - np.array([[c, s], [-s, c]]) @ centre
  rows = np.arange(height, dtype=np.float64)[:, None]
  cols = np.arange(width, dtype=np.float64)[None, :]
  source_row = (c * rows + s * cols) + offset[0]
  source_col = (-s * rows + c * cols) + offset[1]
  return (
    (source_row >= 0) & (source_row <= height - 1) & (source_col >= 0) & (source_col <= width - 1)
  )


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """Rotation about the centre, same size, bilinear, zeros outside: float (H, W) or (H, W, C).

  The result of scipy.ndimage.rotate(order=1, mode="constant") in about 0.6 of its time: Pillow
  interpolates each channel, then scipy's rule zeroes the rim Pillow would interpolate against
  the edge (equal to float32 rounding, tested against scipy).
  """
  channels = image[..., None] if image.ndim == 2 else image
  out = np.stack(
    [
      np.asarray(
        Image.fromarray(np.ascontiguousarray(channels[..., c], np.float32), "F").rotate(
          degrees, resample=Image.BILINEAR
        )
      )
      for c in range(channels.shape[-1])
    ],
    axis=-1,
  )
  out *= _inside_rotated(*image.shape[:2], degrees)[..., None]
  return out.reshape(image.shape)


def perlin_mask(
  rng: np.random.Generator, size: int, max_scale_log2: int = 5, threshold: float = 0.5
) -> np.ndarray:
  """DRAEM's anomaly mask: noise at 2^k cells per axis (k in [0, max]), rotated, thresholded."""
  res = tuple(2 ** rng.integers(0, max_scale_log2 + 1, size=2))
  noise = rotate(perlin_noise(rng, size, res), rng.uniform(-90, 90))
  return noise > threshold


# --- The ten augmenters of DRAEM (uint8 HxWx3 in, uint8 out); three are applied per sample.


def _gamma_contrast(rng, x):
  gamma = rng.uniform(0.5, 2.0, size=3)
  table = np.round(255 * (np.arange(256)[None, :] / 255.0) ** gamma[:, None]).astype(np.uint8)
  return np.asarray(Image.fromarray(x).point(table.ravel().tolist()))  # a table per channel


def _multiply_add_brightness(rng, x):
  y = x.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def _sharpness(rng, x):
  return np.asarray(ImageEnhance.Sharpness(Image.fromarray(x)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(rng, x):
  levels = np.arange(256)
  # imgaug's range (-50, 50) is in its 0..180 hue units; PIL's hue spans 0..255.
  hue = (levels + int(rng.integers(-50, 51) * 255 / 180)) % 256
  saturation = np.clip(levels + rng.integers(-50, 51), 0, 255)
  table = np.concatenate([hue, saturation, levels]).tolist()  # H, S, V
  return np.asarray(Image.fromarray(x).convert("HSV").point(table).convert("RGB"))


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


AUGMENTERS = (
  _gamma_contrast,
  _multiply_add_brightness,
  _sharpness,
  _hue_saturation,
  _solarize,
  _posterize,
  _invert,
  _autocontrast,
  _equalize,
  _affine_rotate,
)


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
  # With real anomalies given: the share of anomalies pasted from them rather than synthesised.
  real_anomaly_prob: float = 0.5
  # TEXTURE_COLORS: "rgb" blends the texture as it is (DRAEM's); "match" turns it grey on a
  # grayscale image, whose real defects are grey too: a coloured one is told apart by its
  # colour alone, which no real defect of such a surface has.
  texture_color: str = "rgb"


TEXTURE_COLORS = ("rgb", "match")


# A border whose colours spread less than this (90th percentile of the distance to their median,
# RGB in [0, 1]) is a uniform background around an object; a texture's border spreads more.
UNIFORM_BORDER = 0.1


def _border(image: np.ndarray) -> np.ndarray:
  """(4 * size, C): the pixels of the image's four edges."""
  return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def background_colour(image: np.ndarray) -> np.ndarray:
  """(C,): the median colour of the image's border, an object's background."""
  return np.median(_border(image), axis=0)


def foreground_mask(image: np.ndarray) -> np.ndarray:
  """(H, W) bool: where the object is, for float RGB images of an object on a uniform background;
  all True for textures (no uniform border) or when nothing stands out from the background."""
  border, background = _border(image), background_colour(image)
  spread = np.percentile(np.linalg.norm(border - background, axis=-1), 90)
  everywhere = np.ones(image.shape[:2], bool)
  if spread > UNIFORM_BORDER:
    return everywhere
  distance = np.linalg.norm(image - background, axis=-1)
  foreground = ndimage.binary_fill_holes(
    ndimage.binary_opening(distance > max(3 * spread, 0.05), iterations=2)
  )
  return foreground if foreground.mean() > 0.01 else everywhere


def paste_anomaly(
  rng: np.random.Generator, clean: np.ndarray, defect_image: np.ndarray, defect_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """A real defect moved onto a clean image: the defect's pixels (uint8 image, bool mask) turned
  by a random quarter turn and flip, scaled in brightness by U(0.8, 1.2), centred on a random
  foreground pixel of `clean` (float RGB) and cut to the foreground. Returns the image and mask."""
  turns, flip = int(rng.integers(4)), rng.random() < 0.5
  image, mask = np.rot90(defect_image, turns), np.rot90(defect_mask, turns)
  if flip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  image = np.clip(image.astype(np.float32) / 255.0 * rng.uniform(0.8, 1.2), 0.0, 1.0)
  foreground = foreground_mask(clean)
  size = clean.shape[0]
  pasted = np.zeros((size, size), np.float32)
  ys, xs = np.nonzero(mask)
  if len(ys):
    y0, x0, h, w = ys.min(), xs.min(), ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
    candidates = np.argwhere(foreground)
    cy, cx = candidates[rng.integers(len(candidates))]
    top, left = cy - h // 2, cx - w // 2
    # The part of the defect's box that lands inside the image.
    ty0, tx0 = max(top, 0), max(left, 0)
    ty1, tx1 = min(top + h, size), min(left + w, size)
    source = (slice(y0 + ty0 - top, y0 + ty1 - top), slice(x0 + tx0 - left, x0 + tx1 - left))
    region = (slice(ty0, ty1), slice(tx0, tx1))
    moved = np.zeros_like(clean)
    moved[region] = image[source]
    pasted[region] = mask[source]
    pasted *= foreground
    clean = clean * (1 - pasted[..., None]) + moved * pasted[..., None]
  return clean.astype(np.float32), pasted


# ITU-R 601-2 luma, as Pillow's convert("L").
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def is_grayscale(image: np.ndarray) -> bool:
  """Whether an RGB image's three channels are equal (a grayscale image read as RGB)."""
  return bool(
    np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
  )


def synthesize(
  rng: np.random.Generator,
  image: np.ndarray,
  texture: np.ndarray,
  config: SynthesisConfig,
  real_anomalies: tuple[tuple[np.ndarray, np.ndarray], ...] = (),
) -> dict[str, np.ndarray]:
  """One training sample from a clean uint8 image and a uint8 source texture (and, optionally,
  real defects as (uint8 image, bool mask) pairs to paste).

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
    if real_anomalies and rng.random() < config.real_anomaly_prob:
      defect_image, defect_mask = real_anomalies[int(rng.integers(len(real_anomalies)))]
      augmented, mask = paste_anomaly(rng, clean, defect_image, defect_mask)
    else:
      augmented, mask = _texture_anomaly(rng, clean, texture, config)
  return {
    "image": clean,
    "augmented": augmented.astype(np.float32),
    "mask": mask,
    "has_anomaly": np.float32(mask.any()),
  }


def _texture_anomaly(
  rng: np.random.Generator, clean: np.ndarray, texture: np.ndarray, config: SynthesisConfig
) -> tuple[np.ndarray, np.ndarray]:
  """DRAEM's anomaly: an augmented texture blended into a thresholded Perlin mask."""
  mask = perlin_mask(rng, clean.shape[0], config.perlin_max_scale_log2).astype(np.float32)
  source = augment_texture(rng, texture, config.num_augmenters).astype(np.float32) / 255.0
  if config.texture_color == "match" and is_grayscale(clean):
    source = np.repeat(source @ LUMA[:, None], 3, axis=-1)
  beta = rng.uniform(0.0, config.beta_max)
  # clean (1 - m) + m ((1 - beta) source + beta clean), in three passes over the image.
  return clean + (np.float32(1 - beta) * mask[..., None]) * (source - clean), mask
