"""Model registry: a config's `model.name` -> its network, its objective and its config checks,
plus what some models need around training: frozen parts, settings derived from the data, and a
stage that prepares the variables before step 0.

The train loop and evaluation only use this registry, so adding a model touches models/,
objectives.py and configs/ alone. Every network returns a dict with at least `anomaly_map`
(B, H, W) in [0, 1]; its parameters are grouped by top-level submodule (`reconstructive`,
`discriminative`, `backbone`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import ml_collections
import numpy as np

from pouta_jax import errors, objectives
from pouta_jax.models import prn, prn_hooks
from pouta_jax.models.draem import DRAEM
from pouta_jax.models.pouta import COMPARE_MODES, FUSE_KERNELS, LEVEL_MULTIPLIERS, POUTA

Config = ml_collections.ConfigDict


def _no_checks(config: Config) -> None:
  del config


def _check_pouta(config: Config) -> None:
  compare, weights = config.model.compare, tuple(config.loss.level_weights)
  errors.check(config, compare in COMPARE_MODES, "model.compare", f"one of {COMPARE_MODES}")
  for key in ("guidance", "guidance_gate", "detach_features", "pixel_input"):
    errors.check(config, isinstance(config.model[key], bool), f"model.{key}", "True or False")
  width = config.model.discriminative_width
  errors.check(
    config,
    isinstance(width, int) and not isinstance(width, bool) and width >= 0,
    "model.discriminative_width",
    "an integer >= 0 (0: model.discriminative_fraction of the base width)",
  )
  fraction = config.model.discriminative_fraction
  errors.check(
    config,
    isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 4,
    "model.discriminative_fraction",
    "a number in (0, 4]: the levels' unit width over the base width",
  )
  multipliers = config.model.level_multipliers
  errors.check(
    config,
    len(multipliers) == len(LEVEL_MULTIPLIERS)
    and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in multipliers),
    "model.level_multipliers",
    f"{len(LEVEL_MULTIPLIERS)} integers >= 1 (each level's width / the discriminative width, "
    "finest level first)",
  )
  errors.check(
    config, config.model.fuse_kernel in FUSE_KERNELS, "model.fuse_kernel", f"one of {FUSE_KERNELS}"
  )
  errors.check(
    config,
    len(weights) == len(LEVEL_MULTIPLIERS) and all(w >= 0 for w in weights),
    "loss.level_weights",
    f"{len(LEVEL_MULTIPLIERS)} non-negative weights, finest level first",
  )
  errors.check(config, config.loss.final_weight >= 0, "loss.final_weight", ">= 0")
  errors.check(config, config.loss.level_decay >= 0, "loss.level_decay", ">= 0")


def _nothing_derived(config: Config, train_sizes: Sequence[int]) -> dict[str, Any]:
  del config, train_sizes
  return {}


# (config, model, variables, normal training images (N, H, W, 3) float32 in [0, 1], key)
#   -> variables; runs once per category before step 0, never on resume.
Prepare = Callable[[Config, nn.Module, dict, np.ndarray, Any], dict]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  build: Callable[[Config], nn.Module]
  # The objective for the config's settings that change the computation; its numeric weights
  # come with each call (`loss_weights`), see objectives.py.
  objective: Callable[[Config], Callable[[dict, dict, dict], tuple]]
  validate: Callable[[Config], None] = _no_checks
  # Top-level submodules whose variables are never trained (a pretrained backbone): the train
  # state keeps them with its constants, out of the gradients and the optimizer.
  frozen: tuple[str, ...] = ()
  # Settings that depend on the data, as {"section.key": value} from the categories' numbers
  # of training images; `resolve` writes them into the config before it is stored, so a
  # workdir's config.json rebuilds the same model.
  derive: Callable[[Config, Sequence[int]], dict[str, Any]] = _nothing_derived
  prepare: Prepare | None = None
  # Whether variables fitted by `prepare` fix the input size (PRN's prototypes have the
  # training size's feature maps): such a model runs at its training size only.
  size_bound: bool = False
  # Whether the model outputs `reconstruction`, its input restored: its error is then a peer
  # of the anomaly map (eval.reconstruction_error).
  reconstructs: bool = False
  # How many level maps it outputs as `level_logits` (finest first), each (B, h, w, 2) logits at
  # its own resolution: coarse-to-fine models' (eval.level_maps).
  levels: int = 0


REGISTRY = {
  "draem": ModelSpec(
    build=lambda c: DRAEM(base_width=c.model.base_width, conv_weight_grad=c.model.conv_weight_grad),
    objective=lambda c: objectives.draem_objective,
    reconstructs=True,
  ),
  "pouta": ModelSpec(
    build=lambda c: POUTA(
      base_width=c.model.base_width,
      compare=c.model.compare,
      guidance=c.model.guidance,
      guidance_gate=c.model.guidance_gate,
      discriminative_width=c.model.discriminative_width,
      discriminative_fraction=c.model.discriminative_fraction,
      level_multipliers=tuple(c.model.level_multipliers),
      fuse_kernel=c.model.fuse_kernel,
      detach_features=c.model.detach_features,
      pixel_input=c.model.pixel_input,
      conv_weight_grad=c.model.conv_weight_grad,
    ),
    objective=lambda c: objectives.pouta_objective(c.loss.deep_supervision),
    validate=_check_pouta,
    reconstructs=True,
    levels=len(LEVEL_MULTIPLIERS),
  ),
  "prn": ModelSpec(
    build=lambda c: prn.PRN(
      backbone=c.backbone.name,
      width=c.model.base_width,
      num_prototypes=c.model.num_prototypes,
      conv_weight_grad=c.model.conv_weight_grad,
    ),
    objective=lambda c: objectives.prn_objective,
    validate=prn_hooks.check_config,
    frozen=("backbone",),
    derive=prn_hooks.derived_settings,
    prepare=prn_hooks.prepare,
    size_bound=True,
  ),
}


def get(name: str) -> ModelSpec:
  if name not in REGISTRY:
    raise errors.ConfigError(f"config.model.name={name!r}: expected one of {sorted(REGISTRY)}")
  return REGISTRY[name]


def loss_weights(config: Config) -> dict[str, np.ndarray]:
  """The config's numeric loss.* settings as float32 arrays: what an objective is called with."""
  return {
    name: np.asarray(value, np.float32)
    for name, value in config.get("loss", {}).items()
    if not isinstance(value, bool)
  }


def resolve(config: Config, train_sizes: Sequence[int]) -> Config:
  """A copy of `config` with the model's data-derived settings filled in (see ModelSpec)."""
  derived = get(config.model.name).derive(config, train_sizes)
  if not derived:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in derived.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def split_variables(variables: dict, frozen: tuple[str, ...]) -> tuple[dict, dict, dict]:
  """(trainable params, trainable batch stats, constants): the `frozen` submodules' params and
  batch stats and every other collection (e.g. "prototypes") go to the constants."""

  def part(collection: str, keep_frozen: bool) -> dict:
    return {k: v for k, v in variables.get(collection, {}).items() if (k in frozen) == keep_frozen}

  constants = {c: part(c, True) for c in ("params", "batch_stats")}
  constants.update({c: v for c, v in variables.items() if c not in ("params", "batch_stats")})
  return (
    part("params", False),
    part("batch_stats", False),
    {c: v for c, v in constants.items() if v},
  )


def merge_variables(params: dict, batch_stats: dict, constants: dict) -> dict:
  """The variables `apply` takes: the inverse of `split_variables`."""
  merged = {c: dict(v) for c, v in constants.items()}
  merged["params"] = {**params, **constants.get("params", {})}
  merged["batch_stats"] = {**batch_stats, **constants.get("batch_stats", {})}
  return merged
