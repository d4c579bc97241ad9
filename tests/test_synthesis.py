import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pouta_jax.data import synthesis, textures


def test_perlin_noise_is_smooth_and_bounded():
  noise = synthesis.perlin_noise(np.random.default_rng(0), 64, (4, 8))
  assert noise.shape == (64, 64)
  assert np.abs(noise).max() <= np.sqrt(2) * 1.0001
  # Zero on the lattice points (gradient noise), smooth in between.
  np.testing.assert_allclose(noise[::16, ::8], 0.0, atol=1e-12)
  assert np.abs(np.diff(noise, axis=1)).max() < 0.5


def test_perlin_mask_scales_cover_the_configured_range():
  rng = np.random.default_rng(0)
  coverage = [synthesis.perlin_mask(rng, 64, 5).mean() for _ in range(50)]
  assert 0 < np.mean(coverage) < 0.5
  assert min(coverage) < max(coverage)  # different scales and thresholds


@pytest.mark.parametrize("index", range(len(synthesis.AUGMENTERS)))
def test_each_augmenter_keeps_shape_and_dtype(index):
  rng = np.random.default_rng(index)
  texture = textures.ProceduralTextures().sample(rng, 32)
  out = synthesis.AUGMENTERS[index](rng, texture)
  assert out.shape == texture.shape and out.dtype == np.uint8


@pytest.mark.parametrize("shape", [(64, 64, 3), (256, 256), (97, 97)])
def test_rotate_equals_scipy(shape):
  rng = np.random.default_rng(len(shape))
  image = rng.random(shape).astype(np.float32)
  for degrees in [0.0, 90.0, -90.0, 45.0, -30.0, *rng.uniform(-90, 90, 20)]:
    expected = ndimage.rotate(
      image, degrees, axes=(1, 0), reshape=False, order=1, mode="constant", cval=0.0
    )
    out = synthesis.rotate(image, degrees)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, expected, atol=1e-6, err_msg=f"{degrees} degrees")
    assert np.array_equal(out == 0, expected == 0)  # the same rim


def test_gamma_and_hue_augmenters_follow_their_formulas():
  """Per-channel lookup tables give what the per-pixel formulas give (the oracles below)."""
  x = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
  for seed in range(20):
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 2.0, size=3)
    expected = np.round(255 * (x / 255.0) ** gamma).astype(np.uint8)
    np.testing.assert_array_equal(
      synthesis._gamma_contrast(np.random.default_rng(seed), x), expected
    )
    rng = np.random.default_rng(seed)
    hsv = np.asarray(Image.fromarray(x).convert("HSV")).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51) * 255 / 180)) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.integers(-50, 51), 0, 255)
    expected = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    np.testing.assert_array_equal(
      synthesis._hue_saturation(np.random.default_rng(seed), x), expected
    )


def test_blend_follows_draem():
  rng = np.random.default_rng(3)
  image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
  texture = textures.ProceduralTextures().sample(rng, 32)
  config = synthesis.SynthesisConfig(anomaly_prob=1.0, rotate_prob=0.0, num_augmenters=0)
  for seed in range(5):
    sample = synthesis.synthesize(np.random.default_rng(seed), image, texture, config)
    clean, aug, mask = sample["image"], sample["augmented"], sample["mask"][..., None]
    np.testing.assert_allclose(clean, image / 255.0, atol=1e-6)
    np.testing.assert_allclose(aug * (1 - mask), clean * (1 - mask), atol=1e-6)
    # Inside the mask: (1 - beta) * texture + beta * image for one beta in [0, 0.8).
    inside = mask[..., 0] > 0
    if inside.any():
      t, c, a = texture[inside] / 255.0, clean[inside], aug[inside]
      beta = np.sum((a - t) * (c - t)) / np.sum((c - t) ** 2)
      assert 0 <= beta < 0.8
      np.testing.assert_allclose(a, (1 - beta) * t + beta * c, atol=1e-4)
    assert sample["has_anomaly"] == float(inside.any())


def test_a_matched_texture_is_grey_on_a_grayscale_image_and_as_it_is_on_a_colour_one():
  rng = np.random.default_rng(4)
  grey = np.repeat((rng.random((32, 32, 1)) * 255).astype(np.uint8), 3, axis=-1)
  colour = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
  texture = textures.ProceduralTextures().sample(rng, 32)
  rgb = synthesis.SynthesisConfig(anomaly_prob=1.0, rotate_prob=0.0, num_augmenters=0)
  match = synthesis.SynthesisConfig(
    anomaly_prob=1.0, rotate_prob=0.0, num_augmenters=0, texture_color="match"
  )
  for seed in range(4):
    as_is = synthesis.synthesize(np.random.default_rng(seed), grey, texture, rgb)
    matched = synthesis.synthesize(np.random.default_rng(seed), grey, texture, match)
    np.testing.assert_array_equal(matched["mask"], as_is["mask"])  # the same draws
    inside = matched["mask"] > 0
    assert synthesis.is_grayscale(matched["augmented"])
    assert inside.any() and not synthesis.is_grayscale(as_is["augmented"])
    # Inside the mask: the texture's luma (Pillow's "L" weights) in place of its colours.
    t = texture[inside].astype(np.float32) / 255.0
    c, a = matched["image"][inside], matched["augmented"][inside]
    luma = np.repeat(t @ synthesis.LUMA[:, None], 3, axis=-1)
    beta = np.sum((a - luma) * (c - luma)) / np.sum((c - luma) ** 2)
    np.testing.assert_allclose(a, (1 - beta) * luma + beta * c, atol=1e-4)
    on_colour = synthesis.synthesize(np.random.default_rng(seed), colour, texture, match)
    expected = synthesis.synthesize(np.random.default_rng(seed), colour, texture, rgb)
    np.testing.assert_array_equal(on_colour["augmented"], expected["augmented"])


def test_normal_samples_are_unchanged():
  image = np.full((32, 32, 3), 100, np.uint8)
  config = synthesis.SynthesisConfig(anomaly_prob=0.0, rotate_prob=0.0)
  sample = synthesis.synthesize(np.random.default_rng(0), image, image, config)
  np.testing.assert_array_equal(sample["augmented"], sample["image"])
  assert sample["mask"].sum() == 0 and sample["has_anomaly"] == 0


def test_synthesis_is_a_function_of_the_generator():
  rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
  image = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
  texture = textures.ProceduralTextures().sample(np.random.default_rng(2), 32)
  a = synthesis.synthesize(rng_a, image, texture, synthesis.SynthesisConfig(anomaly_prob=1.0))
  b = synthesis.synthesize(rng_b, image, texture, synthesis.SynthesisConfig(anomaly_prob=1.0))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_folder_textures_in_dtd_layout(tmp_path):
  from PIL import Image

  for cls in ("banded", "dotted"):
    (tmp_path / "images" / cls).mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "images" / cls / "a.jpg")
  source = textures.texture_source(str(tmp_path))
  assert len(source.paths) == 2
  sample = source.sample(np.random.default_rng(0), 16)
  assert sample.shape == (16, 16, 3) and sample.dtype == np.uint8


def test_folder_textures_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    textures.texture_source(str(tmp_path / "dtd"))
  (tmp_path / "images").mkdir()
  with pytest.raises(ValueError, match="no texture images"):
    textures.texture_source(str(tmp_path))


def test_procedural_textures_vary():
  source = textures.texture_source(None)
  a, b = (source.sample(np.random.default_rng(s), 32) for s in (0, 1))
  assert a.shape == (32, 32, 3) and not np.array_equal(a, b)


def _disc_on_background(size=64, radius=16):
  """A bright disc (the object) on a dark, slightly noisy uniform background; float RGB."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:size, :size]
  disc = (y - size / 2) ** 2 + (x - size / 2) ** 2 < radius**2
  image = 0.1 + 0.01 * rng.standard_normal((size, size, 3))
  image[disc] = 0.8
  return image.astype(np.float32), disc


def test_foreground_is_the_object_on_a_uniform_background_and_everything_on_a_texture():
  image, disc = _disc_on_background()
  foreground = synthesis.foreground_mask(image)
  assert (foreground == disc).mean() > 0.98
  texture = textures.ProceduralTextures().sample(np.random.default_rng(1), 64) / 255.0
  assert synthesis.foreground_mask(texture.astype(np.float32)).all()
  # Nothing stands out from a uniform image: everywhere is allowed.
  assert synthesis.foreground_mask(np.full((32, 32, 3), 0.5, np.float32)).all()


def test_pasted_defect_lands_on_the_object_with_its_own_pixels():
  clean, disc = _disc_on_background()
  defect = np.zeros((64, 64, 3), np.uint8)
  defect_mask = np.zeros((64, 64), bool)
  defect_mask[5:9, 50:56] = True  # a 4 x 6 defect far from the centre
  defect[defect_mask] = (200, 20, 20)
  for seed in range(20):
    augmented, mask = synthesis.paste_anomaly(
      np.random.default_rng(seed), clean, defect, defect_mask
    )
    assert mask.dtype == np.float32 and 0 < mask.sum() <= 24
    assert not (mask.astype(bool) & ~disc).any()  # only on the object
    np.testing.assert_array_equal(augmented[mask == 0], clean[mask == 0])
    red = augmented[mask == 1]
    # The defect's colour, scaled in brightness by U(0.8, 1.2).
    scale = red[:, 0] / (200 / 255)
    assert np.all((scale > 0.79) & (scale < 1.21))
    np.testing.assert_allclose(red[:, 1] / red[:, 0], 20 / 200, rtol=1e-5)


def test_real_anomalies_are_pasted_in_their_share_of_anomalous_samples():
  rng = np.random.default_rng(0)
  image = textures.ProceduralTextures().sample(rng, 32)
  texture = textures.ProceduralTextures().sample(rng, 32)
  defect = np.full((32, 32, 3), 255, np.uint8)
  defect_mask = np.zeros((32, 32), bool)
  defect_mask[10:14, 10:14] = True
  config = synthesis.SynthesisConfig(anomaly_prob=1.0, rotate_prob=0.0, real_anomaly_prob=0.5)
  pasted = 0
  for seed in range(40):
    sample = synthesis.synthesize(
      np.random.default_rng(seed), image, texture, config, ((defect, defect_mask),)
    )
    assert sample["has_anomaly"] == 1
    # A pasted square: 16 pixels at most (a Perlin mask of exactly that shape is unlikely).
    pasted += int(
      sample["mask"].sum() <= 16 and np.all(sample["augmented"][sample["mask"] == 1] >= 0.8 - 1e-6)
    )
  assert 10 <= pasted <= 30
  # Without real anomalies the stream is DRAEM's exactly, whatever real_anomaly_prob says.
  for seed in range(5):
    a = synthesis.synthesize(np.random.default_rng(seed), image, texture, config)
    b = synthesis.synthesize(
      np.random.default_rng(seed),
      image,
      texture,
      synthesis.SynthesisConfig(anomaly_prob=1.0, rotate_prob=0.0),
    )
    np.testing.assert_array_equal(a["augmented"], b["augmented"])


def _perlin_reference(angles, size, res):
  """Gradient noise pixel by pixel: the dot products with the four corners' gradients,
  blended by the quintic fade."""
  ry, rx = res
  out = np.zeros((size, size))
  fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)
  for row in range(size):
    for col in range(size):
      y, x = row * ry / size, col * rx / size
      i, j = int(y), int(x)
      fy, fx = y - i, x - j
      dots = {
        (dy, dx): np.sin(angles[i + dy, j + dx]) * (fy - dy)
        + np.cos(angles[i + dy, j + dx]) * (fx - dx)
        for dy in (0, 1)
        for dx in (0, 1)
      }
      u, v = fade(fy), fade(fx)
      top = dots[0, 0] * (1 - v) + dots[0, 1] * v
      bottom = dots[1, 0] * (1 - v) + dots[1, 1] * v
      out[row, col] = np.sqrt(2) * (top * (1 - u) + bottom * u)
  return out


@pytest.mark.parametrize("size, res", [(16, (2, 4)), (16, (16, 1)), (12, (5, 3))])
def test_perlin_noise_matches_a_per_pixel_reference(size, res):
  noise = synthesis.perlin_noise(np.random.default_rng(3), size, res)
  angles = 2 * np.pi * np.random.default_rng(3).random((res[0] + 1, res[1] + 1))
  assert noise.dtype == np.float32
  np.testing.assert_allclose(noise, _perlin_reference(angles, size, res), atol=1e-5)
