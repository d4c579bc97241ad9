"""Frozen ImageNet backbones for PRN: torchvision's ResNet18 and Wide-ResNet-50-2 in Flax linen.

Module and variable names mirror torchvision's state-dict keys (`layer2_0/downsample_conv` is
`layer2.0.downsample.0`), so `convert.py --from=torchvision_resnet` is a mechanical mapping.
BatchNorm always uses its running statistics: the backbone is never trained. Inputs are images
in [0, 1]; the ImageNet normalisation the weights were trained with happens here.
"""

from __future__ import annotations

import dataclasses
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils.epath import Path

from pouta_jax import errors, files
from pouta_jax.models.layers import batch_norm, max_pool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  block: str  # "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1)
  layers: tuple[int, int, int, int]  # blocks per stage
  width_per_group: int = 64  # 128: the "wide" ResNets' doubled 3x3 width

  @property
  def expansion(self) -> int:
    return 1 if self.block == "basic" else 4

  def channels(self) -> tuple[int, ...]:
    """Channels of the layer1..layer4 features."""
    return tuple(64 * 2**i * self.expansion for i in range(4))


BACKBONES = {
  "resnet18": BackboneSpec("basic", (2, 2, 2, 2)),
  "wide_resnet50_2": BackboneSpec("bottleneck", (3, 4, 6, 3), width_per_group=128),
}


def spec(name: str) -> BackboneSpec:
  if name not in BACKBONES:
    raise errors.ConfigError(f"backbone {name!r}: expected one of {sorted(BACKBONES)}")
  return BACKBONES[name]


def _conv(features: int, size: int, stride: int, name: str) -> nn.Conv:
  pad = size // 2
  return nn.Conv(
    features,
    (size, size),
    strides=(stride, stride),
    padding=((pad, pad),) * 2,
    use_bias=False,
    name=name,
  )


def _bn(name: str) -> nn.BatchNorm:
  return batch_norm(train=False, name=name)  # frozen: always the running statistics


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(_bn("bn1")(_conv(self.planes, 3, self.stride, "conv1")(x)))
    y = _bn("bn2")(_conv(self.planes, 3, 1, "conv2")(y))
    if self.downsample:
      x = _bn("downsample_bn")(_conv(self.planes, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck: the stride is on the 3x3 convolution."""

  planes: int
  stride: int
  downsample: bool
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(_bn("bn1")(_conv(self.width, 1, 1, "conv1")(x)))
    y = nn.relu(_bn("bn2")(_conv(self.width, 3, self.stride, "conv2")(y)))
    y = _bn("bn3")(_conv(self.planes * 4, 1, 1, "conv3")(y))
    if self.downsample:
      x = _bn("downsample_bn")(_conv(self.planes * 4, 1, self.stride, "downsample_conv")(x))
    return nn.relu(x + y)


class ResNetFeatures(nn.Module):
  """Features of layer1..layer4 (strides 4, 8, 16, 32), finest first."""

  backbone: str = "resnet18"

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    s = spec(self.backbone)
    x = (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    x = nn.relu(_bn("bn1")(_conv(64, 7, 2, "conv1")(x)))
    x = max_pool(x, 3, 2, padding=1)
    features, in_channels = [], 64
    for stage, num_blocks in enumerate(s.layers):
      planes = 64 * 2**stage
      for index in range(num_blocks):
        stride = 2 if stage and not index else 1
        downsample = not index and (stride != 1 or in_channels != planes * s.expansion)
        name = f"layer{stage + 1}_{index}"
        if s.block == "basic":
          x = BasicBlock(planes, stride, downsample, name=name)(x)
        else:
          width = planes * s.width_per_group // 64
          x = Bottleneck(planes, stride, downsample, width, name=name)(x)
        in_channels = planes * s.expansion
      features.append(x)
    return features


def init_variables(backbone: str) -> dict:
  """Randomly initialised variables (shapes, and the weights tests use)."""
  return jax.jit(ResNetFeatures(backbone).init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def flatten(variables: dict) -> dict:
  """{"params/layer1_0/conv1/kernel": leaf, ...}"""
  return {
    "/".join(k.key for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
  }


def save_weights(variables: dict, path: str | Path) -> Path:
  """An .npz of the variables (keys "params/layer1_0/conv1/kernel"), written whole or not at
  all; loads without torch or the training code."""
  path = Path(path)
  if path.suffix != ".npz":
    raise errors.ConfigError(f"{path}: backbone weights are saved as .npz")
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in flatten(variables).items()})
  files.write_atomic(path, buffer.getvalue())
  return path


def load_weights(path: str | Path, backbone: str) -> dict:
  """Variables of `backbone` from `save_weights`'s file; every missing, extra or mis-shaped key
  is listed in the error."""
  path = Path(path)
  if not path.is_file():
    raise errors.NotFoundError(
      f"{path}: no backbone weights file (convert one with python -m "
      f"pouta_jax.convert --from=torchvision_resnet)"
    )
  if why := files.not_a_file(path):
    raise errors.DataError(f"{path}: {why}; expected a backbone weights file (.npz)")
  template = jax.eval_shape(lambda: init_variables(backbone))
  want = {k: v.shape for k, v in flatten(template).items()}
  with np.load(io.BytesIO(path.read_bytes())) as stored:
    got = {k: stored[k] for k in stored.files}
  problems = errors.key_problems(want, {k: v.shape for k, v in got.items()})
  if problems:
    raise errors.ConfigError(f"{path} does not hold {backbone} weights {errors.listing(problems)}")
  leaves = [
    got["/".join(k.key for k in p)].astype(np.float32)
    for p, _ in jax.tree_util.tree_flatten_with_path(template)[0]
  ]
  return jax.tree.unflatten(jax.tree.structure(template), leaves)
