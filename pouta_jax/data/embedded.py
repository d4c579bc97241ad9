"""The embedded default dataset: procedural, MVTec-AD-style, with real defect masks.

Four categories, two textures and two objects, one grayscale; each has three defect types drawn
by geometry (polylines, random walks, polygons, soft blobs), never by the Perlin-mask texture
blend used for training synthesis, so a score on it measures generalisation to unseen defects.
Defect size and contrast vary per image and some defects are deliberately faint.

Everything is a pure function of (seed, category, split, index); `build` writes the usual layout
    <root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>/*_mask.png}
into a temporary folder and renames it into place, so an interrupted build leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pouta_jax import errors

Array = np.ndarray


# ----------------------------------------------------------------------------- normal images


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> Array:
  """Gaussian-filtered white noise scaled to unit standard deviation."""
  noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
  return noise / (noise.std() + 1e-8)


def _weave(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
  """Plain-weave fabric: alternating warp and weft threads with jittered colour and phase."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  period = rng.uniform(7.5, 8.5)
  phase = rng.uniform(0, period, size=2)
  u, v = (xx + phase[0]) / period, (yy + phase[1]) / period
  warp = 0.5 + 0.5 * np.cos(2 * np.pi * (u - np.floor(u) - 0.5))
  weft = 0.5 + 0.5 * np.cos(2 * np.pi * (v - np.floor(v) - 0.5))
  over = (np.floor(u) + np.floor(v)) % 2 == 0
  shade = np.where(over, 0.55 + 0.35 * weft, 0.55 + 0.35 * warp)
  shade = shade + 0.04 * _smooth_noise(rng, size, 1.0) + 0.03 * _smooth_noise(rng, size, 12.0)
  base = np.array([0.25, 0.42, 0.70]) * rng.uniform(0.95, 1.05, size=3)
  return np.clip(shade[..., None] * base, 0, 1), np.ones((size, size), bool)


def _granite(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
  """Grayscale speckled stone: multi-scale noise plus sparse dark and light grains."""
  tone = 0.55 + 0.06 * _smooth_noise(rng, size, 8.0) + 0.05 * _smooth_noise(rng, size, 2.0)
  grains = rng.random((size, size))
  tone = tone - 0.2 * (grains < 0.02) + 0.15 * (grains > 0.99)
  tone = ndimage.gaussian_filter(tone, 0.6) + 0.02 * rng.standard_normal((size, size))
  return np.clip(tone, 0, 1)[..., None], np.ones((size, size), bool)


def _object_pose(rng: np.random.Generator, size: int) -> tuple[Array, Array, float]:
  """Centre-relative coordinates of every pixel under a small random shift and rotation."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  cy, cx = size / 2 + rng.uniform(-3, 3, size=2)
  angle = rng.uniform(-0.15, 0.15)
  dy, dx = yy - cy, xx - cx
  return (np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy, angle)


def _washer(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
  """Brushed-metal ring on a dark mat, lit from the top left."""
  x, y, _ = _object_pose(rng, size)
  r = np.hypot(x, y)
  outer, inner = 0.38 * size * rng.uniform(0.98, 1.02), 0.17 * size
  ring = (r < outer) & (r > inner)
  theta = np.arctan2(y, x)
  metal = 0.62 + 0.15 * np.cos(theta + 2.3) + 0.05 * np.sin(r * 0.9)
  metal = metal + 0.03 * _smooth_noise(rng, size, 0.7)
  background = 0.12 + 0.02 * _smooth_noise(rng, size, 3.0)
  gray = np.where(ring, metal, background)
  colour = np.stack([gray, gray * 0.97, gray * 0.92], axis=-1)
  return np.clip(ndimage.gaussian_filter(colour, (0.7, 0.7, 0)), 0, 1), ring


def _pill(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
  """White oblong pill with red speckles, on black."""
  x, y, _ = _object_pose(rng, size)
  half_len, radius = 0.3 * size, 0.15 * size
  body = np.hypot(np.maximum(np.abs(x) - half_len + radius, 0), y) < radius
  shade = 0.88 - 0.12 * (np.abs(y) / radius) ** 2 + 0.02 * _smooth_noise(rng, size, 2.0)
  colour = np.stack([shade, shade * 0.96, shade * 0.9], axis=-1)
  speckle = (rng.random((size, size)) < 0.01) & body
  speckle = ndimage.binary_dilation(speckle, iterations=1)
  colour[speckle] = [0.75, 0.2, 0.18]
  background = 0.05 + 0.01 * rng.standard_normal((size, size))
  colour = np.where(body[..., None], colour, background[..., None])
  return np.clip(ndimage.gaussian_filter(colour, (0.6, 0.6, 0)), 0, 1), body


# ----------------------------------------------------------------------------- defects


def _draw_mask(size: int, draw_fn: Callable[[ImageDraw.ImageDraw], None]) -> Array:
  canvas = Image.new("L", (size, size), 0)
  draw_fn(ImageDraw.Draw(canvas))
  return np.asarray(canvas) > 127


def _point_in(rng: np.random.Generator, region: Array, margin: int) -> Array:
  """A random (x, y) pixel of `region` at least `margin` pixels inside it."""
  inner = ndimage.binary_erosion(region, iterations=margin) if margin else region
  ys, xs = np.nonzero(inner if inner.any() else region)
  i = rng.integers(len(xs))
  return np.array([xs[i], ys[i]], np.float64)


def _scratch(rng, size, region):
  """A thin curved line, brighter or darker than the surface."""
  start = _point_in(rng, region, 4)
  length = rng.uniform(0.15, 0.45) * size
  heading = rng.uniform(0, 2 * np.pi)
  turn = rng.normal(0, 0.08, size=12).cumsum()
  steps = np.stack([np.cos(heading + turn), np.sin(heading + turn)], -1) * length / 12
  points = start + np.vstack([[0, 0], steps.cumsum(0)])
  width = int(rng.integers(2, 5))
  mask = _draw_mask(size, lambda d: d.line([tuple(p) for p in points], fill=255, width=width))
  tone = rng.choice([0.95, 0.05])
  return mask & region, np.array([tone] * 3), rng.uniform(0.35, 0.9)


def _crack(rng, size, region):
  """A dark, branching random walk."""
  lines = []
  start = _point_in(rng, region, 4)
  for branch in range(int(rng.integers(1, 4))):
    heading = rng.uniform(0, 2 * np.pi)
    point = start if branch == 0 else lines[-1][int(rng.integers(len(lines[-1])))]
    path = [point]
    for _ in range(int(rng.integers(6, 14))):
      heading += rng.normal(0, 0.6)
      point = point + rng.uniform(1.5, 3.5) * np.array([np.cos(heading), np.sin(heading)])
      path.append(point)
    lines.append(path)
  mask = _draw_mask(
    size, lambda d: [d.line([tuple(p) for p in line], fill=255, width=3) for line in lines]
  )
  return mask & region, np.zeros(3), rng.uniform(0.5, 0.9)


def _blob(rng, size, region, radius_range):
  """An irregular polygon around a random centre."""
  centre = _point_in(rng, region, int(radius_range[0]))
  n = int(rng.integers(7, 13))
  angles = np.sort(rng.uniform(0, 2 * np.pi, n))
  radii = rng.uniform(*radius_range) * rng.uniform(0.6, 1.0, n)
  poly = centre + np.stack([np.cos(angles), np.sin(angles)], -1) * radii[:, None]
  return _draw_mask(size, lambda d: d.polygon([tuple(p) for p in poly], fill=255)) & region


def _contamination(rng, size, region):
  """A foreign particle of a colour that does not belong to the surface."""
  mask = _blob(rng, size, region, (0.04 * size, 0.12 * size))
  colour = rng.choice([[0.45, 0.3, 0.1], [0.1, 0.45, 0.15], [0.5, 0.5, 0.1], [0.1, 0.1, 0.1]])
  return mask, np.array(colour), rng.uniform(0.4, 0.95)


def _stain(rng, size, region):
  """A faint, soft-edged discolouration; some are barely visible."""
  mask = _blob(rng, size, region, (0.06 * size, 0.14 * size))
  colour = rng.choice([[0.6, 0.45, 0.2], [0.3, 0.3, 0.3], [0.7, 0.7, 0.75]])
  return mask, np.array(colour), rng.uniform(0.2, 0.5)


def _hole(rng, size, region):
  """A punched hole showing a dark backing."""
  mask = _blob(rng, size, region, (0.03 * size, 0.09 * size))
  return mask, np.array([0.03, 0.03, 0.03]), 1.0


def _missing_piece(rng, size, region):
  """A chunk broken off the object's rim, showing the background."""
  rim = region & ~ndimage.binary_erosion(region, iterations=3)
  return _blob(rng, size, rim, (0.08 * size, 0.16 * size)) & region, None, 1.0


DEFECTS = {
  "scratch": _scratch,
  "crack": _crack,
  "contamination": _contamination,
  "stain": _stain,
  "hole": _hole,
  "missing_piece": _missing_piece,
}


@dataclasses.dataclass(frozen=True)
class Category:
  render: Callable[[np.random.Generator, int], tuple[Array, Array]]
  defects: tuple[str, ...]
  grayscale: bool = False
  texture: bool = True


CATEGORIES = {
  "weave": Category(_weave, ("scratch", "hole", "stain")),
  "granite": Category(_granite, ("crack", "contamination", "stain"), grayscale=True),
  "washer": Category(_washer, ("scratch", "missing_piece", "contamination"), texture=False),
  "pill": Category(_pill, ("crack", "contamination", "stain"), texture=False),
}


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
  return np.random.default_rng([seed] + [zlib.crc32(str(k).encode()) for k in keys])


def render_normal(category: str, seed: int, split: str, index: int, size: int) -> Array:
  image, _ = CATEGORIES[category].render(_rng(seed, category, split, index), size)
  return image


def render_defect(
  category: str, defect: str, seed: int, index: int, size: int
) -> tuple[Array, Array]:
  """A defective test image (H, W, C) in [0, 1] and its boolean mask (H, W)."""
  rng = _rng(seed, category, "test", defect, index)
  cat = CATEGORIES[category]
  image, region = cat.render(rng, size)
  for _ in range(20):  # a defect clipped to nothing is redrawn
    mask, colour, strength = DEFECTS[defect](rng, size, region)
    if mask.sum() >= 4:
      break
  if colour is None:  # missing piece: show the object's background
    fill = np.median(image[~region], axis=0)
    image = np.where(mask[..., None], fill, image)
  else:
    if cat.grayscale:  # no hue to differ by: take the tone opposite to the surface's
      colour = np.full(image.shape[-1], float(image[mask].mean() < 0.5))
    soft = ndimage.gaussian_filter(mask.astype(np.float64), 0.7)
    alpha = (strength * np.maximum(soft, mask))[..., None]
    image = image * (1 - alpha) + colour[: image.shape[-1]] * alpha
  return np.clip(image, 0, 1), mask


# ----------------------------------------------------------------------------- writing


# Bump when the generator's output changes, so existing builds are redone.
GENERATOR_VERSION = 1
# Held by the process building a dataset folder (`build`).
BUILD_LOCK = ".build.lock"


@dataclasses.dataclass(frozen=True)
class BuildSpec:
  """What is built; stored beside the data so a rebuild with other settings is detected."""

  seed: int = 0
  image_size: int = 128
  num_train: int = 60
  num_test_good: int = 12
  num_test_per_defect: int = 8


def _save_png(path: Path, image: Array) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  data = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
  if data.ndim == 3 and data.shape[-1] == 1:
    data = data[..., 0]
  Image.fromarray(data).save(path)


def _write_category(folder: Path, category: str, spec: BuildSpec) -> None:
  size = spec.image_size
  for i in range(spec.num_train):
    _save_png(
      folder / "train" / "good" / f"{i:03d}.png",
      render_normal(category, spec.seed, "train", i, size),
    )
  for i in range(spec.num_test_good):
    _save_png(
      folder / "test" / "good" / f"{i:03d}.png", render_normal(category, spec.seed, "test", i, size)
    )
  for defect in CATEGORIES[category].defects:
    for i in range(spec.num_test_per_defect):
      image, mask = render_defect(category, defect, spec.seed, i, size)
      _save_png(folder / "test" / defect / f"{i:03d}.png", image)
      _save_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(float))


def build(
  root: str | Path, spec: BuildSpec = BuildSpec(), categories: tuple[str, ...] | None = None
) -> Path:
  """Writes the embedded dataset under `root` (skipping categories already built with `spec`).

  Runs started together on a dataset not built yet (a study's first round) build it once: the
  lock makes the others wait, then find it built, rather than replace a folder in use."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  stamp = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
  unknown = [c for c in categories or () if c not in CATEGORIES]
  if unknown:
    raise errors.ConfigError(
      f"unknown embedded categories {unknown}; expected some of {sorted(CATEGORIES)}"
    )
  with open(root / BUILD_LOCK, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or its process dies
    for category in categories or tuple(CATEGORIES):
      target = root / category
      marker = target / "BUILD.json"
      if marker.is_file() and marker.read_text() == stamp:
        continue
      with tempfile.TemporaryDirectory(dir=root, prefix=f".{category}-") as tmp:
        _write_category(Path(tmp), category, spec)
        (Path(tmp) / "BUILD.json").write_text(stamp)
        if target.exists():
          shutil.rmtree(target)
        Path(tmp).rename(target)
        Path(tmp).mkdir()  # TemporaryDirectory cleans up the (now empty) path it made
  return root
