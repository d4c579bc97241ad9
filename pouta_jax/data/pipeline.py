"""grain pipelines: the synthesised training stream and the in-memory test set.

The training stream is a grain MapDataset over global sample indices g = step * batch + k.
Sample g belongs to epoch g // N (N training images); its image is that epoch's seeded
permutation at g % N and its randomness comes from np.random.default_rng((seed, epoch, g % N)),
so a batch is a pure function of (seed, step): the number of worker processes never changes the
data, and resuming at step s is slicing the dataset at s.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from pouta_jax.data.folder import load_image_cached
from pouta_jax.data.synthesis import SynthesisConfig, synthesize
from pouta_jax.data.textures import FolderTextures, ProceduralTextures


@dataclasses.dataclass(frozen=True)
class SynthesizedSample:
  """Maps a global sample index to one synthesised training sample (runs in grain workers)."""

  train_paths: tuple[str, ...]
  textures: FolderTextures | ProceduralTextures
  image_size: int
  synthesis: SynthesisConfig
  seed: int

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self.train_paths)
    epoch, position = divmod(int(index), n)
    order = np.random.default_rng((self.seed, epoch)).permutation(n)
    rng = np.random.default_rng((self.seed, epoch, position))
    image = load_image_cached(self.train_paths[order[position]], self.image_size)
    texture = self.textures.sample(rng, self.image_size)
    return synthesize(rng, image, texture, self.synthesis)


def train_batches(sample_fn: SynthesizedSample, batch_size: int, num_steps: int,
                  start_step: int = 0, num_workers: int = 0) -> grain.IterDataset:
  """Batches for steps [start_step, num_steps), synthesised in `num_workers` processes."""
  dataset = (grain.MapDataset.range(0, num_steps * batch_size)
             .map(sample_fn)
             .batch(batch_size, drop_remainder=True))[start_step:]
  iterable = dataset.to_iter_dataset()
  if num_workers > 0:
    iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iterable
