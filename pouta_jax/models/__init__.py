"""Model registry: a config's `model.name` -> its network, its objective and its config checks.

The train loop and evaluation only use this registry, so adding a model touches models/,
objectives.py and configs/ alone. Every network returns a dict with at least `anomaly_map`
(B, H, W) in [0, 1]; its parameters are grouped under `reconstructive` / `discriminative`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import ml_collections

from pouta_jax import objectives
from pouta_jax.models.draem import DRAEM
from pouta_jax.models.pouta import COMPARE_MODES, LEVEL_MULTIPLIERS, POUTA

Config = ml_collections.ConfigDict


def _no_checks(config: Config) -> None:
  del config


def _check_pouta(config: Config) -> None:
  if config.model.compare not in COMPARE_MODES:
    raise ValueError(f"config.model.compare={config.model.compare!r}: expected one of "
                     f"{COMPARE_MODES}")
  if not isinstance(config.model.guidance, bool):
    raise ValueError(f"config.model.guidance={config.model.guidance!r}: expected True or False")
  weights = tuple(config.loss.level_weights)
  if len(weights) != len(LEVEL_MULTIPLIERS) or any(w < 0 for w in weights):
    raise ValueError(f"config.loss.level_weights={weights!r}: expected "
                     f"{len(LEVEL_MULTIPLIERS)} non-negative weights, finest level first")
  if config.loss.final_weight < 0:
    raise ValueError(f"config.loss.final_weight={config.loss.final_weight!r}: expected >= 0")


def _conv_weight_grad(config: Config) -> str:
  # Workdirs written before the key existed (their config.json) get the default.
  return config.model.get("conv_weight_grad", "auto")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  build: Callable[[Config], nn.Module]
  objective: Callable[[Config], Callable[[dict, dict], tuple]]
  validate: Callable[[Config], None] = _no_checks


REGISTRY = {
    "draem": ModelSpec(
        build=lambda c: DRAEM(c.model.base_width, _conv_weight_grad(c)),
        objective=lambda c: objectives.draem_objective),
    "pouta": ModelSpec(
        build=lambda c: POUTA(c.model.base_width, c.model.compare, c.model.guidance,
                              _conv_weight_grad(c)),
        objective=lambda c: objectives.pouta_objective(
            tuple(c.loss.level_weights), c.loss.final_weight, c.loss.deep_supervision),
        validate=_check_pouta),
}


def get(name: str) -> ModelSpec:
  if name not in REGISTRY:
    raise ValueError(f"config.model.name={name!r}: expected one of {sorted(REGISTRY)}")
  return REGISTRY[name]
