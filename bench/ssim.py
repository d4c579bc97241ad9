"""The SSIM loss's value and gradient: ours (the separable Gaussian as two matrix products per
blur) against the same SSIM with one 11x11 depthwise convolution per blur, measured in one run.

    .venv/bin/python bench/ssim.py [--image_size=64] [--batch_size=8] [--repeats=50]

Both sides are jit-compiled `jax.value_and_grad` of the mean SSIM of a batch of RGB images, as
the DRAEM and POUTA train steps compute it; they are timed in turns after warm-up, and their
values are checked equal first. Ends with `ssim_speedup=<depthwise seconds / ours>`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pouta_jax import objectives

_SIZE = flags.DEFINE_integer("image_size", 64, "Square image size.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per batch.")
_REPEATS = flags.DEFINE_integer("repeats", 50, "Timed calls per side.")


def depthwise_ssim(x: jax.Array, y: jax.Array, size: int = 11, sigma: float = 1.5) -> jax.Array:
  """The peer: each blur one depthwise convolution with the 2-D Gaussian window."""
  taps = np.exp(-((np.arange(size) - size // 2) ** 2) / (2.0 * sigma**2))
  window = np.outer(taps, taps) / np.outer(taps, taps).sum()
  channels = x.shape[-1]
  kernel = jnp.tile(jnp.asarray(window, x.dtype)[:, :, None, None], (1, 1, 1, channels))

  def blur(z: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
      z,
      kernel,
      (1, 1),
      [(size // 2, size // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=channels,
    )

  c1, c2 = 0.01**2, 0.03**2
  mu_x, mu_y = blur(x), blur(y)
  var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
    (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  )
  return jnp.mean(ssim_map)


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  x = jnp.asarray(rng.random(shape, np.float32))
  y = jnp.asarray(rng.random(shape, np.float32))
  sides = {
    "ours": jax.jit(jax.value_and_grad(lambda a, b: objectives.ssim(a, b))),
    "depthwise": jax.jit(jax.value_and_grad(depthwise_ssim)),
  }
  values = {name: jax.block_until_ready(f(x, y)) for name, f in sides.items()}  # compiles
  np.testing.assert_allclose(values["ours"][0], values["depthwise"][0], rtol=1e-5)
  np.testing.assert_allclose(values["ours"][1], values["depthwise"][1], rtol=1e-3, atol=1e-8)
  times = {name: [] for name in sides}
  for _ in range(_REPEATS.value):  # interleaved, so drifts in machine load hit both alike
    for name, f in sides.items():
      start = time.perf_counter()
      jax.block_until_ready(f(x, y))
      times[name].append(time.perf_counter() - start)
  ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
  print(
    f"SSIM value and gradient, {shape[0]} images of {shape[1]}x{shape[2]}x3, "
    f"{jax.default_backend()}: ours {ms['ours']:.2f} ms, depthwise convolution "
    f"{ms['depthwise']:.2f} ms (medians of {_REPEATS.value})"
  )
  print(f"ssim_speedup={ms['depthwise'] / ms['ours']:.1f}")


if __name__ == "__main__":
  app.run(main)
