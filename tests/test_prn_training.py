"""PRN on the spine: frozen backbone out of the optimizer, the prepare stage (weights, then
prototypes) saved and restored with the checkpoint, seen anomalies held out of the test set,
a tiny run that learns, export, and the bad inputs the issue names."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pouta_jax import checkpoint, config as config_lib, evaluate, experiment, export, models, train
from pouta_jax.artifact import load as load_artifact
from pouta_jax.data import DataError, category_folder, pipeline
from pouta_jax.data.folder import load_image, load_test_set, sample_name
from pouta_jax.models import backbone, prn
from tests.conftest import make_tiny_config

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(180)

NUM_REAL = 3


def _prn_config(root, **overrides):
  config = make_tiny_config("prn", root)
  config.backbone.pretrained = False
  config.model.base_width = 8
  config.data.category = "pill"
  config.data.num_real_anomalies = NUM_REAL
  config.train.num_steps = 4
  config.train.checkpoint_every = 2
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def trained(dataset_root, tmp_path_factory):
  """A tiny PRN trained for 40 steps and evaluated; the test sets it was scored on."""
  config = _prn_config(
    dataset_root, **{"train.num_steps": 40, "train.log_every": 5, "train.checkpoint_every": 20}
  )
  workdir = tmp_path_factory.mktemp("prn")
  scored = []
  original = evaluate.evaluate

  def recording(predict_fn, test_set, batch_size):
    scored.append(test_set)
    return original(predict_fn, test_set, batch_size)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate, "evaluate", recording)
    result = experiment.run(config, workdir)
  return config, workdir, result, scored


def _restored(config, workdir):
  sizes = [len(category_folder(config, c).train) for c in config_lib.categories_of(config)]
  resolved = models.resolve(config, sizes)
  template = train.setup(resolved, sizes).state
  mngr = checkpoint.manager(workdir, 2)
  state = checkpoint.restore_latest(mngr, template)
  mngr.close()
  return resolved, template, state


def test_split_and_merge_variables_round_trip():
  variables = {
    "params": {"backbone": {"w": 1}, "discriminative": {"w": 2}},
    "batch_stats": {"backbone": {"m": 3}, "discriminative": {"m": 4}},
    "prototypes": {"scale_0": 5},
  }
  params, stats, constants = models.split_variables(variables, ("backbone",))
  assert params == {"discriminative": {"w": 2}} and stats == {"discriminative": {"m": 4}}
  assert constants == {
    "params": {"backbone": {"w": 1}},
    "batch_stats": {"backbone": {"m": 3}},
    "prototypes": {"scale_0": 5},
  }
  assert models.merge_variables(params, stats, constants) == variables
  # Nothing frozen and no other collection: no constants at all (DRAEM's checkpoints unchanged).
  plain = {"params": {"a": 1}, "batch_stats": {"a": 2}}
  assert models.split_variables(plain, ())[2] == {}


def test_frozen_backbone_is_outside_the_optimizer_and_never_changes(dataset_root):
  config = _prn_config(dataset_root)
  config = models.resolve(config, [8])
  assert config.model.num_prototypes == 1  # 10% of 8 images, at least 1
  model, optimizer, state, hparams, _ = train.setup(config, [8])
  assert set(state.params) == {"discriminative"}
  assert set(state.constants) == {"params", "batch_stats", "prototypes"}
  assert set(state.constants["params"]) == {"backbone"}
  adam_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 1)  # no counts
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  assert adam_leaves == 2 * trainable  # first and second moments of the head only

  folder = category_folder(config)
  mesh = train.sharding.make_mesh(config)
  step = train.make_train_step(model, models.get("prn").objective(config), optimizer, mesh)
  batch = next(iter(pipeline.training_batches(config, [folder], mesh, 1)))
  before = jax.device_get(state)
  after, metrics = step(
    state,
    train.sharding.global_batch(
      train.sharding.batch_sharding(mesh), batch, pipeline.batch_shape(config)
    ),
    hparams,
  )
  after = jax.device_get(after)
  assert np.isfinite(metrics["loss"]).all() and (metrics["grad_norm"] > 0).all()
  for old, new in zip(jax.tree.leaves(before.constants), jax.tree.leaves(after.constants)):
    np.testing.assert_array_equal(old, new)
  # Every kernel of the head moved (attention key biases have no gradient: softmax ignores a
  # per-query constant; so do queries in one-pixel windows at this tiny size).
  kernels = [
    not np.array_equal(o, n)
    for (path, o), n in zip(
      jax.tree_util.tree_flatten_with_path(before.params)[0], jax.tree.leaves(after.params)
    )
    if path[-1].key == "kernel"
  ]
  assert len(kernels) > 40 and all(kernels)


def test_weight_decay_is_added_to_the_gradients_before_adam(dataset_root):
  config = _prn_config(dataset_root, **{"optim.weight_decay": 0.5, "optim.lr": 0.1})
  tx = train.make_optimizer(config)(train.hyperparameters(config, 10)["optim"])
  params = {"w": jnp.array([2.0, -3.0])}
  updates, _ = tx.update({"w": jnp.zeros(2)}, tx.init(params), params)
  # PyTorch's Adam: the gradient becomes 0.5 * w; Adam's first step moves by lr * sign.
  np.testing.assert_allclose(updates["w"], [-0.1, 0.1], rtol=1e-4)
  config.optim.weight_decay = 0.0
  tx = train.make_optimizer(config)(train.hyperparameters(config, 10)["optim"])
  np.testing.assert_allclose(tx.update({"w": jnp.zeros(2)}, tx.init(params), params)[0]["w"], 0)


def test_tiny_prn_learns_and_reports(trained):
  config, workdir, result, _ = trained
  losses = [
    json.loads(line)["loss"]
    for line in (workdir / "scalars.jsonl").read_text().splitlines()
    if "loss" in line
  ]
  assert len(losses) == 8 and np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
  profile = result["profiles"]["prn"]
  assert set(profile["params"]) == {"backbone", "discriminative", "total"}
  assert profile["params"]["backbone"] == 11_176_512  # ResNet18 without its classifier
  assert profile["flops_per_image"] > 0 and profile["latency_ms"] > 0
  stored = json.loads((workdir / "config.json").read_text())
  assert stored["model"]["num_prototypes"] == 1  # resolved from the data before it was stored
  assert "params backbone" in (workdir / "results.md").read_text()


def test_real_anomalies_are_trained_on_and_never_scored(trained, dataset_root):
  config, workdir, _, scored = trained
  held_out = json.loads((workdir / "real_anomalies.json").read_text())["pill"]
  assert len(held_out) == NUM_REAL
  everything = load_test_set(
    category_folder(_prn_config(dataset_root, **{"data.num_real_anomalies": 0})), 32
  )
  assert set(held_out) < set(everything["name"][everything["label"] == 1])
  for test_set in scored:  # the trained model and the untrained one alike
    assert not set(held_out) & set(test_set["name"])
    assert len(test_set["name"]) == len(everything["name"]) - NUM_REAL
  # The same seed picks the same images; another seed, others.
  folder = category_folder(config)
  assert [sample_name(s) for s in folder.real_anomalies] == held_out
  other = category_folder(_prn_config(dataset_root, **{"train.seed": 5}))
  assert [sample_name(s) for s in other.real_anomalies] != held_out
  assert set(folder.real_anomalies).isdisjoint(folder.test)


def test_prototypes_are_prepared_once_saved_and_restored(trained):
  config, workdir, _, _ = trained
  resolved, template, state = _restored(config, workdir)
  model = models.get("prn").build(resolved)
  folder = category_folder(config)
  images = np.stack([load_image(p, 32) for p in folder.train]).astype(np.float32) / 255
  key = jax.random.fold_in(jax.random.key(config.train.seed), train.PREPARE_STREAM)
  expected = prn.fit_prototypes(model, train.run_variables(template.variables, 0), images, key)
  assert float(jnp.abs(expected["scale_0"]).max()) > 0
  for name, value in expected.items():  # the program's one run
    np.testing.assert_array_equal(state.constants["prototypes"][name][0], value)
  # The frozen backbone in the checkpoint is the initial one: 40 steps never touched it.
  for old, new in zip(
    jax.tree.leaves(template.constants["params"]), jax.tree.leaves(state.constants["params"])
  ):
    np.testing.assert_array_equal(old, new)
  # The stage is deterministic: preparing again gives the same prototypes.
  again = train.prepared_state(resolved, model, template, [folder])
  for name, value in expected.items():
    np.testing.assert_array_equal(again.constants["prototypes"][name][0], value)


def _fitted(config, category):
  """The prototypes a fresh single-category run of `category` prepares (its stack of one)."""
  config = _prn_config(config.data.root, **{"data.category": category})
  config = models.resolve(config, [len(category_folder(config).train)])
  model, _, template, _, _ = train.setup(config, [len(category_folder(config).train)])
  return train.prepared_state(config, model, template, [category_folder(config)]).constants[
    "prototypes"
  ]


def test_categories_in_one_program_get_their_own_prototypes(dataset_root):
  # The prepare stage of a stacked state; that training and the checkpoint keep what it
  # prepares is test_prototypes_are_prepared_once_saved_and_restored's.
  config = _prn_config(dataset_root)
  config.data.categories = ("weave", "pill")
  folders = [category_folder(config, c) for c in config.data.categories]
  config = models.resolve(config, [len(f.train) for f in folders])
  model, _, template, _, _ = train.setup(config, [len(f.train) for f in folders])
  state = train.prepared_state(config, model, template, folders)
  for index, category in enumerate(config.data.categories):
    for name, value in _fitted(config, category).items():
      np.testing.assert_array_equal(state.constants["prototypes"][name][index], value[0])
  assert not np.array_equal(*state.constants["prototypes"]["scale_0"])


def test_exported_prn_matches_the_model_and_keeps_its_size(trained, tmp_path):
  config, workdir, _, _ = trained
  resolved, _, state = _restored(config, workdir)
  with pytest.raises(ValueError, match="training size only"):
    export.export(workdir, tmp_path / "bad", image_sizes=(64,))
  assert not (tmp_path / "bad").exists()
  loaded = load_artifact(export.export(workdir, tmp_path / "art"))
  images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
  model = models.get("prn").build(resolved)
  maps, _ = evaluate.make_predict_fn(model, 3)(train.run_variables(state.variables, 0), images)
  np.testing.assert_allclose(loaded.predict(images)[0], maps, atol=1e-6)


def test_pretrained_weights_are_loaded_before_step_0(dataset_root, tmp_path):
  weights = backbone.init_variables("resnet18")
  weights = jax.tree.map(lambda x: x + 0.01, weights)  # distinct from any random init
  path = backbone.save_weights(weights, tmp_path / "resnet18.npz")
  config = _prn_config(dataset_root, **{"train.num_steps": 2})
  config.backbone.pretrained, config.backbone.weights = True, str(path)
  experiment.run(config, tmp_path / "run", mode="train")
  _, _, state = _restored(config, tmp_path / "run")
  for collection in ("params", "batch_stats"):
    for want, got in zip(
      jax.tree.leaves(weights[collection]), jax.tree.leaves(state.constants[collection]["backbone"])
    ):
      np.testing.assert_allclose(got[0], want, rtol=1e-6)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      {"backbone.pretrained": True},
      "config.backbone.weights is empty: PRN's frozen backbone needs pretrained resnet18",
    ),
    ({"backbone.name": "resnet19"}, "config.backbone.name='resnet19': expected one of"),
    (
      {"model.num_prototypes": 9},
      r"config.model.num_prototypes=9: more prototypes than "
      r"training images \(8\)",
    ),
    (
      {"data.num_real_anomalies": 7},
      "config.data.num_real_anomalies=7: the test set of pill .* has only 6 defect images",
    ),
    ({"loss.focal_alpha": 1.5}, "config.loss.focal_alpha=1.5"),
  ],
)
def test_bad_prn_settings_fail_before_anything_is_written(
  dataset_root, tmp_path, overrides, message
):
  config = _prn_config(dataset_root, **overrides)
  with pytest.raises((ValueError, DataError), match=message):
    experiment.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_wrong_weights_file_lists_its_keys_before_anything_is_written(dataset_root, tmp_path):
  weights = backbone.flatten(backbone.init_variables("resnet18"))
  weights.pop("params/layer1_0/conv1/kernel")
  weights["params/fc/kernel"] = np.zeros((512, 10))
  np.savez(tmp_path / "bad.npz", **{k: np.asarray(v) for k, v in weights.items()})
  config = _prn_config(dataset_root, **{"backbone.pretrained": True})
  config.backbone.weights = str(tmp_path / "bad.npz")
  with pytest.raises(
    ValueError,
    match=r"config.backbone.weights: .*bad.npz does not hold "
    r"resnet18 weights \(2 problems\)",
  ) as error:
    experiment.run(config, tmp_path / "run")
  assert "missing params/layer1_0/conv1/kernel" in str(error.value)
  assert "extra params/fc/kernel" in str(error.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
  "name, channels, head_params",
  [("resnet18", (64, 128, 256), 9_318_914), ("wide_resnet50_2", (256, 512, 1024), 16_814_594)],
)
def test_full_size_config_shapes(name, channels, head_params):
  """configs/prn.py at full size (256 px, width 64), K from 200 training images: shapes and
  parameter counts (the head's: a regression anchor for our reading of the paper)."""
  config = config_lib.load("prn", "bottle")
  config.backbone.name = name
  config = models.resolve(config, [200])
  assert config.model.num_prototypes == 20
  model = models.get("prn").build(config)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
  )
  protos = [shapes["prototypes"][f"scale_{i}"].shape for i in range(prn.NUM_SCALES)]
  assert protos == [(20, 256 // s, 256 // s, c) for s, c in zip((4, 8, 16), channels)]
  params, _, constants = models.split_variables(shapes, ("backbone",))
  backbone_count = sum(x.size for x in jax.tree.leaves(constants["params"]))
  assert backbone_count == {"resnet18": 11_176_512, "wide_resnet50_2": 66_834_240}[name]
  assert set(params) == {"discriminative"}
  assert sum(x.size for x in jax.tree.leaves(params)) == head_params
  out = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False), shapes, jnp.zeros((2, 256, 256, 3))
  )
  assert out["anomaly_map"].shape == (2, 256, 256) and out["logits"].shape == (2, 256, 256, 2)
