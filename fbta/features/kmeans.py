"""Per-slide KMeans on frozen features, and the pseudo-bag samplers FBTA draws from it.

FBTA clusters each slide's frozen bag once (C clusters, default 100) and then,
every epoch, reads only M patches per cluster (METHODS.md A.2–3). Clustering runs
once per slide but over every slide of a cohort, so its cost is measured
(``benchmarks/kmeans.py``) and the default method is the one that won there.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterator, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from fbta.choices import KMeansMethod

Method = Literal["auto", "torch", "sklearn", "elkan", "minibatch"]
METHODS: tuple[str, ...] = KMeansMethod.values()  # the schema's choices (fbta/choices.py)
#: What "auto" means, chosen from benchmarks/kmeans.py (reports/bench/kmeans.json): on
#: 50,000 × 1024, C = 100, 2 cores, torch reached the lowest inertia in 7.8 s against
#: 14.0 s for scikit-learn's Lloyd (same inertia ±0.3 % over seeds); MiniBatchKMeans
#: took 1.0 s but ended 1.6 % (N = 50,000) to 3.2 % (N = 5,000) worse. torch also runs on GPU.
DEFAULT_METHOD = "torch"
RngLike = Union[np.random.Generator, int, None]


def _validate(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"cluster_bag expects a non-empty N×D feature matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"cluster_bag expects float features, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"cluster_bag: features contain NaN/inf in {rows.size} of {x.shape[0]} rows "
            f"(first row {rows[0]}); re-extract that slide's features"
        )
    return x


def _compact(labels: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop empty clusters and renumber 0..C'-1, so every label owns at least one patch.

    Empty clusters only arise when a bag has fewer distinct points than C
    (duplicated patches); the stratified sampler then sees no phantom cluster.
    """
    used = np.unique(labels)
    if used.size == centroids.shape[0]:
        return labels, centroids
    return np.searchsorted(used, labels).astype(np.int64), centroids[used]


def cluster_bag(
    features: np.ndarray, n_clusters: int, seed: int, *, method: Method = "auto",
    max_iter: int = 100, tol: float = 1e-4, device: Union[str, torch.device] = "cpu",
    threads: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """KMeans of one slide's N×D bag → (labels int64 N, centroids float32 C'×D).

    C' = min(n_clusters, N), fewer only if the bag has fewer distinct points.
    Deterministic for a given seed, method and device. NaN/inf are refused:
    they would silently poison every centroid they touch. ``tol`` is relative
    to the mean feature variance, as in scikit-learn.

    ``threads`` caps CPU threads for this call (``None``: leave the process
    setting). Use 1 when several slides are clustered in parallel: on a busy
    machine multi-threaded KMeans spends most of its time waiting on barriers
    (benchmarks/kmeans.py measured up to 10× slower at N = 5,000).
    """
    x = _validate(features)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be ≥ 1, got {n_clusters}")
    if method not in METHODS:
        raise ValueError(f"unknown KMeans method {method!r}; choose from {', '.join(METHODS)}")
    n = x.shape[0]
    c = min(int(n_clusters), n)
    if c == 1:
        return np.zeros(n, dtype=np.int64), x.mean(axis=0, keepdims=True)
    if c == n:  # every patch its own cluster (duplicates share one), nothing to optimise
        _, first, inv = np.unique(x, axis=0, return_index=True, return_inverse=True)
        rank = np.argsort(np.argsort(first))  # number clusters by first occurrence
        return rank[inv.reshape(-1)].astype(np.int64), x[np.sort(first)].copy()
    m = DEFAULT_METHOD if method == "auto" else method
    with _thread_limit(threads):
        if m == "torch":
            labels, centroids = torch_kmeans(x, c, seed, max_iter=max_iter, tol=tol, device=device)  # type: ignore[misc]
        else:
            labels, centroids = sklearn_kmeans(x, c, seed, method=m, max_iter=max_iter, tol=tol)
    return _compact(labels, centroids)


@contextmanager
def _thread_limit(threads: Optional[int]) -> Iterator[None]:
    """Temporarily cap torch intra-op and OpenMP/BLAS pools (scikit-learn's) at ``threads``."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        with threadpool_limits(limits=max(1, int(threads))):
            yield
    finally:
        torch.set_num_threads(before)


def sklearn_kmeans(
    x: np.ndarray, c: int, seed: int, *, method: str = "sklearn", max_iter: int = 100,
    tol: float = 1e-4, n_init: int = 1, batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's KMeans (Lloyd or Elkan) or MiniBatchKMeans, k-means++ init."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    if method == "minibatch":
        km = MiniBatchKMeans(n_clusters=c, random_state=seed, n_init=n_init, max_iter=max_iter,
                             batch_size=batch_size, tol=0.0, max_no_improvement=10)
    else:
        km = KMeans(n_clusters=c, random_state=seed, n_init=n_init, max_iter=max_iter, tol=tol,
                    algorithm="elkan" if method == "elkan" else "lloyd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates: fewer distinct clusters
        labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)


# ----------------------------------------------------------------------------- torch

def _sq_dists(x: Tensor, x_sq: Tensor, c: Tensor) -> Tensor:
    """‖x−c‖² for all pairs via one matmul (N×K), clamped at 0 against round-off."""
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _assign(x: Tensor, x_sq: Tensor, c: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid and its squared distance, in row chunks to bound memory."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s:s + chunk], x_sq[s:s + chunk], c)
        dists[s:s + chunk], labels[s:s + chunk] = d.min(dim=1)
    return labels, dists


def _kmeanspp(x: Tensor, x_sq: Tensor, c: int, gen: torch.Generator, chunk: int) -> Tensor:
    """Greedy k-means++ seeding: each new centre is the best of 2+ln(C) D²-weighted draws.

    The greedy variant (also scikit-learn's) costs a few extra matmuls per centre
    and gives a clearly lower starting inertia than plain k-means++.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(c))
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [first]
    closest = _sq_dists(x, x_sq, x[first:first + 1])[:, 0]
    for _ in range(1, c):
        pot = float(closest.sum())
        if pot > 0.0:
            cum = torch.cumsum(closest.double(), 0)
            r = torch.rand(trials, generator=gen, dtype=torch.float64).to(x.device) * cum[-1]
            cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
        else:  # fewer distinct points than centres: any point will do
            cand = torch.randint(n, (trials,), generator=gen).to(x.device)
        xc = x[cand]
        d_cand = torch.empty(n, cand.numel(), dtype=x.dtype, device=x.device)
        for s in range(0, n, chunk):  # candidate distances, chunked over rows
            d_cand[s:s + chunk] = _sq_dists(x[s:s + chunk], x_sq[s:s + chunk], xc)
        d_cand = torch.minimum(d_cand, closest[:, None])
        j = int(torch.argmin(d_cand.sum(0, dtype=torch.float64)))
        centres.append(int(cand[j]))
        closest = d_cand[:, j].contiguous()
    return x[torch.tensor(centres, device=x.device)].clone()


def torch_kmeans(
    features: np.ndarray | Tensor, c: int, seed: int, *, max_iter: int = 100, tol: float = 1e-4,
    device: Union[str, torch.device] = "cpu", chunk_elems: int = 1 << 24, return_n_iter: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, int]:
    """k-means++ seeding then Lloyd iterations, in float32 torch (CPU or GPU).

    Stops when the summed squared centre shift falls below ``tol`` × mean feature
    variance or the assignment no longer changes. Empty clusters are re-seeded on
    the points farthest from their centres. Results are not bit-identical to
    scikit-learn's (different random streams) but of the same quality.
    """
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32) if not isinstance(features, Tensor) else features)
    x = x.to(dev, torch.float32).contiguous()
    n, d = x.shape
    chunk = max(1, chunk_elems // max(c, 1))
    gen = torch.Generator().manual_seed(int(seed))
    x_sq = (x * x).sum(1)
    tol_abs = float(tol) * float(x.var(dim=0).mean())
    cent = _kmeanspp(x, x_sq, c, gen, chunk)
    labels: Optional[Tensor] = None
    stable = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        new_labels, dists = _assign(x, x_sq, cent, chunk)
        if labels is not None and torch.equal(new_labels, labels):
            stable = True  # centres already are the means of this assignment
            break
        labels = new_labels
        counts = torch.bincount(labels, minlength=c)
        if dev.type == "cpu":
            sums = torch.zeros(c, d, dtype=x.dtype, device=dev).index_add_(0, labels, x)
        else:  # one-hot matmul: deterministic on GPU, unlike atomic index_add_
            onehot = torch.zeros(c, n, dtype=x.dtype, device=dev)
            onehot[labels, torch.arange(n, device=dev)] = 1.0
            sums = onehot @ x
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = torch.argsort(dists, descending=True, stable=True)[: empty.numel()]
            new[empty] = x[far]
        shift = float(((new - cent) ** 2).sum())
        cent = new
        if shift <= tol_abs:
            break
    if not stable:  # final E-step so labels match the returned centres
        labels, _ = _assign(x, x_sq, cent, chunk)
    assert labels is not None
    out = labels.cpu().numpy().astype(np.int64), cent.cpu().numpy().astype(np.float32)
    return (*out, n_iter) if return_n_iter else out


def inertia(features: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances to the assigned centroid, in float64 (to compare methods fairly)."""
    x = np.asarray(features, dtype=np.float64)
    diff = x - np.asarray(centroids, dtype=np.float64)[np.asarray(labels)]
    return float(np.einsum("ij,ij->", diff, diff))


# ----------------------------------------------------------------------------- samplers

def stratified_pseudo_bag(labels: np.ndarray, m: int, rng: RngLike) -> np.ndarray:
    """Indices of M patches per cluster, drawn without replacement, returned sorted ascending.

    A cluster smaller than M gives all it has. Sorted order keeps slide reads
    local and makes F_SB = F_FB[idx] and X_SB = patches[idx] line up trivially.
    """
    lab = np.asarray(labels).reshape(-1)
    if m < 1:
        raise ValueError(f"m must be ≥ 1, got {m}")
    n = lab.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    gen = np.random.default_rng(rng)
    perm = gen.permutation(n)  # random order within each cluster ...
    idx = perm[np.argsort(lab[perm], kind="stable")]  # ... grouped by cluster
    grouped = lab[idx]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    return np.sort(idx[rank < m]).astype(np.int64)


def random_pseudo_bag(n: int, size: int, rng: RngLike) -> np.ndarray:
    """``min(size, n)`` indices drawn uniformly without replacement, sorted (the ablation)."""
    if n < 0 or size < 0:
        raise ValueError(f"n and size must be ≥ 0, got n={n}, size={size}")
    gen = np.random.default_rng(rng)
    return np.sort(gen.choice(n, size=min(size, n), replace=False)).astype(np.int64)
