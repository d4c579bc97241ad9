"""PRN's network after the backbone: window attention against a naive reference, shapes per
scale, and gradients reaching every part."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pouta_jax.models import backbone, prn, prototypes

# Scheduled by its length (see conftest).
pytestmark = pytest.mark.heavy(80)


def _naive_window_attention(q, k, v, window):
  b, h, w, c = q.shape
  out = np.zeros_like(q)
  for n in range(b):
    for y in range(0, h, window):
      for x in range(0, w, window):
        tile = (n, slice(y, y + window), slice(x, x + window))
        qs, ks, vs = (a[tile].reshape(-1, c) for a in (q, k, v))
        logits = qs @ ks.T / np.sqrt(c)
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        out[tile] = (weights @ vs).reshape(window, window, c)
  return out


def test_window_attention_matches_a_naive_loop():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 8, 8, 3)) for _ in range(3))
  for window in (8, 4, 2, 1):
    np.testing.assert_allclose(
      prn.window_attention(q, k, v, window),
      _naive_window_attention(q, k, v, window),
      rtol=1e-4,
      atol=1e-5,
    )
  # Windows always tile the map: 224 px gives a 28-pixel side at stride 8, and 28 / 8 is not whole.
  assert [prn.window_size(28, d) for d in prn.WINDOW_DIVISORS] == [28, 14, 7, 2]
  assert [prn.window_size(64, d) for d in prn.WINDOW_DIVISORS] == [64, 32, 16, 8]
  # A window of one pixel attends only to itself.
  np.testing.assert_allclose(prn.window_attention(q, k, v, 1), v, rtol=1e-5)


def _inputs(size=64, batch=2, channels=(8, 16, 32), deepest=64):
  keys = jax.random.split(jax.random.key(0), 7)
  features = [
    jax.random.normal(keys[i], (batch, size // s, size // s, c))
    for i, (s, c) in enumerate(zip((4, 8, 16), channels))
  ]
  residuals = [jax.random.uniform(keys[3 + i], f.shape) for i, f in enumerate(features)]
  return features, residuals, jax.random.normal(keys[6], (batch, size // 32, size // 32, deepest))


def test_shapes_per_scale_and_output():
  features, residuals, deepest = _inputs()
  model = prn.PRNHead(width=8)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), features, residuals, deepest, 64, False)
  )
  fused = jax.eval_shape(
    lambda v: prn.MultiScaleFusion((8, 16, 32)).apply(v, features, False),
    jax.eval_shape(
      lambda: prn.MultiScaleFusion((8, 16, 32)).init(jax.random.key(0), features, False)
    ),
  )
  assert [f.shape for f in fused] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32)]
  logits = jax.eval_shape(
    lambda v: model.apply(v, features, residuals, deepest, 64, False), variables
  )
  assert logits.shape == (2, 64, 64, 2)
  params = variables["params"]
  assert {f"msa_{i}_{b}" for i in range(3) for b in range(prn.MSA_BLOCKS)} <= set(params)
  # Four window sizes per MSA block, each with its own q, k, v projections.
  assert len([k for k in params["msa_0_0"] if k.startswith("q_")]) == len(prn.WINDOW_DIVISORS)


def test_prototype_stage_is_deterministic_and_feeds_the_residuals():
  images = np.random.default_rng(0).random((4, 64, 64, 3)).astype(np.float32)
  model = prn.PRN("resnet18", width=8, num_prototypes=4)
  variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), images[:1], False)
  assert [variables["prototypes"][f"scale_{i}"].shape for i in range(3)] == [
    (4, 16, 16, 64),
    (4, 8, 8, 128),
    (4, 4, 4, 256),
  ]
  fitted = prn.fit_prototypes(model, variables, images, jax.random.key(1), batch_size=3)
  again = prn.fit_prototypes(model, variables, images, jax.random.key(1), batch_size=4)
  backbone_vars = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
  features = jax.jit(backbone.ResNetFeatures("resnet18").apply)(backbone_vars, images)
  for i in range(3):
    # K = N: every prototype is one image's features. Batching must not change which image
    # each prototype is; values may differ by float32 rounding only, since the backbone's
    # reductions run in another order for another batch shape (a few ulps per layer: 1e-5 of
    # the features' scale covers 18 layers on AVX2 and AVX-512 kernels alike).
    points = np.asarray(features[i]).reshape(4, -1)
    tolerance = 1e-5 * np.abs(points).max()
    images_of = []
    for fit in (fitted, again):
      centroids = np.asarray(fit[f"scale_{i}"]).reshape(4, -1)
      distances = np.abs(centroids[:, None] - points[None]).max(-1)  # prototype x image
      images_of.append(distances.argmin(1))
      assert sorted(images_of[-1]) == [0, 1, 2, 3]
      assert distances.min(1).max() <= tolerance
      # so each image's residual to its nearest prototype is zero up to that rounding
      residual = prototypes.residual(features[i], fit[f"scale_{i}"])
      assert float(np.sqrt(np.max(residual))) <= tolerance
    np.testing.assert_array_equal(*images_of)
  out = jax.jit(model.apply, static_argnames="train")(
    {**variables, "prototypes": fitted}, images, train=False
  )
  assert out["anomaly_map"].shape == (4, 64, 64)
  assert prn.num_prototypes(250, 0.1) == 25 and prn.num_prototypes(3, 0.1) == 1
  with pytest.raises(ValueError, match="5 prototypes need at least as many training images"):
    prn.fit_prototypes(prn.PRN(width=8, num_prototypes=5), variables, images, jax.random.key(1))


def test_backbone_is_frozen_and_gradients_reach_every_part_of_the_head():
  images = jnp.asarray(np.random.default_rng(1).random((2, 64, 64, 3)), jnp.float32)
  model = prn.PRN("resnet18", width=8)
  variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), images, False)

  def loss(params):
    out, _ = model.apply(
      {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
    )
    return jnp.mean(out["anomaly_map"])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["backbone"]))
  for name, tree in grads["discriminative"].items():  # MSF, MSA, decoder, head
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(tree)), name
  _, updates = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]))(
    variables
  )
  for a, b in zip(
    jax.tree.leaves(variables["batch_stats"]["backbone"]),
    jax.tree.leaves(updates["batch_stats"]["backbone"]),
  ):
    np.testing.assert_array_equal(a, b)  # running statistics untouched in train mode
