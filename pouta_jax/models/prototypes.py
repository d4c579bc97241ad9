"""Multi-scale prototypes for PRN: k-means over normal features, nearest prototype, residual.

Each training image's feature map at one scale, flattened, is one point; K prototypes are
k-means centroids of those points (k-means++ seeding from a jax key, then Lloyd iterations until
no assignment changes). At train and test time, every image's feature map is compared with its
nearest prototype (L2 over the whole map) and the element-wise squared difference is the
residual PRN learns from. Pure jax, jit-compiled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def squared_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """(N, K) squared L2 distances, as |x|^2 - 2 x.c + |c|^2 (one matmul), clipped at 0."""
  distances = (
    jnp.sum(points**2, axis=1)[:, None]
    - 2.0 * points @ centroids.T
    + jnp.sum(centroids**2, axis=1)[None, :]
  )
  return jnp.maximum(distances, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def kmeans_plus_plus(points: jax.Array, k: int, key: jax.Array) -> jax.Array:
  """k initial centroids: the first uniformly, each next with probability ~ squared distance to
  the nearest one chosen so far."""
  n = points.shape[0]
  first_key, key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, n)
  centroids = jnp.zeros((k, points.shape[1]), points.dtype).at[0].set(points[first])
  nearest = squared_distances(points, points[first][None])[:, 0]

  def add(i, carry):
    centroids, nearest = carry
    chosen = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(nearest))
    # All points on chosen centroids (log 0 everywhere) -> categorical picks uniformly.
    centroids = centroids.at[i].set(points[chosen])
    nearest = jnp.minimum(nearest, squared_distances(points, points[chosen][None])[:, 0])
    return centroids, nearest

  return jax.lax.fori_loop(1, k, add, (centroids, nearest))[0]


@functools.partial(jax.jit, static_argnames="max_iters")
def lloyd(
  points: jax.Array, centroids: jax.Array, max_iters: int = 100
) -> tuple[jax.Array, jax.Array]:
  """Lloyd iterations from `centroids` until no assignment changes (or `max_iters`): final
  centroids and assignments. A cluster that loses all its points keeps its centroid."""
  k = centroids.shape[0]

  def update(assignment):
    one_hot = jax.nn.one_hot(assignment, k, dtype=points.dtype)  # (N, K)
    counts = one_hot.sum(axis=0)
    sums = one_hot.T @ points
    return counts, sums

  def step(carry):
    centroids, assignment, _, i = carry
    counts, sums = update(assignment)
    centroids = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centroids)
    new = jnp.argmin(squared_distances(points, centroids), axis=1)
    return centroids, new, jnp.any(new != assignment), i + 1

  def running(carry):
    return carry[2] & (carry[3] < max_iters)

  assignment = jnp.argmin(squared_distances(points, centroids), axis=1)
  centroids, assignment, _, _ = jax.lax.while_loop(
    running, step, (centroids, assignment, jnp.array(True), 0)
  )
  return centroids, assignment


def kmeans(
  points: jax.Array, k: int, key: jax.Array, max_iters: int = 100
) -> tuple[jax.Array, jax.Array]:
  """(k, D) centroids and (N,) assignments of `points` (N, D); deterministic given `key`."""
  n = points.shape[0]
  if not 1 <= k <= n:
    raise ValueError(
      f"k-means with K={k} prototypes needs 1 <= K <= {n} (the number of training images)"
    )
  return lloyd(points, kmeans_plus_plus(points, k, key), max_iters)


def nearest_prototype(features: jax.Array, prototypes: jax.Array) -> jax.Array:
  """For each feature map (B, H, W, C), the prototype (K, H, W, C) nearest to it in L2."""
  flat = features.reshape(features.shape[0], -1)
  index = jnp.argmin(squared_distances(flat, prototypes.reshape(prototypes.shape[0], -1)), axis=1)
  return prototypes[index]


def residual(features: jax.Array, prototypes: jax.Array) -> jax.Array:
  """Element-wise squared difference of each feature map and its nearest prototype."""
  return (features - nearest_prototype(features, prototypes)) ** 2
