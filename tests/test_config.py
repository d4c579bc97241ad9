import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

from pouta_jax import config as config_lib, errors, models, runs, sharding

CONFIG_FILE = "configs/draem.py"


def _parse(*args):
  argv = ["prog", *args]
  values = flags.FlagValues()
  # Overrides are registered from sys_argv (sys.argv by default) when the flag is defined.
  config_flags.DEFINE_config_file(
    "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
  )
  config_lib.parse_flags(argv, values)
  return values.config


def test_config_file_with_category_and_preset():
  config = _parse(f"--config={CONFIG_FILE}:pill,tiny", "--config.optim.lr=2e-4")
  assert config.data.category == "pill"
  assert config.model.base_width == 16 and config.data.image_size == 64
  assert config.optim.lr == 2e-4
  config_lib.validate(config)


def test_full_size_default_is_the_official_setting():
  config = _parse(f"--config={CONFIG_FILE}:bottle")
  assert (config.model.base_width, config.data.image_size, config.data.batch_size) == (128, 256, 8)
  assert (config.optim.lr, tuple(config.optim.milestones), config.optim.decay) == (
    1e-4,
    (0.8, 0.9),
    0.2,
  )
  assert config.train.num_epochs == 700 and config.eval.score_filter_size == 21
  config_lib.validate(config)


def test_unknown_key_is_an_error_naming_it():
  with pytest.raises(
    config_lib.UnknownConfigKeyError,
    match="config.optim has no key 'learning_rate' .*decay, lr, milestones",
  ):
    _parse(f"--config={CONFIG_FILE}:pill", "--config.optim.learning_rate=1")
  with pytest.raises(config_lib.UnknownConfigKeyError, match="config has no key 'optimizer'"):
    _parse(f"--config={CONFIG_FILE}:pill", "--config.optimizer.lr=1")


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("data.image_size", 48, "multiple of 32"),
    ("model.base_width", 5, "even number"),
    ("optim.milestones", (0.9, 0.8), "increasing fractions"),
    ("eval.score_filter_size", 4, "odd filter size"),
    ("eval.num_heatmaps", -2, "or -1 for every one"),
    ("eval.error_weight", -0.5, "a weight >= 0"),
    ("mesh.num_devices", -1, "0 .all devices. or a count"),
    ("data.anomaly_prob", 1.5, r"probability in \[0, 1\]"),
    ("data.categories", ("pill", "pill"), "distinct category names"),
    ("data.texture_color", "grey", r"one of \('rgb', 'match'\)"),
  ],
)
def test_validate_names_the_key(key, value, message):
  config = config_lib.apply_args(config_lib.base_config("draem"), "tiny")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=rf"config\.{key}=.*{message}"):
    config_lib.validate(config)


def test_several_categories_make_one_program():
  config = _parse(f"--config={CONFIG_FILE}:weave,pill,tiny")
  assert tuple(config.data.categories) == ("weave", "pill") and config.data.category == "weave"
  assert runs.count(config) == 2 and config_lib.categories_of(config) == ("weave", "pill")
  config = _parse(f"--config={CONFIG_FILE}:all")
  assert tuple(config.data.categories) == config_lib.MVTEC_AD_CATEGORIES
  assert len(config_lib.MVTEC_AD_CATEGORIES) == 15
  one = _parse(f"--config={CONFIG_FILE}:pill")
  assert runs.count(one) == 1 and config_lib.categories_of(one) == ("pill",)


def test_mesh_axes_on_the_command_line():
  assert tuple(_parse(f"--config={CONFIG_FILE}:pill").mesh.axes) == sharding.AUTO
  assert tuple(_parse(f"--config={CONFIG_FILE}:pill", "--config.mesh.axes=auto").mesh.axes) == (
    sharding.AUTO
  )
  pairs = _parse(f"--config={CONFIG_FILE}:pill", "--config.mesh.axes=(('category',2),('data',-1))")
  assert tuple(pairs.mesh.axes) == (("category", 2), ("data", -1))


def test_a_config_stored_by_an_older_version_reads_as_today(tmp_path):
  stored = json.loads(config_lib.load("pouta", "pill,tiny").to_json_best_effort())
  # keys added since that version
  del stored["data"]["real_anomaly_prob"], stored["model"]["conv_weight_grad"]
  del stored["optim"]["weight_decay"], stored["data"]["categories"]
  stored["optim"]["lr"] = 0.123
  (tmp_path / "config.json").write_text(json.dumps(stored))
  config = config_lib.from_workdir(tmp_path)
  defaults = config_lib.load("pouta")
  assert config.data.real_anomaly_prob == defaults.data.real_anomaly_prob
  assert config.model.conv_weight_grad == defaults.model.conv_weight_grad
  assert config.optim.weight_decay == defaults.optim.weight_decay
  assert config.data.categories == ()
  # what it stored wins, tuples come back as tuples, and the model's own sections are there
  assert config.optim.lr == 0.123 and config.data.category == "pill"
  assert config.optim.milestones == defaults.optim.milestones
  assert isinstance(config.loss.level_weights, tuple)
  config_lib.validate(config)


def test_a_key_added_later_reads_as_its_value_before_it_existed(tmp_path, monkeypatch):
  """A run stored before model.fuse_kernel existed ran with a 3x3 fuse: with the default changed
  since (1, the design study's choice), it still reads and compares as the value before; so does
  a key whose value before is set here ((1, 2, 2, 4): the default stays (1, 1, 2, 4))."""
  assert config_lib.VALUES_BEFORE_KEYS["model.fuse_kernel"] == 3
  monkeypatch.setitem(config_lib.VALUES_BEFORE_KEYS, "model.level_multipliers", (1, 2, 2, 4))
  today = config_lib.load("pouta", "pill,tiny")
  assert today.model.fuse_kernel == 1
  stored = json.loads(today.to_json_best_effort())
  del stored["model"]["fuse_kernel"], stored["model"]["level_multipliers"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  config = config_lib.from_workdir(tmp_path)
  assert config.model.fuse_kernel == 3 and config.model.level_multipliers == (1, 2, 2, 4)
  current = json.loads(today.to_json_best_effort())
  assert config_lib.differences(stored, current) == [
    ("model.fuse_kernel", 3, 1),
    ("model.level_multipliers", [1, 2, 2, 4], [1, 1, 2, 4]),
  ]
  # A stored value wins over the value before, and other models do not get the key.
  stored["model"]["fuse_kernel"] = 1
  assert [k for k, _, _ in config_lib.differences(stored, current)] == ["model.level_multipliers"]
  draem = json.loads(config_lib.load("draem", "pill").to_json_best_effort())
  assert "fuse_kernel" not in config_lib.upgrade(draem).model
  assert config_lib.differences(draem, draem) == []


def test_each_value_before_a_key_is_a_valid_value_of_it():
  """A key there names a key of today's configs (no typo), and its value before passes the
  model's checks."""
  config = config_lib.load("pouta", "pill")
  flat = config_lib.flatten(config.to_dict())
  for key, value in config_lib.VALUES_BEFORE_KEYS.items():
    assert key in flat, key
    section, name = key.split(".")
    config[section][name] = value
  config_lib.validate(config)
  models.get("pouta").validate(config)


def test_a_damaged_stored_config_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"model": ')
  with pytest.raises(errors.ConfigError, match=f"{tmp_path / 'config.json'}: not a stored config"):
    config_lib.from_workdir(tmp_path)
  (tmp_path / "config.json").write_text('{"model": {"name": "resnet"}}')
  with pytest.raises(errors.ConfigError, match="'resnet' is not a model of this version"):
    config_lib.from_workdir(tmp_path)


def test_runs_alike_but_for_scoring_keys_train_the_same_model():
  def identity(**changes) -> str:
    config = config_lib.load("pouta").to_dict()
    for key, value in changes.items():
      section, name = key.split("__")
      config[section][name] = value
    return config_lib.training_identity(config)

  today = identity()
  assert identity(eval__error_weight=0.5, eval__score_filter_size=5) == today
  assert identity(eval__num_heatmaps=0, train__log_every=1) == today  # output-only
  assert identity(optim__lr=3e-4) != today and identity(eval__val_every=10) != today
  # best_val chooses its checkpoint by the scores: the scoring keys change the model.
  best = identity(train__select="best_val")
  assert identity(train__select="best_val", eval__error_weight=0.5) != best
  assert identity(train__select="best_val", eval__num_heatmaps=0) == best


@pytest.mark.parametrize("name", ["{evil}", "../tests/{stem}", 3, ["draem"], "pouta_study"])
def test_a_stored_model_name_is_data_never_a_file_to_run(tmp_path, name):
  """config.json names a model of the registry; a path to a Python file is never executed."""
  evil = tmp_path / "evil.py"
  marker = tmp_path / "PWNED"
  evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef get_config(arg=None):\n  pass\n")
  stored = json.loads(config_lib.load("draem").to_json_best_effort())
  if isinstance(name, str):
    name = name.format(evil=tmp_path / "evil", stem="evil")
  stored["model"]["name"] = name
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(errors.ConfigError, match=r"config.model.name=.* not a model of this version"):
    config_lib.from_workdir(tmp_path)
  with pytest.raises(errors.ConfigError, match=r"config.model.name=.*expected one of"):
    config_lib.upgrade(stored)
  assert not marker.exists()


@pytest.mark.parametrize(
  "change",
  [
    lambda c: c["model"].__setitem__("base_width", "wide"),
    lambda c: c["data"].__setitem__("image_size", -32),
    lambda c: c.__setitem__("optim", [1, 2]),
  ],
)
def test_a_stored_config_of_wrong_types_or_values_is_named(tmp_path, change):
  stored = json.loads(config_lib.load("draem").to_json_best_effort())
  change(stored)
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(errors.ConfigError, match=rf"{tmp_path / 'config.json'}: "):
    config_lib.from_workdir(tmp_path)


def test_a_stored_config_that_is_a_fifo_is_named_without_blocking(tmp_path):
  os.mkfifo(tmp_path / "config.json")  # reading it would wait for a writer forever
  with pytest.raises(errors.ConfigError, match=r"config.json: a FIFO; not a stored config"):
    config_lib.from_workdir(tmp_path)
