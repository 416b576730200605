"""Nuclei for the synthetic slides: kernel banks, placement and stamping.

Why kernels: a slide holds tens of thousands of nuclei; drawing each one in
Python would dominate generation time. Instead every slide draws a small bank
of nucleus images (hematoxylin concentration, vectorised over the bank) and
stamps them with one ``np.bincount`` per band of rows.

The class signal lives here: normal nuclei are small, round and evenly dark;
tumour nuclei are ~1.5x larger, elongated, irregular, with a dark rim, coarse
chromatin clumps and nucleoli, arranged in nests. They replace the normal
nuclei of the tumour region with the same total absorbed light (fewer, larger
nuclei), which keeps the mean colour of tumour and normal tissue matched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class NucleusKind:
    """Shape and chromatin parameters of one nucleus population (px at level 0)."""

    radius: tuple[float, float]  # geometric-mean radius range
    aspect: tuple[float, float]  # major / minor axis
    wobble: float  # amplitude of boundary irregularity (fraction of radius)
    level: tuple[float, float]  # hematoxylin concentration of the nucleoplasm
    grain: float = 0.08  # fine chromatin texture amplitude
    clumps: float = 0.0  # coarse chromatin clumps (added concentration)
    rim: float = 0.0  # nuclear membrane darkening
    nucleoli: float = 0.0  # how often nucleoli show (0..1)


# ~6-8 µm normal nuclei (12-16 px at 0.5 µm/px), tumour ~1.5x larger.
NORMAL = NucleusKind(radius=(5.5, 7.5), aspect=(1.0, 1.3), wobble=0.03, level=(1.4, 1.75), grain=0.14)
TUMOUR = NucleusKind(
    radius=(8.5, 11.5), aspect=(1.3, 2.0), wobble=0.10, level=(0.8, 1.0),
    grain=0.12, clumps=0.85, rim=0.55, nucleoli=1.0,
)
LYMPHOCYTE = NucleusKind(radius=(3.5, 4.5), aspect=(1.0, 1.15), wobble=0.02, level=(1.9, 2.2))
FIBROBLAST = NucleusKind(radius=(4.0, 5.5), aspect=(4.0, 6.5), wobble=0.02, level=(1.4, 1.7))


def blend(a: NucleusKind, b: NucleusKind, t: float) -> NucleusKind:
    """Parameters a·(1−t) + b·t: ``t`` < 1 makes tumour nuclei more like normal ones (harder task)."""
    t = float(np.clip(t, 0.0, 1.0))

    def mix(x: float, y: float) -> float:
        return (1 - t) * x + t * y

    def mix2(x: tuple[float, float], y: tuple[float, float]) -> tuple[float, float]:
        return (mix(x[0], y[0]), mix(x[1], y[1]))

    return NucleusKind(
        radius=mix2(a.radius, b.radius), aspect=mix2(a.aspect, b.aspect), wobble=mix(a.wobble, b.wobble),
        level=mix2(a.level, b.level), grain=mix(a.grain, b.grain), clumps=mix(a.clumps, b.clumps),
        rim=mix(a.rim, b.rim), nucleoli=mix(a.nucleoli, b.nucleoli),
    )


BANK_SIZE = 48
NORMAL_SPACING = 22.0  # px between candidate sites (jittered hex grid)
NORMAL_ACCEPT = 0.5  # acceptance of a normal site at full cellularity
LYMPHO_DENSITY = 1.0 / 9000  # per px² of tissue, same in tumour and normal
FIBRO_DENSITY = 1.0 / 5000


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise over the last two axes, unit std (float32)."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sig = (0.0,) * (len(shape) - 2) + (sigma, sigma)
    out = ndi.gaussian_filter(noise, sig)
    return out / max(float(out.std()), 1e-6)


def kernel_bank(rng: np.random.Generator, kind: NucleusKind, n: int = BANK_SIZE) -> np.ndarray:
    """(n, K, K) float32 hematoxylin images of n random nuclei of one kind, centred."""
    r = rng.uniform(*kind.radius, n).astype(np.float32)
    asp = rng.uniform(*kind.aspect, n).astype(np.float32)
    a, b = r * np.sqrt(asp), r / np.sqrt(asp)
    half = int(np.ceil(a.max() * (1 + 2.2 * kind.wobble) + 2))
    g = np.arange(-half, half + 1, dtype=np.float32)
    yy, xx = g[None, :, None], g[None, None, :]
    theta = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = yy * np.cos(theta) - xx * np.sin(theta)
    un, vn = u / a[:, None, None], v / b[:, None, None]
    rho, phi = np.hypot(un, vn), np.arctan2(vn, un)
    mult = np.ones_like(rho)
    for k in range(2, 6):  # low boundary harmonics: lobulated, irregular outline
        amp = kind.wobble * rng.uniform(0.3, 1.0, n).astype(np.float32) / np.sqrt(k - 1)
        mult += amp[:, None, None] * np.cos(k * phi + rng.uniform(0, 2 * np.pi, n)[:, None, None])
    inside = (1 - rho / mult) * r[:, None, None]  # ≈ px from the boundary, >0 inside
    alpha = np.clip(inside + 0.5, 0, 1)  # one-pixel anti-aliased edge
    level = rng.uniform(*kind.level, n).astype(np.float32)[:, None, None]
    conc = level * (1 + kind.grain * smooth_noise(rng, alpha.shape, 0.7))
    if kind.clumps:
        clumps = np.clip((smooth_noise(rng, alpha.shape, 1.3) - 0.35) * 1.6, 0, 1)
        conc += kind.clumps * clumps
    if kind.rim:
        conc += kind.rim * np.clip(1 - (inside - 0.5) / 2.0, 0, 1)
    for j in range(2 if kind.nucleoli > 0 else 0):
        present = rng.random(n) < (0.85 if j == 0 else 0.35) * kind.nucleoli
        off = rng.uniform(-0.45, 0.45, (2, n)).astype(np.float32) * b
        rad = rng.uniform(1.4, 2.3, n).astype(np.float32)
        dist = np.hypot(yy - off[0][:, None, None], xx - off[1][:, None, None])
        dot = np.clip(rad[:, None, None] - dist + 0.5, 0, 1)
        conc += 1.1 * (present[:, None, None] * dot)
    return (alpha * conc).astype(np.float32)


def absorbed(bank: np.ndarray, h_vec: np.ndarray, transmission: np.ndarray) -> np.ndarray:
    """Light each nucleus of the bank removes (summed over pixels and RGB, background units).

    Tumour nuclei are matched to normal ones in absorbed light rather than in
    count, so both tissues have the same mean colour.
    """
    od = bank[..., None] * h_vec.astype(np.float32)
    lost = transmission.astype(np.float32) * (1 - np.exp(-od))
    return lost.sum(axis=(1, 2, 3)).astype(np.float64)


def hex_grid(rng: np.random.Generator, h: int, w: int, spacing: float, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Jittered hexagonal candidate sites: even spacing keeps nuclei from piling up."""
    row_step = spacing * np.sqrt(3) / 2
    ys = np.arange(row_step / 2, h, row_step, dtype=np.float32)
    xs = np.arange(spacing / 2, w + spacing, spacing, dtype=np.float32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    xx = xx + (np.arange(len(ys)) % 2)[:, None] * (spacing / 2)
    yy = yy + rng.uniform(-jitter, jitter, yy.shape).astype(np.float32)
    xx = xx + rng.uniform(-jitter, jitter, xx.shape).astype(np.float32)
    yi, xi = np.rint(yy).astype(np.int64).ravel(), np.rint(xx).astype(np.int64).ravel()
    ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    return yi[ok], xi[ok]


def uniform_sites(rng: np.random.Generator, h: int, w: int, density: float) -> tuple[np.ndarray, np.ndarray]:
    """Poisson-distributed sites (cells that are not part of the epithelium)."""
    n = int(rng.poisson(density * h * w))
    return rng.integers(0, h, n), rng.integers(0, w, n)


@dataclass
class Population:
    """Nuclei of one kind: their bank, centres and which bank entry each uses."""

    bank: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    which: np.ndarray

    @property
    def half(self) -> int:
        return self.bank.shape[-1] // 2


def populate(
    rng: np.random.Generator,
    tissue: np.ndarray,
    tumour: np.ndarray,
    cellularity: np.ndarray,
    nests: np.ndarray,
    grid: int,
    h_vec: np.ndarray,
    transmission: np.ndarray,
    tumour_kind: NucleusKind = TUMOUR,
) -> list[Population]:
    """Place every nucleus of a slide.

    ``cellularity`` (0..1) and ``nests`` (mean ≈ 1) are maps on a grid ``grid``
    times coarser than level 0. Normal sites are accepted with probability
    ∝ cellularity. Inside the tumour, the normal nuclei that would have been
    there are replaced by tumour nuclei absorbing the same total light,
    clustered by ``nests``. Every draw has a fixed size, so the positive and
    negative versions of a slide share all random numbers but the tumour's.
    """
    h, w = tissue.shape
    pops: list[Population] = []

    def add(bank: np.ndarray, ys: np.ndarray, xs: np.ndarray, keep: np.ndarray) -> np.ndarray:
        which = rng.integers(0, len(bank), len(ys))  # drawn for every site: the stream never depends on the tumour
        pops.append(Population(bank, ys[keep], xs[keep], which[keep]))
        return which

    normal_bank, tumour_bank = kernel_bank(rng, NORMAL), kernel_bank(rng, tumour_kind)
    loss_n, loss_t = absorbed(normal_bank, h_vec, transmission), absorbed(tumour_bank, h_vec, transmission)
    ys, xs = hex_grid(rng, h, w, NORMAL_SPACING, 5.0)
    p = NORMAL_ACCEPT * cellularity[ys // grid, xs // grid]
    accepted = tissue[ys, xs] & (rng.random(len(ys)) < p)
    in_tumour = tumour[ys, xs]
    which = add(normal_bank, ys, xs, accepted & ~in_tumour)
    budget = loss_n[which[accepted & in_tumour]].sum()  # light the replaced normal nuclei would absorb

    # Tumour sites: wider spacing, density from the light budget, clustered by ``nests``;
    # drawn with headroom, then a random prefix is kept whose light matches the budget.
    spacing = NORMAL_SPACING * (np.mean(tumour_kind.radius) / np.mean(NORMAL.radius)) ** 0.75
    ys, xs = hex_grid(rng, h, w, spacing, 4.0)
    scale = (spacing / NORMAL_SPACING) ** 2 * loss_n.mean() / loss_t.mean()
    p = 1.3 * NORMAL_ACCEPT * scale * cellularity[ys // grid, xs // grid] * nests[ys // grid, xs // grid]
    accepted = tumour[ys, xs] & (rng.random(len(ys)) < p)
    order = rng.permutation(len(ys))
    which_t = rng.integers(0, len(tumour_bank), len(ys))
    ranked = order[accepted[order]]
    n_keep = int(np.searchsorted(np.cumsum(loss_t[which_t[ranked]]), budget))
    keep = np.zeros(len(ys), dtype=bool)
    keep[ranked[:n_keep]] = True
    pops.append(Population(tumour_bank, ys[keep], xs[keep], which_t[keep]))

    for kind, density in ((LYMPHOCYTE, LYMPHO_DENSITY), (FIBROBLAST, FIBRO_DENSITY)):
        ys, xs = uniform_sites(rng, h, w, density)
        add(kernel_bank(rng, kind), ys, xs, tissue[ys, xs])
    return pops


def stamp_rows(pops: list[Population], y0: int, y1: int, width: int) -> np.ndarray:
    """Hematoxylin concentration of rows y0:y1 from every nucleus touching them."""
    pad = 2 * max(p.half for p in pops)
    hb, wb = y1 - y0 + 2 * pad, width + 2 * pad
    acc = np.zeros(hb * wb, dtype=np.float64)
    for pop in pops:
        r = pop.half
        sel = (pop.ys >= y0 - r) & (pop.ys < y1 + r)
        if not sel.any():
            continue
        top = pop.ys[sel] - y0 + pad - r  # kernel's top-left corner in the padded buffer
        left = pop.xs[sel] + pad - r
        k = 2 * r + 1
        off = (np.arange(k)[:, None] * wb + np.arange(k)[None, :]).ravel()
        flat = ((top * wb + left)[:, None] + off[None, :]).ravel()
        weights = pop.bank[pop.which[sel]].reshape(-1)
        acc += np.bincount(flat, weights=weights, minlength=hb * wb)
    return acc.reshape(hb, wb)[pad:pad + y1 - y0, pad:pad + width].astype(np.float32)
