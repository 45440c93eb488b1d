"""K-means in JAX (detcon_jax/models/kmeans.py) against scikit-learn's, under jit and vmap."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from detcon_jax.models import kmeans


def _blobs(seed, n=300, d=5, k=6):
  """Points and k initial centroids (k random points) of overlapping blobs: several
  Lloyd iterations to converge, and no cluster empties (asserted below)."""
  x, _ = make_blobs(n_samples=n, n_features=d, centers=k, cluster_std=2.5, random_state=seed)
  init = x[np.random.default_rng(seed).choice(n, k, replace=False)]
  return x.astype(np.float32), init.astype(np.float32)


def _sklearn(x, init, iterations):
  km = KMeans(n_clusters=len(init), init=init, n_init=1, algorithm="lloyd",
              max_iter=iterations, tol=0.0).fit(x)
  return km.labels_, km.cluster_centers_


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iterations", [1, 3, 50])
def test_lloyd_equals_sklearn(seed, iterations):
  x, init = _blobs(seed)
  labels, centers = _sklearn(x, init, iterations)
  assignment, centroids = kmeans.lloyd(jnp.asarray(x), jnp.asarray(init), iterations=iterations)
  assert len(np.unique(labels)) == len(init)        # no empty cluster: sklearn would relocate
  np.testing.assert_array_equal(np.asarray(assignment), labels)
  np.testing.assert_allclose(np.asarray(centroids), centers, rtol=1e-4, atol=1e-4)


def test_vmap_over_images_equals_each_image():
  data = [_blobs(seed, n=200) for seed in (3, 4, 5)]
  x = jnp.asarray(np.stack([d[0] for d in data]))
  init = jnp.asarray(np.stack([d[1] for d in data]))
  assignment, centroids = jax.jit(jax.vmap(lambda p, c: kmeans.lloyd(p, c, 20)))(x, init)
  for i, (xi, ci) in enumerate(data):
    labels, centers = _sklearn(xi, ci, 20)
    np.testing.assert_array_equal(np.asarray(assignment[i]), labels)
    np.testing.assert_allclose(np.asarray(centroids[i]), centers, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", sorted(kmeans.INITS))
def test_init_finds_separated_blobs(init):
  """Both inits seed one centroid per well-separated blob, so Lloyd recovers the blobs;
  batched_kmeans gives each image the result of kmeans with that image's key."""
  x, truth = make_blobs(n_samples=240, n_features=3, centers=4, cluster_std=0.3,
                        center_box=(-20, 20), random_state=7)
  points = jnp.asarray(np.stack([x, x[::-1]]).astype(np.float32))
  key = jax.random.PRNGKey(0)
  assignment, centroids = kmeans.batched_kmeans(key, points, k=4, init=init)
  assert assignment.shape == (2, 240) and centroids.shape == (2, 4, 3)
  for a, t in zip(np.asarray(assignment), (truth, truth[::-1])):
    pairs = set(zip(a.tolist(), t.tolist()))
    assert len(pairs) == 4 and len({p[0] for p in pairs}) == 4   # a relabelling of the truth
  one, _ = kmeans.kmeans(jax.random.split(key, 2)[1], points[1], k=4, init=init)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(assignment[1]))


def test_farthest_is_deterministic_and_empty_clusters_keep_their_centroid():
  """Three distinct points and k=5: farthest-point seeds the three first; the two
  extra centroids repeat a point, stay empty (ties go to the lowest index) and keep
  their value."""
  points = jnp.asarray(np.repeat(np.eye(3, dtype=np.float32), 4, axis=0))
  a1, c1 = kmeans.kmeans(jax.random.PRNGKey(1), points, k=5, init="farthest")
  a2, c2 = kmeans.kmeans(jax.random.PRNGKey(1), points, k=5, init="farthest")
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  assert len(np.unique(np.asarray(a1))) == 3
  init = kmeans.init_centroids(jax.random.PRNGKey(1), points, k=5, init="farthest")
  np.testing.assert_array_equal(np.asarray(c1), np.asarray(init))   # already converged
  with pytest.raises(ValueError, match="Unknown K-means init"):
    kmeans.init_centroids(jax.random.PRNGKey(1), points, k=5, init="random")
