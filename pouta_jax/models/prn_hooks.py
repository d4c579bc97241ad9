"""PRN's hooks in the model registry (models/__init__.py): its config checks, the prototype
count derived from the data, and the stage before step 0 (pretrained backbone, prototypes)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from pouta_jax import errors
from pouta_jax.models import backbone as backbone_lib, prn

CONVERT_HINT = (
  "convert torchvision's weights once: python -m pouta_jax.convert "
  "--from=torchvision_resnet --weights=resnet18.pth --backbone=resnet18 "
  "--out=resnet18.npz"
)


def check_config(config: ml_collections.ConfigDict) -> None:
  """PRN's keys; loads the backbone weights once, so a wrong file fails before any work."""
  name, check = config.backbone.name, functools.partial(errors.check, config)
  check(name in backbone_lib.BACKBONES, "backbone.name", f"one of {sorted(backbone_lib.BACKBONES)}")
  check(isinstance(config.backbone.pretrained, bool), "backbone.pretrained", "True or False")
  if config.backbone.pretrained:
    if not config.backbone.weights:
      raise errors.ConfigError(
        f"config.backbone.weights is empty: PRN's frozen backbone needs "
        f"pretrained {name} weights ({CONVERT_HINT}); or set "
        f"--config.backbone.pretrained=False to train on a random backbone"
      )
    try:
      backbone_lib.load_weights(config.backbone.weights, name)
    except (OSError, ValueError) as e:
      raise errors.ConfigError(f"config.backbone.weights: {e}") from e
  check(
    config.model.num_prototypes >= 0,
    "model.num_prototypes",
    "a count, or 0 for model.prototype_fraction of the training images",
  )
  check(
    0 < config.model.prototype_fraction <= 1, "model.prototype_fraction", "a fraction in (0, 1]"
  )
  for key in ("smooth_l1_weight", "focal_weight", "focal_gamma"):
    check(config.loss[key] >= 0, f"loss.{key}", ">= 0")
  check(0 <= config.loss.focal_alpha <= 1, "loss.focal_alpha", "a weight in [0, 1]")


def derived_settings(
  config: ml_collections.ConfigDict, train_sizes: Sequence[int]
) -> dict[str, Any]:
  """K: `model.num_prototypes`, or `model.prototype_fraction` of the training images (of the
  smallest category when several share one program, since their prototypes are stacked)."""
  smallest = min(train_sizes)
  count = config.model.num_prototypes or prn.num_prototypes(
    smallest, config.model.prototype_fraction
  )
  if count > smallest:
    raise errors.ConfigError(
      f"config.model.num_prototypes={count}: more prototypes than training "
      f"images ({smallest}); k-means needs K <= N"
    )
  return {"model.num_prototypes": count}


def prepare(
  config: ml_collections.ConfigDict,
  model: prn.PRN,
  variables: dict,
  images: np.ndarray,
  key: jax.Array,
) -> dict:
  """Before step 0: the pretrained backbone (unless `backbone.pretrained` is False), then the
  prototypes from its features of the normal training images."""
  variables = dict(variables)
  if config.backbone.pretrained:
    weights = backbone_lib.load_weights(config.backbone.weights, model.backbone)
    for collection in ("params", "batch_stats"):
      variables[collection] = {**variables[collection], "backbone": weights[collection]}
  variables["prototypes"] = prn.fit_prototypes(model, variables, images, key)
  return variables
