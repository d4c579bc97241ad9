"""Checkpoint saves on a full disk: refused before writing when the state cannot fit, and
cleaned up when the disk fills during the write; either way the newest good step is named."""

import jax
import numpy as np
import pytest

from pouta_jax import checkpoint, errors, train


def _state(megabytes: float) -> train.TrainState:
  """A stack of one run (its state has the run axis every state has)."""
  size = int(megabytes * 2**20 / 4)  # random: orbax compresses constant arrays to nothing
  weights = {"w": np.random.default_rng(0).random((1, size), np.float32)}
  return train.TrainState(step=np.zeros(1, np.int32), params=weights, batch_stats={}, opt_state=())


def test_a_state_that_cannot_fit_is_refused_before_writing(small_disk):
  mngr = checkpoint.manager(small_disk, keep=2)
  checkpoint.save(mngr, 1, _state(0.05))
  with pytest.raises(errors.DiskFullError, match=r"step 2 .* needs about .*newest good .* step 1"):
    checkpoint.save(mngr, 2, _state(1))
  mngr.close()
  assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["1"]


# A write that fails leaves tensorstore completions to arrive in orbax's closed event loop.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_disk_that_fills_during_the_write_leaves_no_partial_checkpoint(
  small_disk, monkeypatch, caplog
):
  monkeypatch.setattr(checkpoint, "SPACE_MARGIN", 0.0)  # as if another writer took the space
  mngr = checkpoint.manager(small_disk, keep=2)
  checkpoint.save(mngr, 1, _state(0.05))
  with pytest.raises(errors.DiskFullError, match=r"step 2 .* not written .*newest good .* step 1"):
    checkpoint.save(mngr, 2, _state(1))
  mngr.close()
  assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["1"]
  # One error, not a traceback per orbax writer thread (hundreds of lines on the command line).
  assert [r.getMessage()[:80] for r in caplog.records if r.exc_info] == []


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_background_write_that_fills_the_disk_is_raised_by_the_next_wait(small_disk, monkeypatch):
  monkeypatch.setattr(checkpoint, "SPACE_MARGIN", 0.0)
  mngr = checkpoint.manager(small_disk, keep=2)
  checkpoint.save(mngr, 1, _state(0.05), block=False)
  checkpoint.wait(mngr)
  with pytest.raises(errors.DiskFullError, match=r"step 2 .* not written .*newest good .* step 1"):
    checkpoint.save(mngr, 2, _state(1), block=False)  # the write fails in the background...
    checkpoint.wait(mngr)  # ...and is raised here at the latest
  mngr.close()
  assert sorted(p.name for p in (small_disk / "checkpoints").iterdir()) == ["1"]


def test_a_background_save_holds_the_state_it_was_given(tmp_path):
  """The loop goes on while the write runs, and donates the state's buffers to the next step."""
  mngr = checkpoint.manager(tmp_path, keep=2)
  state = jax.device_put(_state(4))
  saved = np.asarray(state.params["w"]).copy()
  checkpoint.save(mngr, 1, state, block=False)
  jax.tree.map(lambda x: x.delete(), state)  # what donating it to the next step does
  checkpoint.wait(mngr)
  restored = checkpoint.restore_latest(mngr, jax.device_put(_state(4)))
  mngr.close()
  np.testing.assert_array_equal(restored.params["w"], saved)


def _stacked_state(rows: int, width: int = 3) -> train.TrainState:
  """A stacked state whose row r holds r + 1 everywhere (step included)."""
  fill = np.arange(1, rows + 1, dtype=np.float32)
  return train.TrainState(
    step=fill.astype(np.int32),
    params={"w": np.repeat(fill[:, None], width, axis=1)},
    batch_stats={},
    opt_state=(),
  )


def test_a_stacked_checkpoint_resumes_with_other_padding(tmp_path):
  """3 runs saved with one padding row (a run axis of 2): restored with 3 padding rows (a run
  axis of 6), the padding copies the last run; with none (export), the runs alone."""
  mngr = checkpoint.manager(tmp_path, keep=2)
  saved = _stacked_state(4)
  saved.params["w"][3] = saved.params["w"][2]  # padding copies the last run
  checkpoint.save(mngr, 1, jax.device_put(saved))
  wider, rows = checkpoint.restore_latest_with_rows(
    mngr, jax.device_put(_stacked_state(6)), num_runs=3
  )
  assert rows == 4
  np.testing.assert_array_equal(wider.params["w"][:, 0], [1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(wider.step, [1, 2, 3, 3, 3, 3])
  exact = checkpoint.restore_latest(mngr, jax.device_put(_stacked_state(3)), num_runs=3)
  np.testing.assert_array_equal(exact.params["w"][:, 0], [1, 2, 3])
  # A config of more runs, or of another model, is refused by name, not padded with zeros.
  with pytest.raises(
    errors.ConfigError, match=r"does not hold 5 runs of the config's model \(4 saved\)$"
  ):
    checkpoint.restore_latest(mngr, jax.device_put(_stacked_state(6)), num_runs=5)
  with pytest.raises(errors.ConfigError, match=r"mis-shaped params/w: \(4, 3\), expected \(4, 5\)"):
    checkpoint.restore_latest(mngr, jax.device_put(_stacked_state(6, width=5)), num_runs=3)
  mngr.close()
  # A new process's manager (it has not saved: orbax knows no handler for the item yet).
  fresh = checkpoint.manager(tmp_path, keep=2)
  wider, rows = checkpoint.restore_latest_with_rows(
    fresh, jax.device_put(_stacked_state(6)), num_runs=3
  )
  assert rows == 4
  np.testing.assert_array_equal(wider.step, [1, 2, 3, 3, 3, 3])
  fresh.close()


def test_a_single_runs_checkpoint_from_before_the_run_axis_restores_as_a_stack_of_one(tmp_path):
  """Versions before every state had a run axis saved a single run's state without it."""
  mngr = checkpoint.manager(tmp_path, keep=2)
  one = jax.tree.map(lambda x: x[0], _stacked_state(1))  # step 1, w [1, 1, 1]
  checkpoint.save(mngr, 1, jax.device_put(one))
  restored, rows = checkpoint.restore_latest_with_rows(mngr, jax.device_put(_stacked_state(1)))
  assert rows == 1
  np.testing.assert_array_equal(restored.params["w"], [[1, 1, 1]])
  np.testing.assert_array_equal(restored.step, [1])
  assert restored.step.sharding == jax.device_put(np.zeros(1)).sharding
  with pytest.raises(errors.ConfigError, match=r"does not hold 2 runs .* \(1 saved\)$"):
    checkpoint.restore_latest(mngr, jax.device_put(_stacked_state(2)), num_runs=2)
  with pytest.raises(errors.ConfigError, match=r"mis-shaped params/w: \(3,\), expected \(5,\)"):
    checkpoint.restore_latest(mngr, jax.device_put(_stacked_state(1, width=5)))
  mngr.close()
