"""Train state, the jit-compiled train step and the train loop; model-agnostic.

The model and its objective come from the registry; the loop never branches on the model.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils.epath import Path
from jax.sharding import Mesh
from tqdm import tqdm

from pouta_jax import checkpoint, errors, models, preemption, report, runs as runs_lib, sharding
from pouta_jax.data import pipeline
from pouta_jax.data.folder import CategoryFolder, load_image


class TrainState(flax.struct.PyTreeNode):
  """`params` and `batch_stats` are what training changes; `constants` the variables it never
  does: frozen submodules (a pretrained backbone) and collections such as PRN's prototypes,
  set before step 0 by the model's prepare stage and saved with the rest. `best`: with
  train.select=best_val, the params and batch_stats of the best validation `metric` so far and
  its `step` (`keep_best`), checkpointed with the rest; empty otherwise."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  constants: Any = flax.struct.field(default_factory=dict)
  best: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    return models.merge_variables(self.params, self.batch_stats, self.constants)

  @property
  def selected_variables(self) -> dict:
    """What the run evaluates and exports: the best validation step's variables (train.select
    best_val) or the last step's."""
    if not self.best:
      return self.variables
    return models.merge_variables(self.best["params"], self.best["batch_stats"], self.constants)

  @property
  def selected_step(self) -> jax.Array:
    return self.best["step"] if self.best else self.step


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  """`train.num_steps`, or `train.num_epochs` epochs of ceil(N / batch) steps (as DRAEM)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(config.train.num_epochs * math.ceil(num_train_images / config.data.batch_size))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Adam with DRAEM's step schedule (lr x decay at each milestone step) and, with
  `weight_decay`, the decay added to the gradients as PyTorch's Adam does (PRN's setting).

  Called with a run's `optim` hyperparameters (`hyperparameters`: lr, decay, weight_decay and
  the milestone steps): numbers, or arrays traced inside the step, so that runs stacked in one
  program each have their own. Only the number of milestones and whether any run decays weights
  fix the program (a run without decay adds 0): runs of other lengths share a compiled step.
  """

  weight_decay: bool

  def __call__(self, optim: dict) -> optax.GradientTransformation:
    def learning_rate(count):
      value = optim["lr"]
      for i in range(len(optim["milestone_steps"])):
        value = jnp.where(count >= optim["milestone_steps"][i], value * optim["decay"], value)
      return value

    adam = optax.adam(learning_rate)
    if not self.weight_decay:
      return adam
    return optax.chain(optax.add_decayed_weights(optim["weight_decay"]), adam)


def make_optimizer(config: ml_collections.ConfigDict) -> Optimizer:
  """The program's optimizer: weight decay if any run has some."""
  return Optimizer(
    weight_decay=any(run.config.optim.weight_decay for run in runs_lib.runs_of(config))
  )


# A milestone step no run reaches: it fills a run's schedule up to the program's count.
NEVER = np.iinfo(np.int32).max


def milestone_steps(config: ml_collections.ConfigDict, num_steps: int) -> list[int]:
  """The distinct steps at which a run of `num_steps` decays its learning rate."""
  return sorted({int(m * num_steps) for m in config.optim.milestones})


def hyperparameters(
  config: ml_collections.ConfigDict, num_steps: int, num_milestones: int = 0
) -> dict:
  """A run's numbers that its step takes as arrays (see `Optimizer`, objectives.py) when it
  trains for `num_steps`: its milestone steps (filled up to `num_milestones` with NEVER, as the
  program's other runs need), and the objective sees the progress."""
  optim = {k: np.float32(config.optim[k]) for k in ("lr", "decay", "weight_decay")}
  milestones = milestone_steps(config, num_steps)
  milestones += [NEVER] * (num_milestones - len(milestones))
  optim["milestone_steps"] = np.array(milestones, np.int32)
  return {"optim": optim, "loss": models.loss_weights(config), "num_steps": np.float32(num_steps)}


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module, image_size: int) -> Callable:
  """`model.init` compiled without LLVM's optimisations: it runs once, and compiling the random
  numbers of every initialiser took longer than the train step (tiny DRAEM on 2 cores: 23 s,
  11 s without; values agree to float32 rounding, and every run compiles it alike)."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  init = jax.jit(lambda key: model.init(key, dummy, train=False))
  return init.lower(jax.random.key(0)).compile({"xla_backend_optimization_level": 0})


def fresh_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_size: int,
  seed: int,
  frozen: tuple[str, ...] = (),
  keep_best: bool = False,
) -> TrainState:
  """The freshly initialised state; the `frozen` submodules go to its constants. With
  `keep_best`, a `best` record that any validation result replaces (metric -inf)."""
  variables = _jitted_init(model, image_size)(jax.random.key(seed))
  params, batch_stats, constants = models.split_variables(variables, frozen)
  best = {}
  if keep_best:  # copies: the train step donates the state's buffers
    best = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    best.update(metric=jnp.array(-jnp.inf, jnp.float32), step=jnp.array(0, jnp.int32))
  return TrainState(
    step=jnp.array(0, jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=jax.jit(tx.init)(params),
    constants=constants,
    best=best,
  )


@functools.partial(jax.jit, donate_argnums=0)
def kept_best(state: TrainState, metric: jax.Array) -> TrainState:
  """`state` with its `best` record replaced where `metric` (one per row of the run axis, or a
  scalar) beats it: the current params, batch_stats, metric and step. Ties keep the earlier."""
  better = metric > state.best["metric"]

  def pick(new, old):
    return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new, old)

  current = {"params": state.params, "batch_stats": state.batch_stats}
  current.update(metric=metric.astype(jnp.float32), step=state.step)
  return state.replace(best=jax.tree.map(pick, current, state.best))


class Setup(NamedTuple):
  """What a program trains: the model, its optimizer, the step-0 state, each run's
  hyperparameters and the number of steps. The state and the hyperparameters have a leading
  run axis (runs.py: a single run is a stack of one)."""

  model: nn.Module
  optimizer: Optimizer
  state: TrainState
  hparams: dict
  num_steps: int


def setup(config: ml_collections.ConfigDict, train_sizes: Sequence[int], rows: int = 0) -> Setup:
  """The `Setup` of the program's runs, which have `train_sizes` training images each. Each
  run starts from its seed's initialisation, as a separate run with that seed does. `rows`:
  the run axis's rows where the mesh pads the runs (sharding.run_rows; runs.padded)."""
  steps = {num_train_steps(config, n) for n in train_sizes}
  if len(steps) > 1:
    raise errors.ConfigError(
      f"config.train.num_steps={config.train.num_steps}: the runs' epoch-based schedules "
      f"differ ({sorted(steps)} steps); runs trained in one program need one step count"
    )
  num_steps = steps.pop()
  spec = models.get(config.model.name)
  model = spec.build(config)
  optimizer = make_optimizer(config)
  run_configs = [run.config for run in runs_lib.padded(runs_lib.runs_of(config), rows)]
  # The runs' schedules as long as the longest: the number of milestones fixes the program.
  num_milestones = max(len(milestone_steps(c, num_steps)) for c in run_configs)
  hparams = [hyperparameters(c, num_steps, num_milestones) for c in run_configs]
  states = {}  # by seed: runs with one seed start alike
  for c, h in zip(run_configs, hparams):
    if c.train.seed not in states:
      tx = optimizer(h["optim"])
      states[c.train.seed] = fresh_state(
        model, tx, c.data.image_size, c.train.seed, spec.frozen, c.train.select == "best_val"
      )
  state = jax.device_put(stack_runs([states[c.train.seed] for c in run_configs]))
  return Setup(model, optimizer, state, stack_runs(hparams), num_steps)


# The stream of train.seed that the prepare stage draws from (init uses the seed itself).
PREPARE_STREAM = 1


def prepared_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  state: TrainState,
  folders: Sequence[CategoryFolder],
) -> TrainState:
  """The model's prepare stage (models.ModelSpec.prepare) on a step-0 state, per run on its
  category's normal training images (`folders`, one per run; padding rows copy the last run's);
  the state itself when the model has none."""
  spec = models.get(config.model.name)
  if spec.prepare is None:
    return state
  host_variables = jax.device_get(state.variables)  # one copy for every run's slice
  prepared = []
  for index, (run, folder) in enumerate(zip(runs_lib.runs_of(config), folders)):
    key = jax.random.fold_in(jax.random.key(run.config.train.seed), PREPARE_STREAM)
    images = np.stack([load_image(path, config.data.image_size) for path in folder.train])
    logging.info(
      "Preparing %s for %s (%d training images)",
      config.model.name,
      run.name or folder.category,
      len(images),
    )
    prepared.append(
      spec.prepare(
        run.config,
        model,
        run_variables(host_variables, index),
        images.astype(np.float32) / 255.0,
        key,
      )
    )
  variables = stack_runs(runs_lib.padded(prepared, state.step.shape[0]))
  params, batch_stats, constants = models.split_variables(variables, spec.frozen)
  # The optimizer state depends on the trainable parameters' structure only, which is unchanged.
  return state.replace(params=params, batch_stats=batch_stats, constants=constants)


def run_variables(variables: dict, index: int) -> dict:
  """Host copies of the variables of the `index`-th run of stacked `variables`."""
  return jax.tree.map(lambda x: np.asarray(x)[index], variables)


def stack_runs(trees: Sequence[Any]) -> Any:
  """The runs' `trees` stacked on a new leading run axis, as host arrays: on the device, each
  distinct leaf shape (or, jitted, each tree) compiled a program of its own (a stacked PRN
  setup compiled 350, 50 s on 2 cores)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(list(trees)))


def current_step(state: TrainState) -> int:
  """The step of a (possibly sharded) state, read from this process's data."""
  return int(np.asarray(state.step.addressable_data(0)).reshape(-1)[0])


def category_loop(config: ml_collections.ConfigDict, mesh: Mesh) -> str:
  """How the step runs the program's runs on `mesh`.

  "vmap" batches them into one computation (each conv becomes a grouped conv): what
  accelerators want, and what a run axis split over devices needs (each device steps its own
  runs; an unrolled step slices the split axis run by run: two processes of 2 CPU devices
  each compiled it for 280 s under the test suite's load, the vmapped step in 40 s). XLA's
  CPU grouped convolutions are slow (a vmapped step measured 0.4x the throughput of separate
  steps on 2 cores, `bench/stacked_vs_separate.py`), so "auto" takes "unroll" on the CPU when
  the runs are not split: one program with one copy of the step per run. A single run
  unrolls: its one copy is the plain model.
  """
  loop = config.train.category_loop
  if runs_lib.count(config) == 1:
    return "unroll"
  if loop != "auto":
    return loop
  split = dict(mesh.shape).get(sharding.CATEGORY_AXIS, 1) > 1
  return "unroll" if jax.default_backend() == "cpu" and not split else "vmap"


def _unrolled(step: Callable) -> Callable:
  def unrolled_step(state: TrainState, batch: dict, hparams: dict) -> tuple[TrainState, dict]:
    num_runs = jax.tree.leaves(batch)[0].shape[0]
    outs = [
      step(*jax.tree.map(lambda x, i=i: x[i], (state, batch, hparams))) for i in range(num_runs)
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled_step


@functools.lru_cache(maxsize=16)
def make_train_step(
  model: nn.Module,
  objective: Callable,
  optimizer: Callable[[dict], optax.GradientTransformation],
  mesh: Mesh,
  loop: str = "unroll",
) -> Callable:
  """One jit-compiled step (state, batch, hparams) -> (state, metrics): forward in train mode,
  objective, gradients, optimizer update; `hparams` as `hyperparameters` gives them.

  State, batch and hparams have a leading run axis, each run its own model in one program,
  which `loop` ("vmap" or "unroll", see `category_loop`) steps. The state is split over the
  mesh's category axis if it has one, else replicated; the batch over the data axis: the loss,
  the BatchNorm statistics and the gradients are each run's over its global batch.
  """

  def loss_fn(params, state: TrainState, batch: dict, weights: dict):
    batch = pipeline.decode(batch)
    variables = models.merge_variables(params, state.batch_stats, state.constants)
    outputs, updates = model.apply(
      variables, batch["augmented"], train=True, mutable=["batch_stats"]
    )
    loss, terms = objective(outputs, batch, weights)
    # Frozen submodules' statistics come back unchanged; they stay with the constants.
    batch_stats = {k: v for k, v in updates["batch_stats"].items() if k in state.batch_stats}
    return loss, (terms, batch_stats)

  def step(state: TrainState, batch: dict, hparams: dict) -> tuple[TrainState, dict]:
    # Objectives may weigh their terms by the training progress.
    weights = {**hparams["loss"], "progress": state.step / hparams["num_steps"]}
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state, batch, weights
    )
    tx = optimizer(hparams["optim"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
    )
    # The gradient norm is checked with the loss: a non-finite one must never be saved.
    return new_state, {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}

  if loop not in ("vmap", "unroll"):
    raise ValueError(f"category loop {loop!r}: expected 'vmap' or 'unroll'")
  body = jax.vmap(step) if loop == "vmap" else _unrolled(step)
  state_sharding = sharding.state_sharding(mesh)
  return jax.jit(
    body,
    in_shardings=(state_sharding, sharding.batch_sharding(mesh), state_sharding),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


# How many dispatched steps may be unfinished on the device (see `train`): 2 keeps the device
# busy (the next step is queued while one runs) and bounds the host's lead.
MAX_STEPS_IN_FLIGHT = 2


def _checked_metrics(
  step_metrics: dict, step: int, newest_checkpoint: int | None, workdir: Path
) -> dict[str, np.ndarray]:
  """Host copies of the step's metrics (one value per row of the run axis). Raises DivergedError
  if any value of any run is not finite."""
  values = {k: np.asarray(v) for k, v in jax.device_get(step_metrics).items()}
  bad = sorted(k for k, v in values.items() if not np.isfinite(v).all())
  if bad:
    raise errors.DivergedError(
      f"non-finite training metrics {bad} at step {step} "
      f"({ {k: values[k].tolist() for k in bad} }); training stopped. "
      + (
        f"The newest good checkpoint is step {newest_checkpoint} in {workdir}/checkpoints"
        if newest_checkpoint is not None
        else f"No checkpoint was saved in {workdir}/checkpoints (the workdir is not bound to "
        "this config: a corrected rerun starts afresh)"
      )
    )
  return values


class _Scalars:
  """Training scalars: the program's (means over runs, plus `loss/<run>` when stacked) in the
  workdir, and each stacked run's own in its folder, as a separate run writes them. Only the
  primary process writes."""

  def __init__(self, workdir: Path, runs: Sequence[runs_lib.Run], start: int):
    self._names = [run.name for run in runs] if len(runs) > 1 else []
    self._count = len(runs)
    primary = sharding.is_primary()
    self._program = report.ScalarWriter(workdir, start) if primary else None
    self._runs = [report.ScalarWriter(workdir / n, start) for n in self._names if primary]

  def write(
    self,
    step: int,
    values: dict[str, np.ndarray],
    rate: float,
    validation: Sequence[dict[str, float]] = (),
  ) -> dict[str, float]:
    """Writes one step's `values` (one per row of the run axis; padding rows are left out)
    and each run's `validation` metrics (as `val/<metric>`; the program's: their means);
    returns the program's scalars."""
    values = {k: v[: self._count] for k, v in values.items()}
    metric_names = validation[0] if validation else {}
    values.update(
      {f"{report.VALIDATION_PREFIX}{k}": np.array([m[k] for m in validation]) for k in metric_names}
    )
    scalars = {k: float(np.mean(v)) for k, v in values.items()}
    if self._names:
      scalars.update({f"loss/{n}": float(v) for n, v in zip(self._names, values["loss"])})
    scalars["steps_per_second"] = rate
    if self._program is not None:
      self._program.write(step, scalars)
    for i, writer in enumerate(self._runs):
      writer.write(step, {**{k: float(v[i]) for k, v in values.items()}, "steps_per_second": rate})
    return scalars

  def flush(self) -> None:
    for writer in [self._program, *self._runs]:
      if writer is not None:
        writer.flush()

  def close(self) -> None:
    for writer in [self._program, *self._runs]:
      if writer is not None:
        writer.close()


# Scores a model's variables (host copies, stacked like the state) on each run's validation set:
# one metrics dict per run (experiment.py builds it; the train loop knows no evaluation).
Validator = Callable[[nn.Module, dict], list[dict[str, float]]]


def train(
  config: ml_collections.ConfigDict,
  workdir: str | Path,
  folders: Sequence[CategoryFolder],
  mesh: Mesh | None = None,
  validate: Validator | None = None,
) -> TrainState:
  """Trains (or resumes) in `workdir` until the configured number of steps; returns the state.

  `folders`: each run's data (runs.runs_of), one or several runs trained in one program with a
  stacked state. Checkpoints hold the train state and the data iterator, so a
  restarted run continues with the batch that followed the checkpoint and ends bitwise equal
  to an uninterrupted one. A non-finite loss stops training with DivergedError before
  anything is saved, so the newest checkpoint on disk is always a good one; a SIGTERM saves a
  checkpoint and raises preemption.Preempted. `mesh`: the config's (`sharding.make_mesh`) unless
  the caller built it already. `validate`: scored every `eval.val_every` steps and at the last
  one, into the scalars as `val/<metric>`.
  """
  workdir = Path(workdir)
  if config.train.select == "best_val" and validate is None:
    raise errors.ConfigError(
      "config.train.select='best_val': this caller of train.train gives no validation to "
      "select by (experiment.run does)"
    )
  runs = runs_lib.runs_of(config)
  mesh = sharding.make_mesh(config) if mesh is None else mesh
  rows = sharding.mesh_rows(mesh, config)
  if rows > len(runs):
    logging.info(
      "%d runs on a run axis of %d devices: %d padding rows (copies of the last run, not "
      "written), %.0f%% more work",
      len(runs),
      dict(mesh.shape)[sharding.CATEGORY_AXIS],
      rows - len(runs),
      100 * (rows - len(runs)) / len(runs),
    )
  model, optimizer, initial, hparams, num_steps = setup(
    config, [len(f.train) for f in folders], rows
  )
  state_sharding = sharding.state_sharding(mesh)
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  restored = checkpoint.restore_latest_with_rows(
    mngr, jax.device_put(initial, state_sharding), len(runs)
  )
  if restored is not None:
    state = restored.state
    logging.info("Resumed from step %d in %s", current_step(state), workdir)
  else:
    state = jax.device_put(prepared_state(config, model, initial, folders), state_sharding)
  start = current_step(state)
  if start >= num_steps:
    mngr.close()
    return state

  objective = models.get(config.model.name).objective(config)
  train_step = make_train_step(model, objective, optimizer, mesh, category_loop(config, mesh))
  hparams = jax.device_put(hparams, state_sharding)
  batches = iter(pipeline.training_batches(config, folders, mesh, num_steps))
  # The iterator's saved state holds the saved mesh's padding rows: with other padding, the
  # batches are rebuilt from the step (each is a function of the seeds and the step).
  if start > 0 and not (
    restored.saved_rows == rows and checkpoint.restore_data_iterator(mngr, start, batches)
  ):
    batches.close()
    batches = iter(pipeline.training_batches(config, folders, mesh, num_steps, start))
  batch_sharding, leading = sharding.batch_sharding(mesh), pipeline.batch_shape(config, rows)
  # From a checkpoint, records after its step are dropped: they belong to the lost steps.
  scalars = _Scalars(workdir, runs, start)
  notice = preemption.Notice()
  last_time, last_step = time.perf_counter(), start
  in_flight: collections.deque = collections.deque()  # dispatched steps' losses
  try:
    with tqdm(
      total=num_steps,
      initial=start,
      desc=f"train {len(runs)} runs" if len(runs) > 1 else f"train {folders[0].category}",
      unit="step",
      dynamic_ncols=True,
      disable=not sharding.is_primary(),
    ) as bar:

      def finish(keep: int) -> None:
        """Waits until at most `keep` dispatched steps are unfinished; the bar counts the rest."""
        while len(in_flight) > keep:
          jax.block_until_ready(in_flight.popleft())
          bar.update(1)

      step, step_metrics = start, None
      while step < num_steps:
        # The host dispatches ahead of the device by at most MAX_STEPS_IN_FLIGHT steps, so a
        # preemption notice is acted on within that many step times.
        finish(MAX_STEPS_IN_FLIGHT - 1)
        if notice.reached(step):
          finish(0)
          if step_metrics is not None:  # never save a non-finite state
            _checked_metrics(step_metrics, step, mngr.latest_step(), workdir)
          if mngr.latest_step() != step:
            checkpoint.save(mngr, step, state, batches)
          raise preemption.Preempted(
            f"{notice.what}: saved step {step} of {num_steps} in {workdir}/checkpoints;"
            f" run the same command again to resume",
            notice.exit_code,
          )
        batch = sharding.global_batch(batch_sharding, next(batches), leading)
        state, step_metrics = train_step(state, batch, hparams)
        step += 1
        in_flight.append(step_metrics["loss"])
        val_now = validate is not None and (
          step == num_steps or (config.eval.val_every and step % config.eval.val_every == 0)
        )
        log_now = step % config.train.log_every == 0 or step == num_steps or val_now
        save_now = step % config.train.checkpoint_every == 0 or step == num_steps
        if not (log_now or save_now):
          continue
        finish(0)
        values = _checked_metrics(step_metrics, step, mngr.latest_step(), workdir)
        if log_now:
          now = time.perf_counter()
          rate = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          validation = validate(model, sharding.to_host(state.variables)) if val_now else ()
          logged = scalars.write(step, values, rate, validation)
          if validation and state.best:
            scores = [m[config.train.select_metric] for m in validation]
            scores = runs_lib.padded(scores, rows)
            state = kept_best(state, np.asarray(scores, np.float32))
          bar.set_postfix(loss=f"{logged['loss']:.4f}")
          if jax.process_count() > 1:  # each process's own view, to compare across hosts
            logging.info("process %d step %d loss %.9g", jax.process_index(), step, logged["loss"])
        if save_now:  # in the background, but the run's last save is on disk when it ends
          checkpoint.save(mngr, step, state, batches, block=step == num_steps)
          scalars.flush()  # an object store's logs are uploaded whole, at least this often
      finish(0)
  finally:
    notice.close()
    scalars.close()
    pipeline.close(batches)
    mngr.close()
  return state
