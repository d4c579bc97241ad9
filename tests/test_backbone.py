"""PRN's frozen backbones: shapes and sizes, the torchvision mapping, the weights file, parity."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pouta_jax import convert
from pouta_jax.models import backbone
from tests.conftest import perturb_batch_norm

REPO = Path(__file__).resolve().parents[1]


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "name, params, channels",
  [
    ("resnet18", 11_176_512, (64, 128, 256, 512)),  # torchvision's, without the classifier
    ("wide_resnet50_2", 66_834_240, (256, 512, 1024, 2048)),
  ],
)
def test_sizes_and_feature_shapes(name, params, channels):
  model = backbone.ResNetFeatures(name)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 64, 64, 3))))
  assert _count(shapes["params"]) == params
  features = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 64, 64, 3)))
  assert [f.shape for f in features] == [
    (2, 64 // s, 64 // s, c) for s, c in zip((4, 8, 16, 32), channels)
  ]
  assert backbone.spec(name).channels() == channels


def test_unknown_backbone_is_named():
  with pytest.raises(ValueError, match="backbone 'resnet19': expected one of"):
    backbone.spec("resnet19")


def _torch_named(variables) -> dict[str, np.ndarray]:
  out = {}
  for key, value in backbone.flatten(variables).items():
    value = np.asarray(value)
    out[convert._torchvision_key(key)] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
  return out


def test_torchvision_mapping_round_trip_and_errors():
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda x: rng.standard_normal(x.shape).astype(np.float32), backbone.init_variables("resnet18")
  )
  state_dict = _torch_named(variables)
  assert "layer2.0.downsample.1.running_var" in state_dict and "conv1.weight" in state_dict
  state_dict["fc.weight"] = np.zeros((1000, 512))  # the classifier is dropped, not an error
  state_dict["bn1.num_batches_tracked"] = np.array(7)
  back = convert.torchvision_to_variables(state_dict, "resnet18")
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)

  del state_dict["layer1.0.conv1.weight"]
  state_dict["layer5.0.conv1.weight"] = np.zeros(1)
  state_dict["bn1.weight"] = np.zeros(3)
  with pytest.raises(convert.ConversionError) as e:
    convert.torchvision_to_variables(state_dict, "resnet18")
  message = str(e.value)
  assert "missing layer1.0.conv1.weight" in message and "extra layer5.0.conv1.weight" in message
  assert "mis-shaped bn1.weight: (3,)" in message


def test_weights_file_round_trip_and_errors(tmp_path):
  variables = backbone.init_variables("resnet18")
  path = backbone.save_weights(variables, tmp_path / "w" / "resnet18.npz")
  loaded = backbone.load_weights(path, "resnet18")
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(a, b)
  assert list(path.parent.iterdir()) == [path]  # no temporary left behind
  with pytest.raises(ValueError, match=r"wide_resnet50_2 weights \(\d+ problems\)(.|\n)*more$"):
    backbone.load_weights(path, "wide_resnet50_2")
  flat = {k: np.asarray(v) for k, v in backbone.flatten(variables).items()}
  del flat["params/layer1_0/conv1/kernel"]
  flat["params/fc/kernel"] = np.zeros(2)
  flat["params/bn1/scale"] = np.zeros(3)
  np.savez(tmp_path / "broken.npz", **flat)
  with pytest.raises(ValueError) as e:
    backbone.load_weights(tmp_path / "broken.npz", "resnet18")
  assert "(3 problems)" in str(e.value) and "missing params/layer1_0/conv1/kernel" in str(e.value)
  assert "extra params/fc/kernel" in str(e.value) and "mis-shaped params/bn1/scale" in str(e.value)
  with pytest.raises(FileNotFoundError, match="nowhere.npz: no backbone weights file"):
    backbone.load_weights(tmp_path / "nowhere.npz", "resnet18")


def test_parity_with_torchvision_resnet18(tmp_path):
  reason = "parity needs the bench extra: pip install -e '.[bench]'"
  torch = pytest.importorskip("torch", reason=reason)
  torchvision = pytest.importorskip("torchvision", reason=reason)
  torch.manual_seed(0)
  net = torchvision.models.resnet18()
  perturb_batch_norm(net)
  net.eval()
  torch.save(net.state_dict(), tmp_path / "resnet18.pth")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pouta_jax.convert",
      "--from=torchvision_resnet",
      f"--weights={tmp_path / 'resnet18.pth'}",
      f"--out={tmp_path / 'r18.npz'}",
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
  )
  variables = backbone.load_weights(tmp_path / "r18.npz", "resnet18")

  images = torch.rand(2, 3, 64, 64)
  mean = torch.tensor(backbone.IMAGENET_MEAN)[:, None, None]
  std = torch.tensor(backbone.IMAGENET_STD)[:, None, None]
  with torch.no_grad():
    x = net.maxpool(net.relu(net.bn1(net.conv1((images - mean) / std))))
    want = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
      x = layer(x)
      want.append(x.numpy().transpose(0, 2, 3, 1))
  got = backbone.ResNetFeatures("resnet18").apply(
    variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
  )
  for level, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=f"layer{level + 1}")
