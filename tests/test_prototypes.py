"""PRN's prototype stage: k-means against a numpy reference and scikit-learn, determinism,
nearest prototypes and residuals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from pouta_jax.models import prototypes


def _numpy_lloyd(points, centroids, max_iters=100):
  """The textbook algorithm, written plainly: the reference."""
  centroids = centroids.copy()
  assignment = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
  for _ in range(max_iters):
    for c in range(len(centroids)):
      if (assignment == c).any():
        centroids[c] = points[assignment == c].mean(0)
    new = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    if (new == assignment).all():
      break
    assignment = new
  return centroids, assignment


def _blobs(seed=0, per_blob=20, dim=6, centers=4):
  rng = np.random.default_rng(seed)
  means = rng.normal(0, 10, (centers, dim))
  return np.concatenate([m + rng.normal(0, 1, (per_blob, dim)) for m in means]).astype(np.float64)


def test_lloyd_matches_numpy_reference_in_float64():
  with jax.enable_x64():
    points = np.random.default_rng(1).normal(size=(60, 5))
    start = points[[0, 7, 21, 40, 59]]
    got_c, got_a = prototypes.lloyd(jnp.asarray(points), jnp.asarray(start))
  want_c, want_a = _numpy_lloyd(points, start)
  np.testing.assert_array_equal(got_a, want_a)
  np.testing.assert_allclose(got_c, want_c, rtol=1e-10)


def test_empty_cluster_keeps_its_centroid():
  points = jnp.asarray([[0.0], [0.1], [10.0]])
  centroids, assignment = prototypes.lloyd(points, jnp.asarray([[0.0], [10.0], [100.0]]))
  np.testing.assert_array_equal(assignment, [0, 0, 1])
  np.testing.assert_allclose(centroids[:, 0], [0.05, 10.0, 100.0], rtol=1e-6)


def test_kmeans_finds_the_clusters_as_well_as_scikit_learn():
  points = _blobs()
  centroids, assignment = prototypes.kmeans(jnp.asarray(points, jnp.float32), 4, jax.random.key(0))
  inertia = float(((points - np.asarray(centroids)[np.asarray(assignment)]) ** 2).sum())
  oracle = KMeans(4, n_init=10, random_state=0).fit(points)
  assert inertia <= oracle.inertia_ * 1.001
  # Each blob of 20 points is one cluster.
  assert sorted(np.bincount(np.asarray(assignment)).tolist()) == [20, 20, 20, 20]


def test_kmeans_is_deterministic_given_the_key_and_checks_k():
  points = jnp.asarray(np.random.default_rng(2).normal(size=(30, 8)), jnp.float32)
  a = prototypes.kmeans(points, 5, jax.random.key(3))
  b = prototypes.kmeans(points, 5, jax.random.key(3))
  c = prototypes.kmeans(points, 5, jax.random.key(4))
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  with pytest.raises(ValueError, match="K=31 prototypes needs 1 <= K <= 30"):
    prototypes.kmeans(points, 31, jax.random.key(0))


def test_kmeans_plus_plus_picks_distinct_points_when_possible():
  points = jnp.asarray(_blobs(per_blob=5), jnp.float32)
  start = np.asarray(prototypes.kmeans_plus_plus(points, 4, jax.random.key(0)))
  rows = {tuple(r) for r in start}
  assert len(rows) == 4 and all(
    any(np.array_equal(r, p) for p in np.asarray(points)) for r in start
  )


def test_nearest_prototype_and_residual():
  protos = jnp.stack([jnp.zeros((2, 2, 3)), jnp.ones((2, 2, 3))])
  features = jnp.stack([jnp.full((2, 2, 3), 0.9), jnp.full((2, 2, 3), 0.2)])
  np.testing.assert_array_equal(
    prototypes.nearest_prototype(features, protos), jnp.stack([protos[1], protos[0]])
  )
  np.testing.assert_allclose(
    prototypes.residual(features, protos),
    jnp.stack([jnp.full((2, 2, 3), 0.01), jnp.full((2, 2, 3), 0.04)]),
    rtol=1e-5,
  )
