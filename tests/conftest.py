"""Shared fixtures: the real slides in ../shared/data and small generated slides."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Before any test imports prefect (its settings are read at import) and inherited by every subprocess the suite
# starts: Prefect's ephemeral server gets 300 s to start, not its default 20 s, which a busy 2-core box overruns
# (issue #27: test_dask failed with "Timed out while attempting to connect to ephemeral Prefect API server").
EPHEMERAL_STARTUP_S = "300"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_S)

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = ROOT.parent / "shared" / "data" / "slides"


@pytest.fixture(scope="session")
def real_slide() -> Path:
    p = SHARED_SLIDES / "cmu-1-small-region.svs"
    if not p.exists():
        pytest.skip(f"real test slide not found at {p} (../shared/data is only beside CI and dev checkouts)")
    return p


@pytest.fixture(scope="session")
def broken_slide() -> Path:
    p = SHARED_SLIDES / "broken.svs"
    if not p.exists():
        pytest.skip(f"corrupt test slide not found at {p}")
    return p


def pink_on_white(width: int, height: int, box: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White glass with one H&E-pink rectangle of tissue (x0, y0, x1, y1), lightly textured."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 242, np.uint8)
    x0, y0, x1, y1 = box
    tissue = np.array([214, 120, 170], np.int16) + rng.integers(-12, 12, (y1 - y0, x1 - x0, 3))
    img[y0:y1, x0:x1] = np.clip(tissue, 0, 255).astype(np.uint8)
    return img


@pytest.fixture
def png_slide(tmp_path: Path) -> Path:
    """A 2048×1536 PNG (no MPP metadata) with tissue exactly in x∈[512,1536), y∈[512,1024)."""
    p = tmp_path / "plain.png"
    Image.fromarray(pink_on_white(2048, 1536, (512, 512, 1536, 1024))).save(p)
    return p
