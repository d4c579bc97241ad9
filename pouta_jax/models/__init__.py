"""Model registry: a config's `model.name` -> the network and the objective that trains it.

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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  build: Callable[[ml_collections.ConfigDict], nn.Module]
  objective: Callable[[dict, dict], tuple]


REGISTRY = {
    "draem": ModelSpec(lambda c: DRAEM(c.model.base_width), objectives.draem_objective),
}


def get(name: str) -> ModelSpec:
  if name not in REGISTRY:
    raise ValueError(f"config.model.name={name!r}: expected one of {sorted(REGISTRY)}")
  return REGISTRY[name]
