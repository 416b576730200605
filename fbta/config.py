"""Typed configuration: ``params.yaml`` merged over a structured schema.

Why a schema: DVC and ``fbta <cmd> key=value`` both feed free text into the
pipeline; validating it against dataclasses turns a typo into one clear error
instead of a silently ignored setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class DataCfg:
    """Where a cohort lives and where every stage writes (⚑ cohort input)."""

    slides: str = "data/slides"
    labels: str = "data/labels.csv"
    out: str = "data"
    masks: Optional[str] = "data/masks"
    features: Optional[str] = None  # an existing CLAM/TRIDENT feature folder to use instead of features/<extract.model>


@dataclass
class RunCfg:
    strict: bool = False  # non-zero exit when any slide failed
    seed: int = 0
    progress: bool = True  # tqdm bars on long loops


@dataclass
class SynthCfg:
    """The embedded demo cohort (``fbta synth``)."""

    n_slides: int = 24
    width: int = 3072  # level-0 pixels
    height: int = 3072
    mpp: float = 0.5  # µm/px at level 0 (20x)
    seed: int = 0
    positive_fraction: float = 0.5
    tumour_fraction: float = 0.15  # share of tissue area carrying the signal in positive slides
    tumour_contrast: float = 1.0  # 0..1: how far tumour nuclei differ from normal ones (lower = harder)
    val_fraction: float = 0.25
    test_fraction: float = 0.25
    mask_downsample: int = 16  # ground-truth mask resolution relative to level 0
    jpeg_quality: int = 90


@dataclass
class TissueCfg:
    """Tissue detection on a low-resolution image (``fbta tile``)."""

    mask_mpp: float = 4.0  # µm/px of the image the mask is computed on
    sat_threshold: Optional[int] = None  # None: Otsu on saturation
    sat_min: int = 12  # floor for the Otsu threshold (blank slides stay blank)
    black_value: int = 40  # pixels darker than this (max RGB) are borders/debris
    remove_pen: bool = True
    median_um: float = 16.0  # median filter width before thresholding
    close_um: float = 16.0  # morphological closing radius
    min_area_um2: float = 20000.0  # drop tissue pieces smaller than this
    max_hole_um2: float = 50000.0  # fill holes smaller than this


@dataclass
class TileCfg:
    """Patch grid at a target magnification (``fbta tile``)."""

    target_mpp: float = 0.5  # µm/px of the patches (0.5 ≈ 20x)
    patch_size: int = 256  # px at target_mpp
    overlap: int = 0  # px at target_mpp shared by neighbouring patches
    min_tissue: float = 0.25  # minimum tissue fraction of a patch
    default_mpp: Optional[float] = None  # last resort when a slide has no MPP anywhere
    level_tolerance: float = 0.02  # a pyramid level within 2% of the wanted scale counts as a match
    thumbnail_px: int = 1024  # longest side of the thumbnail PNG


@dataclass
class ExtractCfg:
    """Frozen patch features (``fbta extract``); defaults sized for a GPU."""

    model: str = "efficientnet_lite0"  # a name from fbta.features.list_extractors()
    weights: Optional[str] = None  # checkpoint path, "random", or None for the model's offline default
    batch_size: int = 128
    num_workers: int = 4  # patch-reading processes (each opens the slide once)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16/float16 autocast on GPU


@dataclass
class ClusterCfg:
    """Per-slide KMeans on frozen features (``fbta cluster``), FBTA's pseudo-bag strata."""

    n_clusters: int = 100  # C; a slide with N < C patches gets C = N
    seed: int = 0
    method: str = "auto"  # auto | torch | sklearn | elkan | minibatch (see benchmarks/kmeans.py)


@dataclass
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    run: RunCfg = field(default_factory=RunCfg)
    synth: SynthCfg = field(default_factory=SynthCfg)
    tissue: TissueCfg = field(default_factory=TissueCfg)
    tile: TileCfg = field(default_factory=TileCfg)
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)


class ConfigError(ValueError):
    """A params file or override that does not fit the schema (exit code 2)."""


def _one_line(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0].strip()
    if "Key '" in msg and "not in" in msg:
        return f"{source}: unknown key '{key}'"
    if key:
        return f"{source}: bad value for '{key}': {msg}"
    return f"{source}: {msg}"


def load_config(params: str | Path | None = "params.yaml", overrides: Sequence[str] = ()) -> DictConfig:
    """Schema ← params.yaml ← ``key=value`` overrides; raise ConfigError on any mismatch."""
    cfg: DictConfig = OmegaConf.structured(Config)
    if params is not None:
        path = Path(params)
        if path.exists():
            try:
                loaded = OmegaConf.load(path)
            except Exception as exc:  # yaml syntax
                raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
            try:
                cfg = OmegaConf.merge(cfg, loaded)
            except OmegaConfBaseException as exc:
                raise ConfigError(_one_line(exc, str(path))) from exc
        elif str(params) != "params.yaml":
            raise ConfigError(f"{path}: params file not found")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, f"override '{item}'")) from exc
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config beside a stage's outputs, atomically."""
    from fbta.io.atomic import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg, resolve=True))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
