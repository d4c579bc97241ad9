"""PRN's network after the backbone: window attention against a naive reference, shapes per
scale, and gradients reaching every part."""

import jax
import jax.numpy as jnp
import numpy as np

from pouta_jax.models import prn


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
    np.testing.assert_allclose(prn.window_attention(q, k, v, window),
                               _naive_window_attention(q, k, v, window), rtol=1e-4, atol=1e-5)
  # A window of one pixel attends only to itself.
  np.testing.assert_allclose(prn.window_attention(q, k, v, 1), v, rtol=1e-5)


def _inputs(size=64, batch=2, channels=(8, 16, 32), deepest=64):
  keys = jax.random.split(jax.random.key(0), 7)
  features = [jax.random.normal(keys[i], (batch, size // s, size // s, c))
              for i, (s, c) in enumerate(zip((4, 8, 16), channels))]
  residuals = [jax.random.uniform(keys[3 + i], f.shape) for i, f in enumerate(features)]
  return features, residuals, jax.random.normal(keys[6], (batch, size // 32, size // 32, deepest))


def test_shapes_per_scale_and_output():
  features, residuals, deepest = _inputs()
  model = prn.PRNHead(width=8)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), features, residuals, deepest,
                                                64, False))
  fused = jax.eval_shape(
      lambda v: prn.MultiScaleFusion((8, 16, 32)).apply(v, features, False),
      jax.eval_shape(lambda: prn.MultiScaleFusion((8, 16, 32)).init(jax.random.key(0), features,
                                                                     False)))
  assert [f.shape for f in fused] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32)]
  logits = jax.eval_shape(lambda v: model.apply(v, features, residuals, deepest, 64, False),
                          variables)
  assert logits.shape == (2, 64, 64, 2)
  params = variables["params"]
  assert {f"msa_{i}_{b}" for i in range(3) for b in range(prn.MSA_BLOCKS)} <= set(params)
  # Four window sizes per MSA block, each with its own q, k, v projections.
  assert len([k for k in params["msa_0_0"] if k.startswith("q_")]) == len(prn.WINDOW_DIVISORS)


def test_gradients_reach_every_part():
  features, residuals, deepest = _inputs()
  model = prn.PRNHead(width=8)
  variables = jax.jit(model.init, static_argnums=(4, 5))(jax.random.key(0), features, residuals,
                                                         deepest, 64, False)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, features, residuals, deepest, 64,
                            True, mutable=["batch_stats"])
    return jnp.mean(jax.nn.softmax(logits)[..., 1] ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for name, tree in grads.items():
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(tree)), name
