"""The runs of one program: categories times the stacked sweep's points, each with the config a
separate run would have; keys that change the program are refused, naming them."""

import json

import pytest

from pouta_jax import config as config_lib, errors, runs, sweep


def _stack(arg="weave,pill,tiny", model="pouta", **stack):
  config = config_lib.load(model, arg)
  for key, value in stack.items():
    config.stack[key] = value
  return config


def test_a_plain_config_is_a_stack_of_one_run_with_no_folder_of_its_own():
  (run,) = runs.runs_of(config_lib.load("draem", "pill,tiny"))
  assert (run.name, run.category, run.point) == ("", "pill", ())
  assert runs.count(run.config) == 1


def test_categories_times_points_each_with_a_separate_runs_config():
  config = _stack(seeds=2, sweep=("optim.lr=1e-4,3e-4",), zip=("loss.final_weight=1,2",))
  program = runs.runs_of(config)
  assert runs.count(config) == len(program) == 2 * 2 * 2 * 1 * 2
  assert program[0].name == "optim.lr=1e-4,loss.final_weight=1,train.seed=0/weave"
  assert program[1].name == "optim.lr=1e-4,loss.final_weight=1,train.seed=0/pill"
  assert len({r.name for r in program}) == len(program)
  run = next(r for r in program if r.name == "optim.lr=3e-4,loss.final_weight=2,train.seed=1/pill")
  # The config.json a separate run with the same flags stores, byte for byte.
  alone = config_lib.load("pouta", "pill,tiny")
  alone.optim.lr, alone.loss.final_weight, alone.train.seed = 3e-4, 2.0, 1
  assert run.config.to_json_best_effort(indent=2) == alone.to_json_best_effort(indent=2)
  assert isinstance(run.config.train.seed, int) and isinstance(run.config.optim.lr, float)


def test_one_category_with_seeds_is_stacked_too():
  program = runs.runs_of(_stack("weave,tiny", seeds=3))
  assert [r.name for r in program] == [f"train.seed={s}/weave" for s in range(3)]
  assert [r.config.train.seed for r in program] == [0, 1, 2]


@pytest.mark.parametrize(
  "stack,message",
  [
    ({"sweep": ("model.base_width=8,16",)}, "model.base_width changes the program's shapes"),
    ({"zip": ("optim.lr=1e-4,2e-4", "model.compare=both,encoder")}, "model.compare changes"),
    ({"sweep": ("loss.deep_supervision=True,False",)}, "loss.deep_supervision changes"),
    ({"sweep": ("data.image_size=32,64",)}, "data.image_size changes"),
    ({"sweep": ("optim.lr=1e-4,fast",)}, r"optim.lr='fast' is not a float like its default"),
    ({"sweep": ("train.seed=1.5",)}, r"train.seed='1.5' is not a int like its default 0"),
    ({"sweep": ("optim.learning_rate=1",)}, "the config has no key 'optim.learning_rate'"),
    ({"zip": ("optim.lr=1,2", "optim.decay=0.1")}, "different lengths"),
  ],
)
def test_stacks_that_cannot_share_a_program_are_refused_naming_the_key(stack, message):
  with pytest.raises(sweep.SweepError, match=message):
    runs.runs_of(_stack(**stack))


def test_stack_seeds_are_checked():
  config = _stack(seeds=0)
  with pytest.raises(errors.ConfigError, match=r"config.stack.seeds=0: expected at least 1"):
    config_lib.validate(config)


def test_stackable_keys_are_numbers_of_the_optimizer_losses_synthesis_and_seed():
  config = config_lib.load("pouta", "weave")
  for key in ("optim.lr", "train.seed", "data.beta_max", "loss.level_weights", "loss.final_weight"):
    assert config_lib.is_stackable(config, key), key
  for key in ("model.base_width", "loss.deep_supervision", "data.batch_size", "train.num_steps"):
    assert not config_lib.is_stackable(config, key), key
  assert not config_lib.is_stackable(config_lib.load("draem", "weave"), "loss.final_weight")


def test_the_stack_is_part_of_the_stored_config(tmp_path):
  from pouta_jax import experiment

  config = _stack("weave,tiny", seeds=2)
  experiment.store_config(tmp_path, config)
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # bound by its first checkpoint
  assert json.loads((tmp_path / "config.json").read_text())["stack"]["seeds"] == 2
  config.stack.seeds = 3
  with pytest.raises(errors.ConfigError, match=r"config.stack.seeds: stored 2, now 3"):
    experiment.store_config(tmp_path, config)
