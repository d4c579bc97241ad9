import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from pouta_jax import artifact, config as config_lib, evaluate, experiment, export, models, predict
from pouta_jax.data import DataError, category_folder, validation
from pouta_jax.data.folder import load_test_set
from pouta_jax.errors import ConfigError
from pouta_jax.models.pouta import POUTA
from tests.conftest import make_tiny_config

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(170)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Our first reading of the paper, the baseline these tests switch one option of at a time
# (configs/pouta.py's defaults are the design study's choice since).
READING = dict(fuse_kernel=3, pixel_input=False, discriminative_fraction=0.5)


def _pouta_config(tiny_config, compare="both", guidance=True, deep_supervision=True):
  config = make_tiny_config("pouta", tiny_config.data.root)
  config.model.update(READING)
  config.model.compare = compare
  config.model.guidance = guidance
  config.loss.deep_supervision = deep_supervision
  return config


def test_config_file_matches_the_registry():
  config = config_lib.load("pouta", "pill,tiny")
  assert config.model.name == "pouta" and config.data.category == "pill"
  config_lib.validate(config)
  models.get("pouta").validate(config)
  # The module's own defaults are the config's: POUTA(128) is the chosen model too.
  built = models.get("pouta").build(config)
  default = POUTA(base_width=built.base_width, conv_weight_grad=built.conv_weight_grad)
  fields = [f.name for f in dataclasses.fields(POUTA) if f.name not in ("parent", "name")]
  assert {f: getattr(built, f) for f in fields} == {f: getattr(default, f) for f in fields}


def test_full_size_parameters_against_draem():
  shapes = jax.eval_shape(
    lambda: POUTA(128).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
  )["params"]
  assert _count(shapes["reconstructive"]) == 69_048_579  # DRAEM's, shared
  disc = _count(shapes["discriminative"])
  assert disc == 832_666  # the chosen defaults (our first reading: 3,643,018)
  assert disc <= 0.25 * 28_374_146
  assert disc + 69_048_579 <= 0.75 * (69_048_579 + 28_374_146)


def test_shapes_at_every_level():
  out, _ = jax.eval_shape(
    lambda: POUTA(8).init_with_output(jax.random.key(0), jnp.ones((2, 64, 64, 3)), train=False)
  )
  assert [level.shape for level in out["level_logits"]] == [
    (2, 64, 64, 2),
    (2, 32, 32, 2),
    (2, 16, 16, 2),
    (2, 8, 8, 2),
  ]
  assert out["logits"].shape == (2, 64, 64, 2) and out["anomaly_map"].shape == (2, 64, 64)
  assert out["reconstruction"].shape == (2, 64, 64, 3)


def _grads(config, batch):
  spec = models.get("pouta")
  model = spec.build(config)
  variables = model.init(jax.random.key(0), batch["augmented"], train=False)

  def loss(params):
    outputs, _ = model.apply(
      {**variables, "params": params}, batch["augmented"], train=True, mutable=["batch_stats"]
    )
    return spec.objective(config)(outputs, batch, models.loss_weights(config))[0]

  return jax.jit(jax.grad(loss))(variables["params"])


def _batch():
  rng = np.random.default_rng(0)
  mask = np.zeros((2, 32, 32), np.float32)
  mask[:, 8:20, 10:18] = 1
  image = rng.random((2, 32, 32, 3)).astype(np.float32)
  return {"image": image, "augmented": image * (1 - mask[..., None]), "mask": mask}


def _norm(tree) -> float:
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_gradients_reach_every_level_head_only_with_deep_supervision(tiny_config, deep_supervision):
  grads = _grads(_pouta_config(tiny_config, deep_supervision=deep_supervision), _batch())
  disc = grads["discriminative"]
  for level in range(4):
    assert (_norm(disc[f"head_{level}"]) > 0) == deep_supervision
    assert _norm(disc[f"compare_{level}"]) > 0  # reached through the final map either way
  assert _norm(disc["head"]) > 0 and _norm(grads["reconstructive"]) > 0


def _param_paths(config):
  model = models.get("pouta").build(config)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )["params"]["discriminative"]
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(shapes)}


def test_each_ablation_changes_only_what_it_names(tiny_config):
  full = _param_paths(_pouta_config(tiny_config))
  no_guidance = _param_paths(_pouta_config(tiny_config, guidance=False))
  assert set(full) - set(no_guidance) == {p for p in full if "guide_" in p}
  assert all(no_guidance[p] == full[p] for p in no_guidance)

  for kept, dropped in (("encoder", "decoder"), ("decoder", "encoder")):
    paths = _param_paths(_pouta_config(tiny_config, compare=kept))
    assert set(full) - set(paths) == {p for p in full if f"project_{dropped}" in p}
    for p, shape in paths.items():
      if "fuse" in p and "kernel" in p:  # one projected input instead of [E, D, |E - D|]
        assert shape[2] * 3 == full[p][2]
      else:
        assert shape == full[p], p

  # Deep supervision is a loss switch: same network, the level terms dropped.
  assert _param_paths(_pouta_config(tiny_config, deep_supervision=False)) == full
  spec = models.get("pouta")
  config = _pouta_config(tiny_config)
  model = spec.build(config)
  batch = _batch()
  variables = model.init(jax.random.key(0), batch["augmented"], train=False)
  outputs = model.apply(variables, batch["augmented"], train=False)
  weights = models.loss_weights(config)
  _, with_ds = spec.objective(config)(outputs, batch, weights)
  off = _pouta_config(tiny_config, deep_supervision=False)
  _, without = spec.objective(off)(outputs, batch, weights)
  assert set(with_ds) - set(without) == {f"focal_level{i}" for i in range(4)}
  assert all(np.allclose(with_ds[k], without[k]) for k in without)


def _with(tiny_config, **model):
  config = _pouta_config(tiny_config)
  config.model.update(model)
  return config


def test_design_options_change_only_what_they_name(tiny_config):
  full = _param_paths(_pouta_config(tiny_config))
  assert _param_paths(_with(tiny_config, detach_features=True)) == full  # a gradient switch
  no_gate = _param_paths(_with(tiny_config, guidance_gate=False))
  assert set(full) - set(no_gate) == {p for p in full if "['gate']" in p} != set()
  assert all(no_gate[p] == full[p] for p in no_gate)
  widths = {
    level: full[f"['compare_{level}']['fuse']['Conv3x3_0']['Conv_0']['kernel']"][3]
    for level in range(4)
  }
  for compare, channels in (("difference", lambda w: w), ("cosine", lambda w: 2 * w + 1)):
    paths = _param_paths(_with(tiny_config, compare=compare))
    assert set(paths) == set(full), compare  # both projections kept
    for level, width in widths.items():
      assert paths[f"['compare_{level}']['fuse']['Conv3x3_0']['Conv_0']['kernel']"][2] == channels(
        width
      )
  pixels = _param_paths(_with(tiny_config, pixel_input=True))
  finest = "['compare_0']['fuse']['Conv3x3_0']['Conv_0']['kernel']"
  assert pixels[finest][2] == full[finest][2] + 9  # x, its reconstruction and |x - recon|
  assert all(shape == full[p] for p, shape in pixels.items() if p != finest)
  wide = _param_paths(_with(tiny_config, discriminative_width=2 * widths[0]))
  assert wide["['head']['Conv_0']['kernel']"][2] == 2 * widths[0] and set(wide) == set(full)
  base = _pouta_config(tiny_config).model.base_width
  assert widths[0] == base // 2  # the fraction's value before it was a key
  other = _param_paths(_with(tiny_config, discriminative_fraction=0.75))
  assert other["['head']['Conv_0']['kernel']"][2] == 3 == 0.75 * base
  pinned = _with(tiny_config, discriminative_fraction=0.75, discriminative_width=2 * widths[0])
  assert _param_paths(pinned) == wide  # a width given wins over the fraction
  per_pixel = _param_paths(_with(tiny_config, fuse_kernel=1))
  for level in widths:  # the fuse alone turns 1x1, with its input and width
    fuse = f"['compare_{level}']['fuse']"
    assert (
      per_pixel[f"{fuse}['Conv_0']['kernel']"]
      == (1, 1) + full[f"{fuse}['Conv3x3_0']['Conv_0']['kernel']"][2:]
    )
  assert {p for p in per_pixel if "['fuse']" in p} == {
    p.replace("['Conv3x3_0']", "") for p in full if "['fuse']" in p
  }
  assert all(per_pixel[p] == full[p] for p in per_pixel if "['fuse']" not in p)
  levels = _param_paths(_with(tiny_config, level_multipliers=(1, 2, 2, 4)))
  assert [
    levels[f"['compare_{level}']['fuse']['Conv3x3_0']['Conv_0']['kernel']"][3] for level in range(4)
  ] == [widths[0] * m for m in (1, 2, 2, 4)]


def test_flops_of_each_part():
  """The profile's parts add up to the whole; the discriminative width moves the
  discriminative part only; the reconstructive part is the network alone less its last conv,
  whose output POUTA's map never reads."""
  import functools

  from pouta_jax import evaluate
  from pouta_jax.models.reconstructive import ReconstructiveNetwork

  def profile(by_part=True, **model):
    config = config_lib.load("pouta")
    config.model.update(base_width=4, **model)
    net = models.get("pouta").build(config)
    # FLOPs do not depend on the values: zeros of the variables' shapes (no init to compile).
    shapes = jax.eval_shape(
      functools.partial(net.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return evaluate.profile(net, variables, 32, 3, 1, by_part), variables

  (pouta, variables), (wide, _) = profile(), profile(discriminative_width=4)
  pouta, wide = pouta["flops"], wide["flops"]
  total_only, _ = profile(by_part=False)  # eval.flops_by_part=False: no more programs
  assert "flops" not in total_only and total_only["flops_per_image"] == pouta["total"]
  for parts in (pouta, wide):
    assert parts["reconstructive"] + parts["discriminative"] + parts["scoring"] == parts["total"]
    assert min(parts.values()) > 0
  assert wide["reconstructive"] == pouta["reconstructive"] and wide["scoring"] == pouta["scoring"]
  assert 2.5 < wide["discriminative"] / pouta["discriminative"] < 4.5  # widths 2 -> 4
  shared = {group: tree["reconstructive"] for group, tree in variables.items()}
  recon = jax.jit(functools.partial(ReconstructiveNetwork(4).apply, train=False))
  alone = recon.lower(shared, jnp.zeros((1, 32, 32, 3))).compile().cost_analysis()["flops"]
  last_conv = 2 * 9 * 4 * 3 * 32 * 32  # the 3x3 conv to RGB, multiply-adds as 2 FLOPs
  assert 0 < alone - pouta["reconstructive"] < 2 * last_conv


def test_the_cost_options_cut_the_discriminative_flops():
  """Our first reading's discriminative part is far above 0.25x DRAEM's FLOPs (most of them the
  finest level's 3x3 convolutions); the chosen defaults (FCM's fuse per pixel, 3/8 of the base
  width, the pixels at the finest level) and a quarter width with a narrower finest level are
  within it. (Base width 16, the tiny configs', where 3/8 is whole; 32 px.)"""
  import functools

  from pouta_jax import evaluate

  def discriminative_flops(name: str, **model) -> float:
    config = config_lib.load(name)
    config.model.update(base_width=16, **model)
    models.get(name).validate(config)
    net = models.get(name).build(config)
    shapes = jax.eval_shape(
      functools.partial(net.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return evaluate.profile(net, variables, 32, 3, 1)["flops"]["discriminative"]

  draem = discriminative_flops("draem")
  reading = discriminative_flops("pouta", compare="both", **READING) / draem
  chosen = discriminative_flops("pouta") / draem
  cheap = discriminative_flops(
    "pouta", fuse_kernel=1, discriminative_width=4, level_multipliers=(1, 2, 2, 4)
  )
  assert reading > 0.6 and chosen <= 0.25 and cheap / draem <= 0.25, (reading, chosen, cheap)


def test_cosine_distance_against_numpy():
  from pouta_jax.models.pouta import cosine_distance

  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 3, 5, 7)), rng.normal(size=(2, 3, 5, 7))
  want = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(cosine_distance(a, b)[..., 0], want, rtol=1e-5)
  assert float(cosine_distance(a, a).max()) < 1e-5


@pytest.mark.parametrize("detach", [False, True])
def test_detached_features_keep_the_discriminative_loss_out_of_the_reconstruction(
  tiny_config, detach
):
  from pouta_jax import objectives

  config = _with(tiny_config, detach_features=detach, pixel_input=True)
  model = models.get("pouta").build(config)
  batch = _batch()
  variables = model.init(jax.random.key(0), batch["augmented"], train=False)

  def focal(params):
    outputs, _ = model.apply(
      {**variables, "params": params}, batch["augmented"], train=True, mutable=["batch_stats"]
    )
    return objectives.segmentation_focal(outputs["logits"], batch["mask"])

  grads = jax.jit(jax.grad(focal))(variables["params"])
  assert (_norm(grads["reconstructive"]) == 0) == detach
  assert _norm(grads["discriminative"]) > 0


def test_level_weights_decay_with_the_training_progress(tiny_config):
  """loss.level_decay=1: the step weighs the level terms by 1 - step / num_steps (train.setup
  gives the step the run's num_steps); the final map's term is not decayed."""
  from pouta_jax import sharding, train

  config = _pouta_config(tiny_config)
  config.loss.level_decay = 1.0
  mesh = sharding.make_mesh(config)
  model, optimizer, state, hparams, num_steps = train.setup(config, [8])
  spec = models.get("pouta")
  step = train.make_train_step(model, spec.objective(config), optimizer, mesh)
  batch = {k: v[None] for k, v in _batch().items()}  # a stack of one run
  half = num_steps // 2
  terms = {}
  for at in (0, half):
    copy = jax.tree.map(jnp.array, state)  # the step donates its state
    _, terms[at] = step(copy.replace(step=jnp.full_like(state.step, at)), batch, hparams)
  assert float(terms[0]["focal_level0"][0]) > 0
  for name in ("focal", "l2", "ssim"):
    np.testing.assert_allclose(terms[half][name], terms[0][name], rtol=1e-6)
  for level in range(4):
    np.testing.assert_allclose(
      terms[half][f"focal_level{level}"],
      (1 - half / num_steps) * terms[0][f"focal_level{level}"],
      rtol=1e-5,
    )


def test_guidance_changes_the_map():
  x = jax.random.uniform(jax.random.key(1), (1, 32, 32, 3))
  a = POUTA(4, guidance=True).init_with_output(jax.random.key(0), x, train=False)[0]
  b = POUTA(4, guidance=False).init_with_output(jax.random.key(0), x, train=False)[0]
  np.testing.assert_allclose(a["reconstruction"], b["reconstruction"], atol=1e-6)
  assert not np.allclose(a["anomaly_map"], b["anomaly_map"])


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("model.compare", "distance", "config.model.compare='distance': expected one of"),
    ("model.discriminative_width", -8, "config.model.discriminative_width=-8: expected an int"),
    ("model.discriminative_fraction", 0.0, "config.model.discriminative_fraction=0.0: expected"),
    ("model.discriminative_fraction", 5.0, r"fraction=5.0: expected a number in \(0"),
    ("loss.level_weights", (1.0, 1.0), r"config.loss.level_weights=\(1.0, 1.0\): expected 4"),
    ("loss.final_weight", -1.0, "config.loss.final_weight=-1.0"),
    ("model.fuse_kernel", 5, r"config.model.fuse_kernel=5: expected one of \(1, 3\)"),
    ("model.level_multipliers", (1, 2, 4), r"level_multipliers=\(1, 2, 4\): expected 4 integers"),
    ("model.level_multipliers", (1, 0, 2, 4), r"level_multipliers=\(1, 0, 2, 4\): expected 4"),
  ],
)
def test_bad_pouta_config_fails_before_any_work(tiny_config, tmp_path, key, value, message):
  config = _pouta_config(tiny_config)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    experiment.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_level_maps_are_scored_beside_the_final_map(tiny_config, tmp_path):
  """eval.level_maps: one row per level (finest first), each scored from that level's map alone
  (its head's softmax resized to the image, no reconstruction error) on the test and the
  validation sets, as computed here from the trained model's outputs; the model's own row is
  the map it had without them."""
  config = make_tiny_config("pouta", tiny_config.data.root)
  config.eval.level_maps = True
  config.data.val_fraction = 0.25
  results = experiment.run(config, tmp_path / "run")
  levels = [f"pouta_level{i}" for i in range(4)]
  assert [name for name in results["metrics"] if name.startswith("pouta")] == ["pouta", *levels]
  trained = export.trained_model(tmp_path / "run")
  folder = category_folder(config)
  sets = {
    "metrics": load_test_set(folder, config.data.image_size),
    "validation": validation.validation_sets(config, [folder])[0],
  }
  written = json.loads((tmp_path / "run" / "metrics.json").read_text())
  weight = config.eval.error_weight
  rows = {"pouta": ("anomaly_map", weight), "fused": ("fused_levels", weight)}
  rows.update({name: (f"level{i}", 0.0) for i, name in enumerate(levels)})
  fused_maps = {}
  for split, data in sets.items():
    images = data["image"].astype(np.float32) / 255
    out = trained.model.apply(trained.variables, images, train=False)
    error = np.abs(images - np.asarray(out["reconstruction"])).mean(-1)
    oracle = {"pouta": np.asarray(out["anomaly_map"]) + weight * error}
    for level, name in enumerate(levels):
      probability = np.asarray(jax.nn.softmax(out["level_logits"][level], -1)[..., 1])
      # The finest level is at the image's size: nothing resized.
      resized = jax.image.resize(probability, images.shape[:3], "bilinear")
      oracle[name] = probability if level == 0 else np.asarray(resized)
    # eval.fuse_levels: the mean of the final map and the four level maps, plus the error.
    oracle["fused"] = (np.asarray(out["anomaly_map"]) + sum(oracle[n] for n in levels)) / 5
    oracle["fused"] += weight * error
    for name, (source, weight_of_row) in rows.items():
      fn = evaluate.model_predict_fn(
        trained.model, trained.variables, config.eval.score_filter_size, source, weight_of_row
      )
      maps, _ = evaluate.predict(fn, data["image"], config.eval.batch_size)
      # atol: ~100 float32 ulps at values up to 2, the rounding of the network's layers in
      # another program (eager, unpadded); another level's map differs by far more.
      np.testing.assert_allclose(maps, oracle[name], atol=1e-5)
      if name == "fused":  # scored below, by the run evaluated again with eval.fuse_levels
        fused_maps[split] = maps
        assert np.abs(maps - oracle["pouta"]).max() > 1e-3  # not the final map's (100 atol)
        continue
      # The metrics are those maps' (the run's programs and batches: the same floats).
      expected = average_precision_score(data["mask"].ravel() > 0, maps.ravel())
      assert results[split][name]["weave"]["pixel_ap"] == pytest.approx(expected, abs=1e-9)
  for name in levels:  # written as the model's own row: validation per kind of anomaly too
    assert set(written[name]["validation_by_defect"]["weave"]) == set(validation.DEFECTS)
  assert "| pouta_level3 | weave |" in (tmp_path / "run" / "results.md").read_text()

  # The run evaluated again with its levels fused (a scoring key: named in allow_changes): its
  # own row's metrics are the fused maps', on both sets; its export and the predict command
  # map them too.
  config.eval.fuse_levels, config.eval.level_maps = True, False
  fused = experiment.run(config, tmp_path / "run", mode="eval", allow_changes=["eval.fuse_levels"])
  for split, data in sets.items():
    expected = average_precision_score(data["mask"].ravel() > 0, fused_maps[split].ravel())
    assert fused[split]["pouta"]["weave"]["pixel_ap"] == pytest.approx(expected, abs=1e-9)
  art = artifact.load(export.export(tmp_path / "run", tmp_path / "artifact"))
  assert "the mean of the final map's and every level's" in art.manifest["outputs"]["anomaly_map"]
  test_images = sets["metrics"]["image"].astype(np.float32) / 255
  np.testing.assert_allclose(art.predict(test_images)[0], fused_maps["metrics"], atol=1e-5)
  from_workdir = predict.from_workdir(tmp_path / "run").fn(test_images)[0]
  np.testing.assert_allclose(from_workdir, fused_maps["metrics"], atol=1e-5)


@pytest.mark.parametrize("key", ["level_maps", "fuse_levels"])
def test_level_keys_need_a_model_with_levels(tiny_config, tmp_path, key):
  """Refused for a model without levels, before any work."""
  draem = make_tiny_config("draem", tiny_config.data.root)
  draem.eval[key] = True
  with pytest.raises(ConfigError, match=f"eval.{key}=True: model 'draem' has no level maps"):
    experiment.run(draem, tmp_path / "draem")
  assert not (tmp_path / "draem").exists()


def test_few_shot_selection_is_seeded(tiny_config):
  tiny_config.data.few_shot = 3
  a = category_folder(tiny_config).train
  b = category_folder(tiny_config).train
  tiny_config.train.seed = 1
  c = category_folder(tiny_config).train
  assert len(a) == 3 and a == b and a != c
  assert list(a) == sorted(a)
  tiny_config.data.few_shot = 100
  with pytest.raises(DataError, match="config.data.few_shot=100: only 8 training images"):
    category_folder(tiny_config)
