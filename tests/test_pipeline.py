import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pouta_jax.data import folder, pipeline, synthesis, textures

REPO = Path(__file__).resolve().parents[1]


def _sample_fn(dataset_root, seed=0):
  train = folder.scan(dataset_root, "pill").train
  return pipeline.SynthesizedSample(
    tuple(map(str, train)), textures.ProceduralTextures(), 32, synthesis.SynthesisConfig(), seed
  )


def _batches(fn, batch_size, num_steps, start_step=0, num_workers=0):
  block = pipeline.BatchBlock((fn,), batch_size, 0, batch_size)
  return pipeline.train_batches(block, num_steps, start_step, num_workers)


def _collect(iterable):
  return [{k: np.array(v) for k, v in batch.items()} for batch in iterable]


def test_batches_do_not_depend_on_workers_and_resume_by_slicing(dataset_root):
  fn = _sample_fn(dataset_root)
  in_process = _collect(_batches(fn, 4, 5))
  workers = _collect(_batches(fn, 4, 5, num_workers=2))
  resumed = _collect(_batches(fn, 4, 5, start_step=3))
  assert len(in_process) == len(workers) == 5 and len(resumed) == 2
  for a, b in zip(in_process, workers):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(in_process[3:], resumed):
    np.testing.assert_array_equal(a["augmented"], b["augmented"])


def test_batch_shapes_and_dtypes(dataset_root):
  batch = _collect(_batches(_sample_fn(dataset_root), 4, 1))[0]
  assert batch["image"].shape == batch["augmented"].shape == (4, 32, 32, 3)
  assert batch["mask"].shape == (4, 32, 32) and batch["has_anomaly"].shape == (4,)
  assert all(v.dtype == np.uint8 for v in batch.values())  # a quarter of float32's bytes


def test_encode_then_decode_is_float_synthesis_to_within_rounding(dataset_root):
  fn = _sample_fn(dataset_root)
  rng = np.random.default_rng((fn.seed, 0, 0))
  order = np.random.default_rng((fn.seed, 0)).permutation(len(fn.train_paths))
  image = folder.load_image_cached(fn.train_paths[order[0]], 32)
  want = synthesis.synthesize(rng, image, fn.textures.sample(rng, 32), fn.synthesis)
  got = pipeline.decode(fn(0))
  assert set(got) == set(want)
  for key in want:
    assert got[key].dtype == np.float32
    np.testing.assert_allclose(got[key], want[key], atol=0.5 / 255 + 1e-6, err_msg=key)
  np.testing.assert_array_equal(got["mask"], want["mask"])  # masks exactly
  floats = {"image": np.full((2, 2), 0.25, np.float32)}
  assert pipeline.decode(floats)["image"] is floats["image"]  # float batches pass unchanged


def test_epochs_visit_every_image_and_seed_changes_data(dataset_root):
  fn = _sample_fn(dataset_root)
  n = len(fn.train_paths)
  # A sample is a pure function of (seed, epoch, index).
  np.testing.assert_array_equal(fn(n + 2)["augmented"], fn(n + 2)["augmented"])
  assert not np.array_equal(fn(3)["augmented"], _sample_fn(dataset_root, seed=1)(3)["augmented"])
  # Within one epoch every training image is used exactly once (un-rotated clean targets).
  no_rotation = pipeline.SynthesizedSample(
    fn.train_paths, fn.textures, 32, synthesis.SynthesisConfig(rotate_prob=0.0), 0
  )
  targets = {no_rotation(i)["image"].tobytes() for i in range(n)}
  assert len(targets) == n


def test_blocks_partition_the_global_batch_of_several_categories(dataset_root):
  pill = _sample_fn(dataset_root)
  washer = pipeline.SynthesizedSample(
    tuple(map(str, folder.scan(dataset_root, "washer").train)),
    pill.textures,
    32,
    pill.synthesis,
    pill.seed,
  )
  whole = _collect(pipeline.train_batches(pipeline.BatchBlock((pill, washer), 4, 0, 4), 3))
  # Two processes holding half the rows of both categories each.
  halves = [
    _collect(pipeline.train_batches(pipeline.BatchBlock((pill, washer), 4, first, 2), 3))
    for first in (0, 2)
  ]
  alone = _collect(_batches(washer, 4, 3))  # the category trained by itself
  for step, batch in enumerate(whole):
    for key in batch:
      stacked = batch[key].reshape((2, 4) + batch[key].shape[1:])
      joined = np.concatenate(
        [h[step][key].reshape((2, 2) + stacked.shape[2:]) for h in halves], axis=1
      )
      np.testing.assert_array_equal(joined, stacked)
      np.testing.assert_array_equal(stacked[1], alone[step][key])


EXIT_SCRIPT = textwrap.dedent("""
    import multiprocessing, sys
    import numpy as np

    def run(release):
      from grain._src.python.ipc import shared_memory_array as shm
      from pouta_jax.data import pipeline
      if release:
        pipeline._release_at_exit()  # what every process that starts grain workers does
      shm.SharedMemoryArray.enable_async_del(1)
      batch = shm.open_from_shm(shm.copy_to_shm(np.ones(4096, np.float32)))
      cycle = [batch]
      cycle.append(cycle)  # garbage that only a collection finds, as grain's iterators leave

    if __name__ == "__main__":
      process = multiprocessing.get_context("spawn").Process(target=run, args=(sys.argv[1],))
      process.start()
      process.join()
""")


@pytest.mark.parametrize("release", ["", "release"])
def test_a_process_started_by_multiprocessing_unlinks_its_batches_at_exit(release, tmp_path):
  """The demo's run processes end without a last garbage collection; a batch left in a
  reference cycle then leaked its shared memory (the resource tracker warned at the end)."""
  script = tmp_path / "exit.py"
  script.write_text(EXIT_SCRIPT)
  result = subprocess.run(
    [sys.executable, str(script), release], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert ("leaked shared_memory" in result.stderr) == (not release), result.stderr
