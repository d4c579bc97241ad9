"""Train state, the jit-compiled train step and the train loop; model-agnostic.

The model and its objective come from the registry; the loop never branches on the model.
"""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from pouta_jax import checkpoint, models, report, sharding
from pouta_jax.data import pipeline
from pouta_jax.data.folder import CategoryFolder
from pouta_jax.data.synthesis import SynthesisConfig
from pouta_jax.data.textures import texture_source


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  """`train.num_steps`, or `train.num_epochs` epochs of ceil(N / batch) steps (as DRAEM)."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(config.train.num_epochs * math.ceil(num_train_images / config.data.batch_size))


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Adam with DRAEM's step schedule: lr x decay at each milestone fraction of training."""
  return _adam_with_milestones(config.optim.lr, tuple(config.optim.milestones),
                               config.optim.decay, num_steps)


# The caches below return the same objects for the same settings, so jax.jit reuses its
# compilations when one process runs several categories (the demo, the tests).
@functools.lru_cache(maxsize=16)
def _adam_with_milestones(lr: float, milestones: tuple[float, ...], decay: float,
                          num_steps: int) -> optax.GradientTransformation:
  boundaries = {int(m * num_steps): decay for m in milestones}
  return optax.adam(optax.piecewise_constant_schedule(lr, boundaries))


@functools.lru_cache(maxsize=16)
def _jitted_init(model: nn.Module, image_size: int) -> Callable:
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(lambda key: model.init(key, dummy, train=False))


def init_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int,
               seed: int) -> TrainState:
  variables = _jitted_init(model, image_size)(jax.random.key(seed))
  return TrainState(step=jnp.array(0, jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"],
                    opt_state=tx.init(variables["params"]))


def initial_state(config: ml_collections.ConfigDict,
                  num_train_images: int) -> tuple[nn.Module, optax.GradientTransformation,
                                                  TrainState, int]:
  """The model, its optimizer, the step-0 state and the number of steps of this config."""
  model = models.get(config.model.name).build(config)
  num_steps = num_train_steps(config, num_train_images)
  tx = make_optimizer(config, num_steps)
  return model, tx, init_state(model, tx, config.data.image_size, config.train.seed), num_steps


@functools.lru_cache(maxsize=16)
def make_train_step(model: nn.Module, objective: Callable, tx: optax.GradientTransformation,
                    mesh: Mesh) -> Callable:
  """One jit-compiled step: forward in train mode, objective, gradients, Adam update.

  The state is replicated over `mesh` and the batch split over its data axis; the loss, the
  BatchNorm statistics and the gradients are over the global batch.
  """

  def loss_fn(params, state: TrainState, batch: dict):
    outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["augmented"], train=True, mutable=["batch_stats"])
    loss, terms = objective(outputs, batch)
    return loss, (terms, updates["batch_stats"])

  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, in_shardings=(replicated, sharding.batch_split(mesh)),
                     out_shardings=(replicated, replicated), donate_argnums=0)
  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    # The gradient norm is checked with the loss: a non-finite one must never be saved.
    return new_state, {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}

  return train_step


def training_batches(config: ml_collections.ConfigDict, folder: CategoryFolder,
                     num_steps: int, start_step: int = 0) -> grain.IterDataset:
  sample_fn = pipeline.SynthesizedSample(
      train_paths=tuple(str(p) for p in folder.train),
      textures=texture_source(config.data.anomaly_source or None),
      image_size=config.data.image_size,
      synthesis=SynthesisConfig(
          anomaly_prob=config.data.anomaly_prob, rotate_prob=config.data.rotate_prob,
          beta_max=config.data.beta_max,
          perlin_max_scale_log2=config.data.perlin_max_scale_log2,
          num_augmenters=config.data.num_augmenters),
      seed=config.train.seed)
  return pipeline.train_batches(sample_fn, config.data.batch_size, num_steps, start_step,
                                config.data.num_workers,
                                sharding.process_rows(config.data.batch_size))


class Preempted(Exception):
  """Training stopped on a preemption notice (SIGTERM) after saving a checkpoint."""


# The exit status of a preempted run: what a process killed by SIGTERM returns, so schedulers
# that requeue on it see the usual code.
PREEMPTED_EXIT_CODE = 128 + 15


class PreemptionNotice:
  """Whether the scheduler asked this job to stop, checked once per step.

  With several processes, JAX's preemption service (started by jax.distributed) takes the
  SIGTERM and agrees on a step all processes reach; alone, a SIGTERM handler sets a flag.
  """

  def __init__(self):
    self._requested = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._requested.set())

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _checked_scalars(step_metrics: dict, step: int, newest_checkpoint: int | None,
                     workdir: Path) -> dict[str, float]:
  scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  if not all(math.isfinite(v) for v in scalars.values()):
    raise FloatingPointError(
        f"non-finite training metrics at step {step} ({scalars}); training stopped. The "
        f"newest good checkpoint is step {newest_checkpoint} in {workdir}/checkpoints")
  return scalars


def train(config: ml_collections.ConfigDict, workdir: str | Path,
          folder: CategoryFolder) -> TrainState:
  """Trains (or resumes) in `workdir` until the configured number of steps; returns the state.

  Checkpoints hold the train state and the data iterator, so a restarted run continues with
  the batch that followed the checkpoint and ends bitwise equal to an uninterrupted one. A
  non-finite loss stops training with FloatingPointError before anything is saved, so the
  newest checkpoint on disk is always a good one; a SIGTERM saves a checkpoint and raises
  Preempted.
  """
  workdir = Path(workdir)
  mesh = sharding.make_mesh(config)
  model, tx, state, num_steps = initial_state(config, len(folder.train))
  state = jax.device_put(state, sharding.replicated(mesh))
  mngr = checkpoint.manager(workdir, config.train.keep_checkpoints)
  restored = checkpoint.restore_latest(mngr, state)
  if restored is not None:
    state = restored
    logging.info("Resumed from step %d in %s", int(state.step), workdir)
  start = int(state.step)
  if start >= num_steps:
    mngr.close()
    return state

  train_step = make_train_step(model, models.get(config.model.name).objective(config), tx, mesh)
  batches = iter(training_batches(config, folder, num_steps))
  if start > 0 and not checkpoint.restore_data_iterator(mngr, start, batches):
    batches = iter(training_batches(config, folder, num_steps, start))
  writer = report.ScalarWriter(workdir) if sharding.is_primary() else None
  notice = PreemptionNotice()
  last_time, last_step = time.perf_counter(), start
  try:
    with tqdm(total=num_steps, initial=start, desc=f"train {config.data.category}",
              unit="step", dynamic_ncols=True, disable=not sharding.is_primary()) as bar:
      for step, batch in enumerate(batches, start + 1):  # counted on the host: no device sync
        state, step_metrics = train_step(state, sharding.global_batch(mesh, batch))
        bar.update(1)
        preempted = notice.reached(step)
        log_now = step % config.train.log_every == 0 or step == num_steps
        save_now = step % config.train.checkpoint_every == 0 or step == num_steps or preempted
        if not (log_now or save_now):
          continue
        scalars = _checked_scalars(step_metrics, step, mngr.latest_step(), workdir)
        if log_now:
          now = time.perf_counter()
          scalars["steps_per_second"] = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          bar.set_postfix(loss=f"{scalars['loss']:.4f}")
          logging.info("process %d step %d loss %.9g", jax.process_index(), step, scalars["loss"])
          if writer is not None:
            writer.write(step, scalars)
        if save_now:
          checkpoint.save(mngr, step, state, batches)
        if preempted:
          raise Preempted(f"preempted: saved step {step} of {num_steps} in {workdir}/checkpoints;"
                          f" run the same command again to resume")
  finally:
    notice.close()
    if writer is not None:
      writer.close()
    mngr.close()
  return state
