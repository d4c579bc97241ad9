import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from pouta_jax import config as config_lib, runs as runs_lib, sharding
from pouta_jax.errors import ConfigError
from tests.conftest import xla_flags

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(330)

REPO = Path(__file__).resolve().parents[1]


def test_mesh_shape_resolves_the_rest():
  assert sharding.mesh_shape((("data", -1),), 8) == {"data": 8}
  assert sharding.mesh_shape((("data", -1), ("model", 2)), 8) == {"data": 4, "model": 2}


@pytest.mark.parametrize(
  "axes,message",
  [
    ((("data", 2),), "uses 2 of the 8 devices"),
    ((("data", -1), ("model", 3)), "3 does not divide the 8 devices"),
    ((("data", -1), ("model", -1)), "at most one -1"),
    ((("model", -1),), "needs a 'data' axis"),
  ],
)
def test_bad_meshes_are_named(axes, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(axes, 8)


@pytest.mark.parametrize(
  "devices,layout,padding",
  [
    (1, {"category": 1, "data": 1}, 0),
    (2, {"category": 1, "data": 2}, 0),
    (6, {"category": 3, "data": 2}, 0),
    (8, {"category": 1, "data": 8}, 0),
    (12, {"category": 3, "data": 4}, 0),
    (15, {"category": 15, "data": 1}, 0),
    # 15 runs and a batch of 8 do not fill 16 devices: one padding row, on the largest run axis
    (16, {"category": 16, "data": 1}, 1),
  ],
)
def test_auto_layout_of_fifteen_stacked_categories(devices, layout, padding):
  found = sharding.layouts(devices, num_runs=15, batch=8)
  assert found[0] == layout
  assert sharding.run_rows(15, layout["category"]) == 15 + padding
  paddings = [sharding.run_rows(15, shape["category"]) - 15 for shape in found]
  assert paddings == sorted(paddings)  # the least work first
  for shape in found:  # every layout listed works: it fills the devices and splits the batch
    assert shape["category"] * shape["data"] == devices
    assert 8 % shape["data"] == 0


def test_run_rows_pad_to_the_run_axis():
  assert [sharding.run_rows(15, axis) for axis in (1, 2, 4, 12, 16)] == [15, 16, 16, 24, 16]
  assert sharding.run_rows(1, 1) == 1  # a single run: a stack of one
  assert runs_lib.padded(["a", "b", "c"], 5) == ["a", "b", "c", "c", "c"]
  assert runs_lib.padded(["a", "b"], 2) == ["a", "b"]


def test_auto_layout_of_a_single_run_splits_the_batch():
  assert sharding.layouts(8, num_runs=1, batch=8) == [{"data": 8}]
  assert sharding.layouts(8, num_runs=1, batch=12) == []


def test_config_mesh_on_this_process(tiny_config):
  tiny_config.data.batch_size = 3
  assert dict(sharding.make_mesh(tiny_config).shape) == {"data": 1}  # one device: any batch
  tiny_config.mesh.axes = (("data", 2),)
  with pytest.raises(ValueError, match=r"config.mesh.axes=.*2 does not divide the 1 devices"):
    sharding.make_mesh(tiny_config)
  tiny_config.mesh.num_devices = 2
  with pytest.raises(ConfigError, match=r"mesh.num_devices=2: expected 0 .* up to the 1 devices"):
    sharding.make_mesh(tiny_config)
  tiny_config.mesh.axes, tiny_config.mesh.num_devices = ("automatic",), 0  # a typo
  with pytest.raises(ConfigError, match=r"mesh.axes=\('automatic',\): expected auto or \(name"):
    sharding.make_mesh(tiny_config)


def test_required_platform_is_checked_and_every_run_says_where_it_runs(tiny_config):
  tiny_config.mesh.require_platform = "cpu"
  mesh = sharding.make_mesh(tiny_config)
  assert sharding.describe(mesh) == (
    f"cpu ({jax.devices()[0].device_kind}): 1 devices of 1, 1 local; process 0 of 1; mesh data 1"
  )
  for platform, install in (("tpu", ".[tpu]"), ("gpu", ".[cuda12]")):
    tiny_config.mesh.require_platform = platform
    with pytest.raises(ConfigError, match=rf"require_platform='{platform}', but jax runs on cpu"):
      sharding.make_mesh(tiny_config)
    with pytest.raises(ConfigError, match=re.escape(install)):
      sharding.make_mesh(tiny_config)
  tiny_config.mesh.require_platform = "TPU"
  with pytest.raises(ConfigError, match=r"config.mesh.require_platform='TPU': expected ''"):
    config_lib.validate(tiny_config)


def _assert_equal_on_eight_devices(
  script: str, *args: str, devices: int = 8, optimize: bool = False
) -> None:
  """Runs `script` in a fresh interpreter with 8 (`devices`) simulated CPU devices; it prints
  EQUAL. `optimize`: with LLVM's optimisations, unlike the other tests (conftest.py), for the
  script whose float64 vmapped steps ran longer unoptimised than compiling them saved (the
  stack of 8 runs: 143 s against 124 s). The others ran
  faster without (PRN's: 75 s against 119 s; the resumed stack: 169 s against 205 s)."""
  level = 2 if optimize else 0
  env = {
    **os.environ,
    "XLA_FLAGS": xla_flags(
      f"--xla_force_host_platform_device_count={devices}",
      f"--xla_backend_optimization_level={level}",
    ),
    "JAX_PLATFORMS": "cpu",
  }
  result = subprocess.run(
    [sys.executable, "-c", script, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "EQUAL" in result.stdout


SCRIPT = textwrap.dedent("""
    import jax, numpy as np, optax
    # float64: the sharded step must compute the same function. In float32 the two differ by
    # rounding that BatchNorm's backward pass amplifies at this tiny width (~1e-2 relative).
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh
    from pouta_jax import config as config_lib, models, sharding, train
    assert jax.device_count() == 8, jax.devices()
    config = config_lib.load("draem", "weave,tiny")
    config.data.batch_size = 12
    for axes, message in [
        (("auto",), "no mesh of all 8 devices holds a batch of 12 (config.data.batch_size); "
                    "layouts that would: mesh.num_devices=6 (data 6), mesh.num_devices=4 "
                    "(data 4), mesh.num_devices=3 (data 3), mesh.num_devices=2 (data 2)"),
        ((("data", -1),), "config.data.batch_size=12 does not split over the 8 devices")]:
      config.mesh.axes = axes
      try:
        sharding.make_mesh(config)
        raise AssertionError("a batch of 12 cannot split over 8 devices")
      except ValueError as e:
        assert message in str(e), e
    config.mesh.axes = ("auto",)
    config.mesh.num_devices = 6  # a subset of the devices
    assert dict(sharding.make_mesh(config).shape) == {"data": 6}
    config.mesh.num_devices = 0
    config.data.batch_size = 8
    assert dict(sharding.make_mesh(config).shape) == {"data": 8}
    config.model.base_width = 4
    config.data.image_size = 32
    model = models.get("draem").build(config)
    # Plain SGD: parameter differences are gradient differences as they are (Adam's first step
    # is lr * sign(g): noise on the zero gradients of pre-BatchNorm conv biases becomes a step).
    tx = optax.sgd(1e-2)
    objective = models.get("draem").objective(config)
    rng = np.random.default_rng(0)
    image = rng.random((8, 32, 32, 3))
    mask = (rng.random((8, 32, 32)) > 0.9).astype(np.float64)
    batch = {"image": image, "augmented": image * (1 - mask[..., None]), "mask": mask,
             "has_anomaly": mask.max(axis=(1, 2))}
    batch = {k: v[None] for k, v in batch.items()}  # a stack of one run
    hparams = train.stack_runs([train.hyperparameters(config, 1)])
    # A host copy in float64 (astype on device arrays would compile one program per shape).
    init = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x,
                        train.stack_runs([train.fresh_state(model, tx, 32, seed=0)]))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = Mesh(np.asarray(devices), ("data",))
      state = jax.device_put(init, sharding.replicated(mesh))
      step = train.make_train_step(model, objective, lambda optim: tx, mesh)
      state, metrics = step(state, batch, hparams)
      results.append((float(metrics["loss"][0]), jax.device_get(state)))
      assert state.params["reconstructive"]["head"]["Conv_0"]["kernel"].sharding.is_fully_replicated
    (loss1, state1), (loss8, state8) = results
    np.testing.assert_allclose(loss1, loss8, rtol=1e-10)
    # Parameters after the update, and BatchNorm's running statistics: over the global batch.
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

    config.data.categories = ("weave", "pill", "washer")
    config.mesh.axes, config.mesh.num_devices = ("auto",), 6
    assert dict(sharding.make_mesh(config).shape) == {"category": 3, "data": 2}
    config.mesh.axes, config.mesh.num_devices = (("category", 2), ("data", -1)), 0
    mesh = sharding.make_mesh(config)  # 3 runs on a run axis of 2: one padding row
    assert sharding.mesh_rows(mesh, config) == 4
    config.data.categories = ()
    try:
      sharding.make_mesh(config)
      raise AssertionError("a single run has no run axis to split")
    except ValueError as e:
      assert "a 'category' axis of 2 devices needs stacked runs" in str(e), e
    print("EQUAL")
""")


def test_eight_devices_match_one_device():
  _assert_equal_on_eight_devices(SCRIPT)


# 2 categories x 2 seeds x 2 learning rates in one program, against the 8 runs trained alone:
# the same data streams, initialisations and Adam steps with a decayed learning rate at the
# second (float64), then the same metrics; the stack on 1 device, and on 12 in the layout "auto"
# takes there: a run axis of 3 (9 rows, one of them padding that copies the last run) with each
# run's batch split over 4 devices, every kind of layout at once. First, the layouts "auto"
# takes for 15 runs on 1 to 16 devices (runs split, the batch split, padding rows). Width 2 and
# 2 steps: XLA:CPU's float64 grouped convolutions (a vmapped step's) are slow.
STACK_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import PartitionSpec
    from pouta_jax import config as config_lib, evaluate, models, runs, sharding, train
    from pouta_jax.data import category_folder, pipeline
    from pouta_jax.data.folder import load_test_set

    config = config_lib.load("draem", "weave,pill,tiny")
    config.data.root = sys.argv[1]
    config.model.base_width, config.data.image_size, config.data.batch_size = 2, 32, 4
    config.data.num_workers, config.train.num_steps = 0, 2
    config.optim.milestones = (0.5,)  # the schedule's decay takes part
    config.stack.seeds, config.stack.sweep = 2, ("optim.lr=1e-3,3e-3",)
    config.train.category_loop = "vmap"
    fifteen = config_lib.load("draem", "weave,pill,washer,tiny")
    fifteen.data.batch_size, fifteen.stack.seeds = 2, 5
    layouts = {1: (1, 1, 15), 2: (1, 2, 15), 3: (3, 1, 15), 4: (4, 1, 16), 5: (5, 1, 15),
               6: (3, 2, 15), 7: (7, 1, 21), 8: (8, 1, 16), 10: (5, 2, 15), 12: (6, 2, 18),
               15: (15, 1, 15), 16: (16, 1, 16)}
    for num_devices, (runs_axis, data_axis, rows) in layouts.items():
      fifteen.mesh.num_devices = num_devices
      mesh = sharding.make_mesh(fifteen)
      assert dict(mesh.shape) == {"category": runs_axis, "data": data_axis}, (num_devices, mesh)
      assert sharding.mesh_rows(mesh, fifteen) == rows, num_devices

    program = runs.runs_of(config)
    assert [r.name for r in program][:3] == [
        "optim.lr=1e-3,train.seed=0/weave", "optim.lr=1e-3,train.seed=0/pill",
        "optim.lr=1e-3,train.seed=1/weave"], program

    def f64(tree):
      return jax.tree.map(
          lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, jax.device_get(tree))

    def trained(config, axes):
      # (model, losses (steps, rows), the host state after each step, the mesh's shape)
      config.mesh.axes = axes
      mesh = sharding.make_mesh(config)
      rows = sharding.mesh_rows(mesh, config)
      folders = [category_folder(r.config) for r in runs.runs_of(config)]
      model, optimizer, state, hparams, num_steps = train.setup(
          config, [len(f.train) for f in folders], rows)
      on_state = sharding.state_sharding(mesh)
      state, hparams = jax.device_put(f64(state), on_state), jax.device_put(f64(hparams), on_state)
      step = train.make_train_step(model, models.get("draem").objective(config), optimizer, mesh,
                                   train.category_loop(config, mesh))
      batches = iter(pipeline.training_batches(config, folders, mesh, num_steps))
      losses, states = [], []
      for _ in range(num_steps):
        local = {k: v / 255.0 if k in pipeline.IMAGE_KEYS else v.astype(np.float64)
                 for k, v in next(batches).items()}
        batch = sharding.global_batch(sharding.batch_sharding(mesh), local,
                                      pipeline.batch_shape(config, rows))
        state, metrics = step(state, batch, hparams)
        losses.append(np.asarray(metrics["loss"]))
        states.append(jax.device_get(state))
      pipeline.close(batches)
      if "category" in mesh.axis_names:
        kernel = state.params["reconstructive"]["head"]["Conv_0"]["kernel"]
        assert kernel.sharding.spec == PartitionSpec("category"), kernel.sharding
      return model, np.array(losses), states, dict(mesh.shape)

    def metrics_of(model, variables, run):
      test_set = load_test_set(category_folder(run.config), 32)
      predict = evaluate.model_predict_fn(model, variables, 3)
      return evaluate.evaluate(predict, test_set, 8).metrics

    separate = []
    for run in program:
      run.config.mesh.num_devices = 1
      model, losses, states, _ = trained(run.config, ("auto",))
      # A separate run is a stack of one.
      alone_variables = train.run_variables(states[-1].variables, 0)
      separate.append((losses, states, metrics_of(model, alone_variables, run)))
    for num_devices, layout in ((1, (1, 1)), (12, (3, 4))):
      config.mesh.num_devices = num_devices
      model, losses, states, shape = trained(config, ("auto",))
      assert shape == {"category": layout[0], "data": layout[1]}, shape
      assert losses.shape == (2, 8 if num_devices == 1 else 9), losses.shape
      padding = losses[:, 8:]  # a copy of the last run
      np.testing.assert_allclose(padding, losses[:, 7:8] + 0 * padding, rtol=1e-12)
      for i, (run, (alone_losses, alone, alone_metrics)) in enumerate(zip(program, separate)):
        np.testing.assert_allclose(losses[:, i:i + 1], alone_losses, rtol=1e-8)
        mine = jax.tree.map(lambda x: x[i:i + 1], states[-1])  # a stack of one, as `alone`
        # atol: the biases of convolutions before BatchNorm have a gradient of rounding noise
        # only (BatchNorm removes them), and Adam turns noise of ~eps into steps of ~lr * 1e-5.
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(alone[-1])):
          np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-7)
        got = metrics_of(model, train.run_variables(mine.variables, 0), run)
        for key, value in alone_metrics.items():
          np.testing.assert_allclose(
              got[key], value, rtol=1e-7, err_msg=f"{num_devices} {run.name} {key}")
    # The runs differ: seeds and learning rates take effect.
    first = [l[0, 0] for l, _, _ in separate]
    assert len(set(np.round(first, 12))) == 4, first  # 2 categories x 2 seeds
    kernels = [s[-1].params["reconstructive"]["head"]["Conv_0"]["kernel"] for _, s, _ in separate]
    assert not np.allclose(kernels[0], kernels[4])  # lr 1e-3 against 3e-3
    print("EQUAL")
""")


def test_a_stack_of_categories_seeds_and_learning_rates_equals_separate_runs(dataset_root):
  _assert_equal_on_eight_devices(STACK_SCRIPT, str(dataset_root), devices=16, optimize=True)


# train.train end to end: 3 runs on a run axis of 3 (no padding) for 2 steps, then the same
# from its step-1 checkpoint on a run axis of 2 (a padding row, restored as a copy of the last
# run; the batches rebuilt from the step): the resumed step's losses equal the uninterrupted
# ones, and nothing is written for the padding row.
RESUME_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import jax, numpy as np
    from pouta_jax import config as config_lib, runs, sharding, train
    from pouta_jax.data import category_folder

    config = config_lib.load("draem", "weave,pill,washer,tiny")
    config.data.root, workdir = sys.argv[1], Path(sys.argv[2])
    config.model.base_width, config.data.image_size, config.data.batch_size = 2, 32, 2
    config.data.num_workers, config.train.num_steps = 0, 2
    config.train.log_every = config.train.checkpoint_every = 1
    config.train.category_loop = "vmap"
    folders = [category_folder(r.config) for r in runs.runs_of(config)]

    def losses(step):
      return [json.loads((workdir / c / "scalars.jsonl").read_text().splitlines()[step - 1])
              ["loss"] for c in ("weave", "pill", "washer")]

    config.mesh.num_devices = 3
    mesh = sharding.make_mesh(config)
    assert dict(mesh.shape) == {"category": 3, "data": 1}, mesh.shape
    train.train(config, workdir, folders, mesh)
    uninterrupted = losses(2)
    shutil.rmtree(workdir / "checkpoints" / "2")
    config.mesh.num_devices, config.mesh.axes = 2, (("category", 2), ("data", 1))
    mesh = sharding.make_mesh(config)
    assert sharding.mesh_rows(mesh, config) == 4
    state = train.train(config, workdir, folders, mesh)
    assert state.step.shape == (4,), state.step.shape
    np.testing.assert_allclose(losses(2), uninterrupted, rtol=1e-5)
    kernel = jax.device_get(state.params["reconstructive"]["head"]["Conv_0"]["kernel"])
    np.testing.assert_array_equal(kernel[3], kernel[2])  # the padding row copies the last run
    assert sorted(p.name for p in workdir.iterdir() if p.is_dir() and p.name != "tensorboard") \
        == ["checkpoints", "pill", "washer", "weave"], list(workdir.iterdir())
    print("EQUAL")
""")


def test_a_stack_resumes_on_a_layout_with_other_padding(dataset_root, tmp_path):
  _assert_equal_on_eight_devices(RESUME_SCRIPT, str(dataset_root), str(tmp_path / "run"))


PRN_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh
    from pouta_jax import config as config_lib, models, sharding, train
    config = config_lib.load("prn", "weave,tiny")
    config.model.base_width, config.data.image_size = 4, 32
    config = models.resolve(config, [20])
    spec = models.get("prn")
    model, objective, tx = spec.build(config), spec.objective(config), optax.sgd(1e-2)
    rng = np.random.default_rng(0)
    image = rng.random((8, 32, 32, 3))
    mask = (rng.random((8, 32, 32)) > 0.9).astype(np.float64)
    batch = {"image": image, "augmented": image * (1 - mask[..., None]), "mask": mask,
             "has_anomaly": mask.max(axis=(1, 2))}
    batch = {k: v[None] for k, v in batch.items()}  # a stack of one run
    hparams = train.stack_runs([train.hyperparameters(config, 1)])
    init = train.stack_runs([train.fresh_state(model, tx, 32, seed=0, frozen=spec.frozen)])
    init = jax.tree.map(lambda x: x.astype(np.float64) if x.dtype == np.float32 else x, init)
    # Prototypes that are not zero, so residuals take part.
    init = init.replace(constants={**init.constants, "prototypes": jax.tree.map(
        lambda p: rng.standard_normal(p.shape), init.constants["prototypes"])})
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = Mesh(np.asarray(devices), ("data",))
      state = jax.device_put(init, sharding.replicated(mesh))
      step = train.make_train_step(model, objective, lambda optim: tx, mesh)
      state, metrics = step(state, batch, hparams)
      assert state.constants["prototypes"]["scale_0"].sharding.is_fully_replicated
      results.append((float(metrics["loss"][0]), jax.device_get(state)))
    (loss1, state1), (loss8, state8) = results
    np.testing.assert_allclose(loss1, loss8, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state8)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(jax.tree.leaves(init.constants), jax.tree.leaves(state8.constants)):
      np.testing.assert_array_equal(a, b)
    print("EQUAL")
""")


def test_prn_on_eight_devices_matches_one_device_and_keeps_its_constants():
  _assert_equal_on_eight_devices(PRN_SCRIPT)
