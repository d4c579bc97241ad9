"""grain pipelines: the synthesised training stream, from the config to this process's batches.

The training stream is a grain MapDataset over global sample indices g = step * batch + k.
Sample g belongs to epoch g // N (N training images); its image is that epoch's seeded
permutation at g % N and its randomness comes from np.random.default_rng((seed, epoch, g % N)),
so a batch is a pure function of (seed, step): the number of worker processes never changes the
data. With several JAX processes, each synthesises only its block of every global batch (its rows,
and its runs when several are trained at once), so the global batch is the same for any
number of processes. Runs stacked in one program (runs.py) each have their own stream, from
their own seed and synthesis settings. The iterator's state is checkpointed with the model; a
checkpoint without it resumes by slicing the dataset at its step.

Samples travel as uint8 (images rounded to 1/255, masks 0/1): a quarter of float32's bytes
through the workers' shared memory and onto the devices, which doubled the throughput of 2
workers on 2 cores (bench/synthesis.py). `decode` turns a batch back into float32 on device.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import multiprocessing.util
import os
import signal
import threading
import time
from typing import Sequence

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from grain._src.python.ipc import shared_memory_array
from jax.sharding import Mesh

from pouta_jax import runs, sharding
from pouta_jax.data.folder import (
  CategoryFolder,
  TestSample,
  load_image_cached,
  load_test_sample_cached,
)
from pouta_jax.data.synthesis import SynthesisConfig, synthesize
from pouta_jax.data.textures import FolderTextures, ProceduralTextures, texture_source


@dataclasses.dataclass(frozen=True)
class SynthesizedSample:
  """Maps a global sample index to one synthesised training sample (runs in grain workers)."""

  train_paths: tuple  # file paths, or records of a built TFDS dataset
  textures: FolderTextures | ProceduralTextures
  image_size: int
  synthesis: SynthesisConfig
  seed: int
  real_anomalies: tuple[TestSample, ...] = ()  # defects to paste (CategoryFolder's)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self.train_paths)
    epoch, position = divmod(int(index), n)
    order = np.random.default_rng((self.seed, epoch)).permutation(n)
    rng = np.random.default_rng((self.seed, epoch, position))
    image = load_image_cached(self.train_paths[order[position]], self.image_size)
    texture = self.textures.sample(rng, self.image_size)
    real = tuple(load_test_sample_cached(s, self.image_size) for s in self.real_anomalies)
    return encode(synthesize(rng, image, texture, self.synthesis, real))


# Sample keys that hold images in [0, 1]; every other key holds 0/1 values.
IMAGE_KEYS = ("image", "augmented")


def encode(sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A synthesised float sample as uint8: images x 255 rounded, masks and flags as 0/1."""
  return {
    key: np.rint(value * 255.0 if key in IMAGE_KEYS else value).astype(np.uint8)
    for key, value in sample.items()
  }


def decode(batch: dict) -> dict:
  """float32 batch of an `encode`d one (inside the jitted step); float inputs pass unchanged."""

  def to_float(key, value):
    if value.dtype != jnp.uint8:
      return value
    value = value.astype(jnp.float32)
    return value / 255.0 if key in IMAGE_KEYS else value

  return {key: to_float(key, value) for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class BatchBlock:
  """Local sample index -> one sample of this process's block of every global batch.

  A global batch holds `batch_size` rows per category; this process synthesises rows
  [first_row, first_row + num_rows) of the categories whose samplers are in `samples`, category
  by category. One category and all rows: the whole batch of a single-process run.
  """

  samples: tuple[SynthesizedSample, ...]
  batch_size: int
  first_row: int
  num_rows: int

  @property
  def per_step(self) -> int:
    return len(self.samples) * self.num_rows

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    step, rest = divmod(int(index), self.per_step)
    category, row = divmod(rest, self.num_rows)
    return self.samples[category](step * self.batch_size + self.first_row + row)


# How far each process reads ahead. grain's default (16 threads, 500 elements) made every worker
# buffer hundreds of batches (1 GB per worker at 256 px) and held 2 workers to 200 samples/s on
# 2 cores, less than one process; one thread and two batches per worker (the processes are the
# parallelism) let them scale (bench/synthesis.py, bench/README.md). In-process, two threads
# overlap synthesis with the train step.
WORKER_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
IN_PROCESS_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

# How long a worker outlives a SIGTERM or SIGINT sent to its whole process group (a scheduler's
# preemption, Ctrl-C), waiting for its parent to save the checkpoint and then stop it.
WORKER_GRACE_S = 30


# How often a worker checks that its parent is alive.
PARENT_POLL_S = 0.5


def _exit_with(parent: int) -> None:
  """Ends this worker once `parent` is gone (kill -9, OOM): an orphan would hold its memory
  and shared-memory batches forever, since its signals wait for a parent that never comes."""
  while os.getppid() == parent:
    time.sleep(PARENT_POLL_S)
  os._exit(1)


def leave_stopping_to_the_parent(worker_index: int, worker_count: int) -> None:
  """grain worker start-up: a worker that died on the group's signal would leave its finished
  batches in shared memory (a preempted run warned of 4-20 leaked segments). It keeps working
  until its parent, which saves first, stops it and so unlinks them; SIGALRM's default action
  ends it if the parent is gone WORKER_GRACE_S later. A parent that dies without a signal to
  the group (kill -9) ends it within PARENT_POLL_S (a watchdog on the parent's pid: the
  parent-death signal would follow the thread that started the worker, not the process)."""
  del worker_index, worker_count
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: signal.alarm(WORKER_GRACE_S))
  threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def train_batches(
  block: BatchBlock, num_steps: int, start_step: int = 0, num_workers: int = 0
) -> grain.IterDataset:
  """This process's block of the batches of steps [start_step, num_steps), flattened to one
  leading dim, synthesised in `num_workers` processes."""
  dataset = (
    grain.MapDataset.range(0, num_steps * block.per_step)
    .map(block)
    .batch(block.per_step, drop_remainder=True)
  )[start_step:]
  iterable = dataset.to_iter_dataset(WORKER_READ if num_workers > 0 else IN_PROCESS_READ)
  if num_workers > 0:
    _release_at_exit()
    iterable = iterable.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers),
      worker_init_fn=leave_stopping_to_the_parent,
    )
  return iterable


def batch_shape(config: ml_collections.ConfigDict, rows: int = 0) -> tuple[int, int]:
  """The leading dims of a global batch: (runs, batch), with `rows` runs where the mesh pads
  them (sharding.mesh_rows)."""
  return (max(runs.count(config), rows), config.data.batch_size)


def synthesized_sample(
  config: ml_collections.ConfigDict,
  folder: CategoryFolder,
  textures: FolderTextures | ProceduralTextures,
) -> SynthesizedSample:
  """One run's sampler: its folder, seed, synthesis settings and anomaly source (`textures`,
  from its data.anomaly_source)."""
  return SynthesizedSample(
    train_paths=tuple(folder.train),
    textures=textures,
    image_size=config.data.image_size,
    synthesis=SynthesisConfig(
      **{f.name: config.data[f.name] for f in dataclasses.fields(SynthesisConfig)}
    ),
    seed=config.train.seed,
    real_anomalies=folder.real_anomalies,
  )


def training_batches(
  config: ml_collections.ConfigDict,
  folders: Sequence[CategoryFolder],
  mesh: Mesh,
  num_steps: int,
  start_step: int = 0,
) -> grain.IterDataset:
  """This process's block of every global batch (see `sharding.process_block`); `folders`
  holds each run's data (runs.runs_of), each run its own stream; padding rows of the run axis
  (sharding.mesh_rows) repeat the last run's."""
  num_rows = sharding.mesh_rows(mesh, config)
  program, folders = runs.padded(runs.runs_of(config), num_rows), runs.padded(folders, num_rows)
  # One source per distinct anomaly_source: a texture folder is scanned once, not once per run.
  textures = {
    source: texture_source(source or None, config.data.tfds_data_dir)
    for source in {run.config.data.anomaly_source for run in program}
  }
  samples = tuple(
    synthesized_sample(run.config, folder, textures[run.config.data.anomaly_source])
    for run, folder in zip(program, folders)
  )
  run_rows, rows = sharding.process_block(
    sharding.batch_sharding(mesh), batch_shape(config, num_rows)
  )
  return train_batches(
    BatchBlock(samples[run_rows], config.data.batch_size, rows.start, rows.stop - rows.start),
    num_steps,
    start_step,
    config.data.num_workers,
  )


def close(batches: grain.DatasetIterator) -> None:
  """Stops grain's workers and frees their shared memory. grain's close can fail after a worker
  died; that must not hide the error that ended training."""
  try:
    batches.close()
  except Exception as e:
    logging.warning("closing the data pipeline failed: %s: %s", type(e).__name__, e)
  release_shared_memory()


@functools.cache
def _release_at_exit() -> None:
  """A process started by multiprocessing (the demo's run processes) ends without a last garbage
  collection, and its exit stops grain's unlink thread first (exitpriority 15), so a batch left
  in a reference cycle leaked its segment (the demo's end warned of 1-2): collect and unlink
  before that."""
  multiprocessing.util.Finalize(None, release_shared_memory, exitpriority=20)


def release_shared_memory() -> None:
  """Unlinks the shared memory of every batch no longer referenced, before returning."""
  # The last batches' shared memory is held in reference cycles inside grain's iterators, and
  # grain unlinks it on a thread of its own (one thread, first in first out). Collect, then
  # pass a no-op through that thread: it returns once every unlink queued before is done, so a
  # process that ends now leaks none (a preempted run left 20 behind otherwise).
  gc.collect()
  deleter = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
  if deleter is not None:
    deleter.apply(lambda: None)
