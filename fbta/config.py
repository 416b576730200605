"""Typed configuration: ``params.yaml`` merged over a structured schema.

Why a schema: DVC and ``fbta <cmd> key=value`` both feed free text into the
pipeline; validating it against dataclasses turns a typo into one clear error
instead of a silently ignored setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

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
    tumour_contrast: float = 0.15  # 0..1: how far tumour nuclei differ from normal ones (see benchmarks/synth_difficulty.py)
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
class MILCfg:
    """The MIL head: a name from ``fbta.mil.list_mil()`` and its constructor options."""

    arch: str = "abmil"  # abmil | abmil_plain | transmil | mambamil
    dropout: float = 0.25
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra head options, e.g. mil.kwargs.rate=5 (MambaMIL)


@dataclass
class TrainCfg:
    """Slide-level training (``fbta train``), one slide per step; defaults sized for a GPU run."""

    method: str = "vanilla"  # vanilla (frozen features → MIL) | fbta (issue #5)
    epochs: int = 200
    patience: int = 20  # stop after this many epochs without a better validation AUC
    lr: float = 2e-4
    weight_decay: float = 1e-5  # Adam's L2 term
    ema: bool = False  # validate and save an exponential moving average of the MIL weights
    ema_alpha: float = 0.999  # EMA decay per optimiser step
    balanced: bool = True  # class-balanced sampling (weights 1/class count, with replacement)
    seed: int = 0  # weights init, sampling order, dropout
    deterministic: bool = True  # torch.use_deterministic_algorithms
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    preload: bool = False  # hold every bag in memory (small cohorts) instead of reading HDF5 each step
    num_workers: int = 2  # bag-reading processes when not preloaded
    # splits: labels.csv `split` (or `fold`) column, else drawn once into <data.out>/splits/splits.csv
    fold: Optional[int] = None  # k-fold: test = fold k, val = fold k+1 (mod K), train = the rest
    n_folds: int = 5
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0  # seed of the drawn split (separate from `seed`, so re-seeding never re-splits)


@dataclass
class EvaluateCfg:
    """Slide-level metrics of a trained model (``fbta evaluate``)."""

    split: str = "test"  # test → classification.<method> in metrics.json; val → classification.<method>_val


@dataclass
class HeatmapCfg:
    """Instance-score heatmaps over slide thumbnails (``fbta heatmap``)."""

    slides: List[str] = field(default_factory=list)  # empty: every slide with features
    max_px: int = 1024  # longest side of the slide image under the heatmap
    cmap: str = "turbo"  # any matplotlib colormap name
    alpha: float = 0.5  # opacity of the coloured patches
    normalize: str = "percentile"  # percentile (rank within the slide) | minmax


@dataclass
class TrackingCfg:
    """MLflow: one run per stage execution (sqlite backend; the file store is refused by MLflow 3)."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlruns"  # where a new experiment keeps its artefacts (resolved to a file URI)
    experiment: str = "fbta"


@dataclass
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    run: RunCfg = field(default_factory=RunCfg)
    synth: SynthCfg = field(default_factory=SynthCfg)
    tissue: TissueCfg = field(default_factory=TissueCfg)
    tile: TileCfg = field(default_factory=TileCfg)
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    mil: MILCfg = field(default_factory=MILCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)
    heatmap: HeatmapCfg = field(default_factory=HeatmapCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)


class ConfigError(ValueError):
    """A params file or override that does not fit the schema (exit code 2)."""


class InputError(ValueError):
    """A stage input that cannot be used — no trained model, an unreachable tracking store (exit code 2).

    Defined here, beside ConfigError, so the CLI can catch it without importing torch or mlflow.
    """


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
