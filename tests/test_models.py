import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pouta_jax import models
from pouta_jax.models.draem import DRAEM, DiscriminativeNetwork
from pouta_jax.models.reconstructive import ReconstructiveNetwork


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_parameter_counts_match_the_official_draem():
  # Conv weights and biases plus BatchNorm scale and bias, as counted by PyTorch.
  shapes = jax.eval_shape(
    lambda: DRAEM(128).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
  )
  assert _count(shapes["params"]["reconstructive"]) == 69_048_579
  assert _count(shapes["params"]["discriminative"]) == 28_374_146


@pytest.mark.parametrize("width", [4, 8])
def test_parameter_count_scales_with_base_width(width):
  shapes = jax.eval_shape(
    lambda: DRAEM(width).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  recon = _count(shapes["params"]["reconstructive"])
  disc = _count(shapes["params"]["discriminative"])
  # Conv weights dominate and grow with width^2; exact formula checked at full size above.
  assert 0 < disc < recon
  assert recon == _count(
    jax.eval_shape(
      lambda: ReconstructiveNetwork(width).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
      )
    )["params"]
  )


def test_shapes_and_features_of_every_level():
  x = jnp.ones((2, 64, 64, 3))
  net = ReconstructiveNetwork(4)
  out, _ = net.init_with_output(jax.random.key(0), x, train=False)
  assert out["reconstruction"].shape == (2, 64, 64, 3)
  assert [f.shape for f in out["encoder"]] == [
    (2, 64, 64, 4),
    (2, 32, 32, 8),
    (2, 16, 16, 16),
    (2, 8, 8, 32),
    (2, 4, 4, 32),
  ]
  assert [f.shape for f in out["decoder"]] == [
    (2, 64, 64, 4),
    (2, 32, 32, 4),
    (2, 16, 16, 8),
    (2, 8, 8, 16),
  ]
  logits, _ = DiscriminativeNetwork(2).init_with_output(
    jax.random.key(0), jnp.ones((2, 64, 64, 6)), train=False
  )
  assert logits.shape == (2, 64, 64, 2)


def test_draem_outputs_and_batchnorm_modes():
  model = DRAEM(4)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  eval_out = model.apply(variables, x, train=False)
  assert eval_out["anomaly_map"].shape == (2, 32, 32)
  probs = jax.nn.softmax(eval_out["logits"], -1)[..., 1]
  np.testing.assert_allclose(eval_out["anomaly_map"], probs, atol=1e-6)
  train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  # Train mode normalises with batch statistics and updates the running averages.
  assert not np.allclose(train_out["reconstruction"], eval_out["reconstruction"])
  changed = jax.tree.map(
    lambda a, b: not np.allclose(a, b), variables["batch_stats"], updates["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))


def test_initialisers_follow_the_official_code():
  variables = DRAEM(16).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  block = variables["params"]["reconstructive"]["encoder"]["block_1"]["ConvBNReLU_0"]
  kernel = np.asarray(block["Conv3x3_0"]["Conv_0"]["kernel"])
  assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
  scale = np.asarray(block["BatchNorm_0"]["scale"])
  assert abs(scale.mean() - 1.0) < 0.01 and 0.005 < scale.std() < 0.04
  np.testing.assert_array_equal(block["BatchNorm_0"]["bias"], 0.0)
  bias = np.asarray(block["Conv3x3_0"]["Conv_0"]["bias"])
  assert np.abs(bias).max() <= 1 / np.sqrt(9 * 16)


def test_registry_rejects_unknown_model():
  with pytest.raises(ValueError, match="model.name='nope'"):
    models.get("nope")
