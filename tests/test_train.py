import json
import shutil

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pouta_jax import checkpoint, runs, sharding, train
from pouta_jax.data import category_folder, pipeline
from tests.conftest import make_tiny_config

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(50)


def _learning_rates(config, optim: dict, num_steps: int) -> list[float]:
  """The schedule of `optim` (a run's hyperparameters), recovered through Adam's state-free
  first step: update = -lr * sign(grad)."""
  tx = train.make_optimizer(config)(optim)
  params = {"w": np.zeros(())}
  lrs = []
  state = tx.init(params)
  for _ in range(num_steps):
    updates, state = tx.update({"w": np.ones(())}, state, params)
    lrs.append(-float(updates["w"]))
  return lrs


def test_schedule_decays_at_milestones(tiny_config):
  tiny_config.optim.lr = 1.0
  lrs = _learning_rates(tiny_config, train.hyperparameters(tiny_config, 100)["optim"], 100)
  np.testing.assert_allclose(lrs[79], 1.0, rtol=1e-4)
  np.testing.assert_allclose(lrs[80], 0.2, rtol=1e-4)
  np.testing.assert_allclose(lrs[90], 0.04, rtol=1e-4)


def test_runs_of_one_program_have_their_own_milestones(tiny_config):
  """optim.milestones is stackable: each run of a program follows the schedule it would
  alone; one whose milestones fall on fewer distinct steps is filled with steps never reached."""
  tiny_config.optim.lr = 1.0
  tiny_config.stack.sweep = ("optim.milestones=(0.5,0.75),(0.2,0.21)",)  # 6 steps
  hparams = train.setup(tiny_config, [8]).hparams
  np.testing.assert_array_equal(hparams["optim"]["milestone_steps"], [[3, 4], [1, train.NEVER]])
  for i, run in enumerate(runs.runs_of(tiny_config)):
    stacked = jax.tree.map(lambda x, i=i: x[i], hparams["optim"])
    alone = train.hyperparameters(run.config, 6)["optim"]
    assert len(alone["milestone_steps"]) == (2, 1)[i]
    np.testing.assert_array_equal(
      _learning_rates(tiny_config, stacked, 8), _learning_rates(run.config, alone, 8)
    )


def test_steps_from_epochs(tiny_config):
  tiny_config.train.num_steps = 0
  tiny_config.train.num_epochs = 3
  assert train.num_train_steps(tiny_config, 10) == 3 * 3  # ceil(10 / 4) steps an epoch


@pytest.mark.parametrize(
  "model,terms",
  [
    ("draem", {"l2", "ssim", "focal"}),
    ("pouta", {"l2", "ssim", "focal"} | {f"focal_level{i}" for i in range(4)}),
  ],
)
def test_training_lowers_the_loss(dataset_root, tmp_path, model, terms):
  config = make_tiny_config(model, dataset_root)
  config.train.num_steps = 40
  config.train.log_every = 10
  config.train.checkpoint_every = 40
  config.optim.lr = 1e-3
  train.train(config, tmp_path, [category_folder(config)])
  logged = [json.loads(line) for line in (tmp_path / "scalars.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [10, 20, 30, 40]
  assert logged[-1]["loss"] < 0.8 * logged[0]["loss"]
  assert terms | {"loss", "grad_norm", "steps_per_second"} == logged[0].keys() - {"step"}
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_equals_uninterrupted_run(tiny_config, tmp_path):
  folder = [category_folder(tiny_config)]  # 6 steps, checkpoints at 3 and 6
  straight = train.train(tiny_config, tmp_path / "a", folder)
  train.train(tiny_config, tmp_path / "b", folder)
  mngr = checkpoint.manager(tmp_path / "b", 2)
  assert mngr.all_steps() == [3, 6]
  mngr.delete(6)  # as if killed after the checkpoint at step 3
  at_3 = checkpoint.restore_latest(mngr, train.setup(tiny_config, [8]).state)
  mngr.close()
  # The same checkpoint as a version before the run axis wrote it: the state without the axis.
  shutil.copytree(tmp_path / "b", tmp_path / "c")
  older = ocp.StandardCheckpointer()
  older.save(
    tmp_path / "c" / "checkpoints" / "3" / "state",
    jax.tree.map(lambda x: np.asarray(x)[0], checkpoint._fields(at_3)),
    force=True,
  )
  older.wait_until_finished()
  for workdir in ("b", "c"):
    resumed = train.train(tiny_config, tmp_path / workdir, folder)
    assert resumed.step.tolist() == [6]
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
      np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  folder = [category_folder(tiny_config)]
  tiny_config.train.num_steps = 3
  train.train(tiny_config, tmp_path, folder)
  # Resumed with a learning rate that overflows the weights (a hyperparameter: the step is
  # the other 6-step tiny runs' compiled one): the loss turns non-finite before step 6 is saved.
  tiny_config.train.num_steps, tiny_config.optim.lr = 6, 1e30
  with pytest.raises(FloatingPointError, match="newest good checkpoint is step 3"):
    train.train(tiny_config, tmp_path, folder)
  assert checkpoint.manager(tmp_path, 2).all_steps() == [3]


def test_checkpoint_holds_the_data_iterator(tiny_config, tmp_path):
  folder = [category_folder(tiny_config)]
  tiny_config.train.num_steps = 3
  state = train.train(tiny_config, tmp_path, folder)
  mngr = checkpoint.manager(tmp_path, 2)
  mesh = sharding.make_mesh(tiny_config)
  batches = iter(pipeline.training_batches(tiny_config, folder, mesh, 6))
  assert checkpoint.restore_data_iterator(mngr, 3, batches)
  expected = next(iter(pipeline.training_batches(tiny_config, folder, mesh, 6, start_step=3)))
  restored = next(batches)
  for key in expected:
    np.testing.assert_array_equal(restored[key], expected[key])
  # A checkpoint of the state alone (as a converter writes) has no data state to restore.
  checkpoint.save(mngr, 4, state)
  assert not checkpoint.restore_data_iterator(mngr, 4, batches)
  mngr.close()


class _StateBeforeConstants(flax.struct.PyTreeNode):
  """TrainState as versions before `constants` saved it (a single run's: no run axis)."""

  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: tuple


def test_checkpoints_written_before_constants_and_the_run_axis_existed_still_restore(
  tiny_config, tmp_path
):
  state = train.setup(tiny_config, [8]).state
  state = state.replace(step=state.step + 7, params=jax.tree.map(lambda x: x + 1.0, state.params))
  old = _StateBeforeConstants(state.step, state.params, state.batch_stats, state.opt_state)
  old = jax.tree.map(lambda x: np.asarray(x)[0], old)
  mngr = checkpoint.manager(tmp_path, 1)
  mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old)), force=True)
  mngr.wait_until_finished()
  template = train.setup(tiny_config, [8]).state
  restored = checkpoint.restore_latest(mngr, template)
  mngr.close()
  assert restored.constants == {} and restored.step.tolist() == [7]
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
