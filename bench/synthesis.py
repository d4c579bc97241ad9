"""DRAEM anomaly synthesis: our grain pipeline against anomalib's PerlinAnomalyGenerator.

    .venv/bin/python bench/synthesis.py [--image_size=256] [--num_workers=2] [--repeats=3]

Both sides synthesise DRAEM samples (Perlin mask, 3 augmenters on a DTD-like texture, blend)
from the same normal images and texture folder, written to a temporary folder first. Ours: the
training pipeline with `num_workers` grain worker processes (and, for a per-core comparison,
in-process; samples leave the pipeline as uint8); anomalib: its generator on a batch of loaded
images, in the training process, as its DRAEM runs it. Samples/s, median of turns taken in
alternation (each side in its own process). Each of our turns starts a fresh pipeline and times
the batches after every worker is up: a pipeline left open would prefetch while the other side
runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import harness
import numpy as np
from absl import app, flags
from PIL import Image

from pouta_jax.data import pipeline
from pouta_jax.data.synthesis import SynthesisConfig
from pouta_jax.data.textures import FolderTextures

NUM_IMAGES = 16
NUM_TEXTURES = 8
BATCH = 8
OURS_BATCHES_PER_TURN = 32
PEER_BATCHES_PER_TURN = 8


def write_inputs(root: Path, size: int) -> tuple[list[str], Path]:
  """Normal images (smooth noise) and a DTD-layout texture folder of larger JPEGs."""
  rng = np.random.default_rng(0)
  images = []
  for i in range(NUM_IMAGES):
    base = rng.random((size // 8, size // 8, 3)) * 255
    image = Image.fromarray(base.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    images.append(str(root / f"normal_{i:02d}.png"))
    image.save(images[-1])
  textures = root / "dtd" / "images" / "banded"
  textures.mkdir(parents=True)
  for i in range(NUM_TEXTURES):
    Image.fromarray((rng.random((size + 64, size + 96, 3)) * 255).astype(np.uint8)).save(
      textures / f"banded_{i:04d}.jpg", quality=90
    )
  return images, root / "dtd"


def ours(
  images: list[str], textures: str, size: int, workers: int
) -> tuple[Callable[[], float], dict]:
  sample = pipeline.SynthesizedSample(
    tuple(images), FolderTextures.from_root(textures), size, SynthesisConfig(), seed=0
  )
  block = pipeline.BatchBlock((sample,), BATCH, 0, BATCH)

  def run() -> float:
    batches = iter(pipeline.train_batches(block, num_steps=10**6, num_workers=workers))
    for _ in range(2 * max(workers, 1)):  # every worker started: steady state from here
      next(batches)
    start = time.perf_counter()
    for _ in range(OURS_BATCHES_PER_TURN):
      next(batches)
    seconds = time.perf_counter() - start
    batches.close()
    return seconds

  return run, {"samples": OURS_BATCHES_PER_TURN * BATCH}


def peer(images: list[str], textures: str, size: int) -> tuple[Callable[[], None], dict]:
  torch = harness.require_peer()
  from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator

  torch.manual_seed(0)
  generator = PerlinAnomalyGenerator(anomaly_source_path=textures, blend_factor=(0.1, 1.0))
  batch = torch.stack(
    [
      torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0).permute(
        2, 0, 1
      )
      for p in images[:BATCH]
    ]
  )

  def run() -> None:
    for _ in range(PEER_BATCHES_PER_TURN):
      generator(batch)

  return run, {"samples": PEER_BATCHES_PER_TURN * BATCH}


def run(size: int, workers: int, repeats: int) -> harness.Report:
  harness.require_peer()
  with tempfile.TemporaryDirectory() as tmp:
    images, textures = write_inputs(Path(tmp), size)
    results = harness.interleaved(
      {
        f"pouta_jax ({workers} workers)": (ours, (images, str(textures), size, workers)),
        "pouta_jax (in-process)": (ours, (images, str(textures), size, 0)),
        "anomalib": (peer, (images, str(textures), size)),
      },
      repeats,
    )
  rate = {name: facts["samples"] / seconds for name, (seconds, facts) in results.items()}
  lines = ["| contender | samples/s |", "|---|---|"]
  lines += [f"| {name} | {value:.1f} |" for name, value in rate.items()]
  speedup = rate[f"pouta_jax ({workers} workers)"] / rate["anomalib"]
  per_core = rate["pouta_jax (in-process)"] / rate["anomalib"]
  lines += [
    f"| speedup ({workers} workers) | {speedup:.2f}x |",
    f"| speedup in-process | {per_core:.2f}x |",
    "",
    f"{size} px, batches of {BATCH}, {NUM_TEXTURES} DTD-layout JPEG textures; median of "
    f"{repeats} turns after one warm-up turn.",
  ]
  return harness.Report(
    "Anomaly synthesis (DRAEM)",
    lines,
    {"synthesis_speedup": speedup, "synthesis_speedup_in_process": per_core},
  )


def main(argv: list[str]) -> None:
  del argv
  run(_SIZE.value, _WORKERS.value, _REPEATS.value).show()


if __name__ == "__main__":
  # Defined here, not on import: run_all.py imports every script.
  _SIZE = flags.DEFINE_integer("image_size", 256, "Square sample size.")
  _WORKERS = flags.DEFINE_integer("num_workers", 2, "grain worker processes on our side.")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed turns per contender.")
  app.run(main)
