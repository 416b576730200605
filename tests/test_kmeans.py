"""Per-slide KMeans and the FBTA pseudo-bag samplers (small sizes, fast)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from fbta.features.kmeans import cluster_bag, inertia, random_pseudo_bag, stratified_pseudo_bag

METHODS = ["torch", "sklearn", "elkan", "minibatch"]


def blobs(n: int = 600, k: int = 6, d: int = 16, seed: int = 0, sep: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_per_seed(method: str) -> None:
    x = np.random.default_rng(1).random((400, 8), dtype=np.float32)
    l1, c1 = cluster_bag(x, 12, seed=3, method=method)  # type: ignore[arg-type]
    l2, c2 = cluster_bag(x, 12, seed=3, method=method)  # type: ignore[arg-type]
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(c1, c2)
    _, c3 = cluster_bag(x, 12, seed=4, method=method)  # type: ignore[arg-type]
    assert not np.array_equal(c1, c3)
    assert l1.dtype == np.int64 and c1.dtype == np.float32 and c1.shape == (12, 8)


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_recovers_separated_blobs(method: str) -> None:
    x, truth = blobs()
    labels, cent = cluster_bag(x, 6, seed=0, method=method)  # type: ignore[arg-type]
    assert adjusted_rand_score(truth, labels) > 0.99
    # centroids are the means of their members (what the cluster file promises)
    for j in range(cent.shape[0]):
        np.testing.assert_allclose(cent[j], x[labels == j].mean(0), atol=0.2)


def test_torch_matches_sklearn_quality() -> None:
    x = np.random.default_rng(2).random((1500, 32), dtype=np.float32)  # no structure: hardest case
    it = inertia(x, *cluster_bag(x, 20, 0, method="torch"))
    sk = inertia(x, *cluster_bag(x, 20, 0, method="sklearn"))
    assert it < 1.03 * sk


@pytest.mark.parametrize("n,c", [(30, 100), (100, 100), (500, 20), (2, 5)])
def test_cluster_count_is_min_c_n(n: int, c: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, 4)).astype(np.float32)
    labels, cent = cluster_bag(x, c, seed=0)
    k = min(n, c)
    assert cent.shape == (k, 4) and labels.shape == (n,)
    assert set(np.unique(labels)) == set(range(k))  # every cluster owns a patch
    if n <= c:  # each patch its own cluster, in input order
        np.testing.assert_array_equal(labels, np.arange(n))
        np.testing.assert_array_equal(cent, x)


def test_single_patch() -> None:
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    labels, cent = cluster_bag(x, 100, seed=0)
    np.testing.assert_array_equal(labels, [0])
    np.testing.assert_array_equal(cent, x)


@pytest.mark.parametrize("method", METHODS)
def test_duplicates_give_fewer_non_empty_clusters(method: str) -> None:
    base = np.array([[0, 0], [5, 5], [9, 1]], dtype=np.float32)
    x = base[np.random.default_rng(0).integers(0, 3, 200)]
    labels, cent = cluster_bag(x, 10, seed=0, method=method)  # type: ignore[arg-type]
    assert cent.shape[0] == 3 and set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_allclose(cent[labels], x, atol=1e-5)
    # fewer patches than C, with duplicates: duplicates share a cluster
    labels, cent = cluster_bag(base[[0, 1, 0, 2, 1]], 10, seed=0)
    np.testing.assert_array_equal(labels, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(cent, base)
    labels, cent = cluster_bag(np.ones((50, 3), np.float32), 10, seed=0, method=method)  # type: ignore[arg-type]
    assert cent.shape == (1, 3) and not labels.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_are_refused(bad: float) -> None:
    x = np.zeros((10, 3), np.float32)
    x[4, 1] = bad
    with pytest.raises(ValueError, match=r"NaN/inf in 1 of 10 rows \(first row 4\)"):
        cluster_bag(x, 3, seed=0)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="N×D"):
        cluster_bag(np.zeros((0, 3), np.float32), 3, 0)
    with pytest.raises(ValueError, match="N×D"):
        cluster_bag(np.zeros(5, np.float32), 3, 0)
    with pytest.raises(ValueError, match="float"):
        cluster_bag(np.zeros((5, 2), np.int64), 3, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        cluster_bag(np.zeros((5, 2), np.float32), 0, 0)
    with pytest.raises(ValueError, match="unknown KMeans method"):
        cluster_bag(np.zeros((5, 2), np.float32), 2, 0, method="faiss")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- samplers

SIZES = [1, 2, 5, 10, 3]


def _labels(seed: int = 0) -> np.ndarray:
    lab = np.repeat(np.arange(len(SIZES)), SIZES)
    return np.random.default_rng(seed).permutation(lab)


@pytest.mark.parametrize("m", [1, 2, 4])
def test_stratified_takes_min_m_size_per_cluster(m: int) -> None:
    lab = _labels()
    idx = stratified_pseudo_bag(lab, m, np.random.default_rng(0))
    assert idx.dtype == np.int64
    assert np.all(np.diff(idx) > 0)  # sorted ascending, hence no duplicates
    assert idx.min() >= 0 and idx.max() < lab.size
    counts = np.bincount(lab[idx], minlength=len(SIZES))
    np.testing.assert_array_equal(counts, np.minimum(m, SIZES))


def test_stratified_is_seeded_and_varies_between_draws() -> None:
    lab = _labels()
    a = stratified_pseudo_bag(lab, 2, 7)
    np.testing.assert_array_equal(a, stratified_pseudo_bag(lab, 2, np.random.default_rng(7)))
    rng = np.random.default_rng(0)
    draws = {tuple(stratified_pseudo_bag(lab, 2, rng)) for _ in range(20)}
    assert len(draws) > 1  # a shared generator gives a fresh pseudo-bag every epoch


def test_stratified_is_uniform_within_a_cluster() -> None:
    lab = np.zeros(10, dtype=np.int64)
    rng = np.random.default_rng(0)
    hits = np.zeros(10)
    for _ in range(2000):
        hits[stratified_pseudo_bag(lab, 2, rng)] += 1
    assert np.all(np.abs(hits / 2000 - 0.2) < 0.04)


def test_stratified_edge_cases() -> None:
    assert stratified_pseudo_bag(np.array([], dtype=np.int64), 2, 0).size == 0
    np.testing.assert_array_equal(stratified_pseudo_bag(np.array([4, 4, 9]), 5, 0), [0, 1, 2])
    with pytest.raises(ValueError, match="m must be"):
        stratified_pseudo_bag(np.array([0, 1]), 0, 0)


def test_random_pseudo_bag() -> None:
    idx = random_pseudo_bag(100, 30, np.random.default_rng(0))
    assert idx.size == 30 and np.all(np.diff(idx) > 0) and idx.max() < 100
    np.testing.assert_array_equal(idx, random_pseudo_bag(100, 30, 0))
    np.testing.assert_array_equal(random_pseudo_bag(5, 30, 0), np.arange(5))
    assert random_pseudo_bag(0, 3, 0).size == 0


def test_thread_cap_is_temporary() -> None:
    import torch

    before = torch.get_num_threads()
    x, truth = blobs(n=200, k=3)
    labels, _ = cluster_bag(x, 3, seed=0, threads=1)
    assert adjusted_rand_score(truth, labels) > 0.99
    assert torch.get_num_threads() == before
