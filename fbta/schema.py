"""The configuration schema: every section of ``params.yaml`` as a typed dataclass (loading: fbta/config.py).

Why a schema: DVC and ``fbta <cmd> key=value`` both feed free text into the
pipeline; validating it against dataclasses turns a typo into one clear error
instead of a silently ignored setting. Settings with a fixed set of values are
``Choice`` enums (fbta/choices.py), so a wrong value is refused when the config
is loaded, with the key and the choices named — no stage checks them by hand. Defaults are sized for a
GPU run; ``params.yaml`` holds the CPU demo's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from fbta.choices import (CEForm, EmaEvery, ExportLayout, Fusion, HeatmapNormalize, KD, KMeansMethod, LinkMode,
                          Sampling, StudentInit, SynthDesign, SynthStyle, TaskRunner, TeacherLoss, TrainMethod, View)


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
    slides: List[str] = field(default_factory=list)  # per-slide stages: only these slide ids (empty: all)


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
    style: SynthStyle = SynthStyle.texture  # texture: real H&E (CMU-1) mosaic + tumour cytology | drawn: the Beer-Lambert dot-nuclei model
    stain_sd: float = 0.15  # texture: per-slide log-scale s.d. of haematoxylin and eosin density (lab/scanner spread)
    texture: Optional[str] = None  # texture: source image; None: fbta/synth/assets/cmu1_region.jpg
    # detection: normal vs tumour slides (tumour_fraction of the positives' tissue) | subtyping: every slide carries
    # tumour on tumour_fraction of its tissue; the two classes' tumours differ by subtype_delta (texture style only)
    design: SynthDesign = SynthDesign.detection
    subtype_delta: float = 0.5  # subtyping: 0..1, how far subtype_b's nuclei (vesicular, larger) differ from subtype_a's
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
    thin_um: float = 64.0  # fat / loose tissue: window in which thin strands are counted (0 = off)
    thin_density: float = 0.12  # share of strand pixels in that window that makes it tissue
    thin_cell_um2: float = 20000.0  # largest vacuole (adipocyte) the strands enclose


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
    num_workers: int = -1  # patch-reading processes (each opens the slide once); -1: the machine's usable cores
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bfloat16/float16 autocast on GPU
    input_size: int = 0  # px the network sees (patches resized to it); 0: the model's own (224). FBTA's TFE uses it too
    scaled_decode: bool = True  # patches 2×/4×/8× below a JPEG level (40× slide at 20×): DCT-scaled tile decode


@dataclass
class ClusterCfg:
    """Per-slide KMeans on frozen features (``fbta cluster``), FBTA's pseudo-bag strata."""

    n_clusters: int = 100  # C; a slide with N < C patches gets C = N
    seed: int = 0
    method: KMeansMethod = KMeansMethod.auto  # auto | torch | sklearn | elkan | minibatch (see benchmarks/kmeans.py)
    device: str = "auto"  # the torch method's device: auto (CUDA when present) | cpu | cuda[:N]


@dataclass
class MILCfg:
    """The MIL head: a name from ``fbta.mil.list_mil()`` and its constructor options."""

    arch: str = "abmil"  # abmil | abmil_plain | transmil | mambamil
    dropout: float = 0.25
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra head options, e.g. mil.kwargs.rate=5 (MambaMIL)


@dataclass
class TrainCfg:
    """Slide-level training (``fbta train``), one slide per step; defaults sized for a GPU run."""

    method: TrainMethod = TrainMethod.vanilla  # vanilla (frozen features → MIL) | fbta (end-to-end, METHODS.md A)
    epochs: int = 200
    patience: int = 20  # stop after this many epochs without a better validation AUC (counted from min_epochs)
    min_epochs: int = 10  # epochs 0…min_epochs−1 are never "best" nor count toward patience (vanilla and FBTA)
    lr: float = 2e-4
    weight_decay: float = 1e-5  # Adam's L2 term
    standardize: bool = True  # heads z-score their input with the training instances' per-feature mean/std
    # vanilla's EMA, the same options as fbta.ema_* (comparisons set them equal; defaults match FBTA's)
    ema: bool = True  # validate and save an exponential moving average of the MIL weights
    ema_alpha: float = 0.9  # ema = α·ema + (1 − α)·model
    ema_every: EmaEvery = EmaEvery.epoch  # epoch | step: when the EMA is updated
    ema_warmup: bool = False  # our choice: decay min(α, (1+n)/(10+n)) at the n-th update (short runs)
    balanced: bool = True  # class-balanced sampling (weights 1/class count, with replacement)
    seed: int = 0  # weights init, sampling order, dropout
    deterministic: bool = True  # torch.use_deterministic_algorithms
    resume: bool = True  # a killed run continues from its last epoch (models/<variant>/resume.pt)
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
class AugmentCfg:
    """Augmentation of the end-to-end view X_SB (METHODS.md A.4, our choice): geometric + mild colour."""

    flip: bool = True  # random horizontal / vertical flips
    rot90: bool = True  # random multiples of 90°
    brightness: float = 0.1  # colour jitter amplitudes (0 = off)
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    hed_sigma: float = 0.03  # HED (haematoxylin/eosin/DAB) stain jitter: per-channel scale 1±σ, shift ±σ


@dataclass
class FBTACfg:
    """FBTA end-to-end training (``fbta train train.method=fbta``), METHODS.md A; C is ``cluster.n_clusters``."""

    epochs: Optional[int] = None  # FBTA epochs (each costs C·M extractor passes per slide); None: train.epochs
    m: int = 1  # M: instances drawn per cluster per epoch (paper: 1 or 2); memory grows with C·M, not N
    sampling: Sampling = Sampling.kmeans  # kmeans (stratified over cached clusters) | random (same C·M, the ablation)
    # | all (every patch; train.method=e2e always uses it)
    max_bag: int = 512  # sampling=all / train.method=e2e: at most this many patches per step (a random subset)
    bags_per_slide: int = 1  # pseudo-bags (steps) per training slide and epoch: more extractor steps, same epochs
    extractor_every: int = 1  # the TFE steps once every S slides on their averaged gradients (head: every slide); 1: paper
    views: List[View] = field(default_factory=lambda: [View.fb, View.eb, View.tb])  # bags in L_cls/L_cons: fb, eb, tb
    k: int = 10  # K translator heads
    hidden: int = 256  # translator hidden width (a bottleneck keeps K heads small: 10×2×D×256 weights); 0: D
    layernorm: bool = False  # LayerNorm before each translator head's MLP
    trainable_extractor: bool = True  # false: the TFE stays frozen (the paper's "freeze TFE" ablation)
    train_blocks: int = -1  # -1: train the whole TFE; n: only its last n blocks (cheap CPU demos)
    freeze_bn: bool = True  # keep the TFE's BatchNorm statistics (a pseudo-bag is a small, one-slide batch)
    extractor_lr: float = 1.5e-5  # TFE learning rate (MIL uses train.lr); METHODS.md: ≈ 1e-5–2e-5
    translator_lr: float = 2e-4
    ema_alpha: float = 0.9  # MIL* and TFE*: ema = α·ema + (1 − α)·model
    ema_every: EmaEvery = EmaEvery.epoch  # epoch | step: when the EMA teachers are updated (paper: epoch)
    ema_warmup: bool = False  # our choice (METHODS.md A): decay min(α, (1+n)/(10+n)) at the n-th update
    consistency: bool = True  # L_cons with curriculum weight t/T
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    num_workers: int = 2  # patch-reading processes prefetching the next slides' pseudo-bags
    prefetch: int = 2  # pseudo-bags each worker reads ahead
    amp: bool = True  # autocast on CUDA (ignored on CPU)
    diag_slides: int = 8  # gap_ratio / tfe_drift diagnostics: up to this many validation slides (0: off)
    diag_patches: int = 8  # … and this many patches of each, drawn once (seeded by train.seed)


@dataclass
class InferCfg:
    """``fbta infer``: the FBTA model's translator path, and the TFE* re-extraction it replaces."""

    reextract: bool = True  # also re-encode every held-out patch with TFE* (classification.fbta_reextract)
    batch_size: int = 128  # re-extraction batch
    num_workers: int = -1  # re-extraction patch-reading processes; -1: the machine's usable cores


@dataclass
class RegisterCfg:
    """MLflow registry (``fbta register``): log trained models as pyfunc, move @champion only when better."""

    models: List[str] = field(default_factory=lambda: ["classifier"])  # classifier | segmenter
    classifier: Optional[str] = None  # model folder; None: <data.out>/models/<train.method>_<mil.arch>
    segmenter: Optional[str] = None  # model folder; None: <data.out>/models/seg_student
    classifier_name: str = "fbta-classifier"  # registered model names (⚑)
    segmenter_name: str = "fbta-segmenter"
    promote: bool = True  # false: register the version only, never move aliases


@dataclass
class TuneCfg:
    """Optuna study (``fbta tune``); one trial = one training run. A list of choices per key, [] = not tuned."""

    storage: str = "sqlite:///optuna.db"  # never the MLflow database (both keep an alembic_version table)
    study: Optional[str] = None  # None: fbta-<dataset>-<train.method>-<mil.arch>
    dataset: Optional[str] = None  # None: the name of the labels file's folder
    n_trials: int = 20  # total for the study: a re-run continues up to this many finished trials
    timeout: Optional[float] = None  # seconds for this invocation (None: no limit)
    seed: int = 0  # TPE sampler seed
    startup_trials: int = 5  # random trials before TPE models the space; trials the pruner waits for
    warmup_epochs: int = 2  # epochs a trial runs before it may be pruned
    epochs: Optional[int] = None  # train.epochs for a trial (None: train.epochs)
    n_clusters: List[int] = field(default_factory=lambda: [50, 100, 200])  # C (fbta only)
    m: List[int] = field(default_factory=lambda: [1, 2])  # M (fbta only)
    k: List[int] = field(default_factory=lambda: [5, 10, 20])  # K (fbta only)
    lr: List[float] = field(default_factory=lambda: [5e-5, 1e-3])  # train.lr, [low, high] log-uniform
    extractor_lr: List[float] = field(default_factory=lambda: [5e-6, 5e-5])  # fbta only
    translator_lr: List[float] = field(default_factory=lambda: [5e-5, 1e-3])  # fbta only


@dataclass
class PredictCfg:
    """Batch inference on new slides (``fbta predict``): tile → extract → classifier → predictions."""

    slides: str = "data/new_slides"  # folder of new slides
    labels: Optional[str] = None  # optional slide_id,label[,mpp,path] CSV; None: <slides>/labels.csv if present
    out: Optional[str] = None  # where their coords/features go; None: <data.out>/predict
    model: str = "models:/fbta-classifier@champion"  # an MLflow model URI or a model folder
    name: str = "predictions"  # reports/predictions/<name>.{csv,json}


@dataclass
class SegTeacherCfg:
    """IKD-MIL stage 1 (``fbta seg-teacher``): side-output network from broadcast patch labels."""

    epochs: int = 30
    lr: float = 5e-5  # Adam (authors' code: 5e-5, weight decay 5e-5)
    weight_decay: float = 5e-5
    loss: TeacherLoss = TeacherLoss.dice  # dice (IKD-MIL: soft Dice, inverted on negatives) | gmp_bce (generalised-mean pooling + BCE)
    gmp_r: float = 4.0  # r of generalised-mean pooling (gmp_bce only)
    seed: int = 0


@dataclass
class SegDistillCfg:
    """IKD-MIL stage 2 (``fbta seg-distill``): fusion-knowledge distillation with role reversal."""

    epochs: int = 120
    lr: float = 5e-5
    weight_decay: float = 5e-5
    kd: KD = KD.fusion  # fusion (every student map vs the teacher's fused map) | blockwise (s_i vs teacher s_i)
    weighted_ce: bool = False  # OEEM-style weighted CE vs the teacher's pseudo-label (authors' code; off: README § Segmentation)
    ce_weight: float = 2.0  # × batch size: the authors' `loss_oeem * 2 * B`
    ce_form: CEForm = CEForm.authors  # authors: softmax CE on (1 − p, p) as logits, as their code (bounded) | bce
    role_reversal: bool = True
    reversal_start: int = 30  # first epoch a swap is checked (authors: 60 of 500)
    reversal_every: int = 30  # then every n epochs
    init: StudentInit = StudentInit.backbone  # student init: backbone (ImageNet/random backbone, fresh side outputs) | teacher (copy)
    seed: int = 0


@dataclass
class SegCfg:
    """IKD-MIL weakly-supervised segmentation (METHODS.md B); schema defaults sized for a GPU."""

    backbone: str = "efficientnet_lite0"  # an extractor name (fbta.features.list_extractors()); its timm arch
    weights: Optional[str] = None  # as extract.weights: None = the extractor's offline default, "random", or a path
    out_indices: List[int] = field(default_factory=lambda: [0, 1, 2])  # timm features_only stages → s1, s2, s3
    fusion: Fusion = Fusion.fixed  # fixed | learnable (softmax-normalised weights initialised from fusion_weights)
    fusion_weights: List[float] = field(default_factory=lambda: [0.3, 0.3, 0.4])
    # Weak patch labels ([choice], fbta/seg/dataset.py): positive = annotated tumour share ≥ min_tumour_fraction
    # (0.5: the broadcast all-ones target is right on ≥ half the pixels; 0 = any tumour pixel), negative = no
    # tumour, ambiguous = in between (never trained on; scored as their own group).
    min_tumour_fraction: float = 0.5
    negative_margin: float = 0.0  # negatives also need no tumour within this many patch sides around them
    max_ambiguous: int = 64  # ambiguous patches cached per validation/test split (0: none)
    normal_labels: List[str] = field(default_factory=lambda: ["normal"])  # slides of these labels need no mask
    neg_per_pos: float = 1.0  # negatives kept per positive patch in each split (0: keep all)
    max_train: int = 0  # patches per split after balancing (0: no cap)
    max_val: int = 0
    max_test: int = 0
    data_seed: int = 0  # which patches are sampled (separate from the training seeds)
    batch_size: int = 16
    input_size: int = 0  # px the network sees (patches resized to it; maps returned at patch size); 0 = patch size
    augment: bool = True  # random flips and 90° rotations of training patches
    colour_jitter: float = 0.1  # brightness/contrast/saturation factors in U(1 ± x) per training patch (0: off)
    hed_sigma: float = 0.03  # HED stain jitter of training patches: scale U(1 ± σ), shift U(± σ) (0: off)
    sigma: float = 3.0  # Gaussian smoothing of the fused map before thresholding (metrics)
    threshold: float = 0.5
    overlays: int = 6  # test patches drawn as overlay PNGs
    slide_maps: int = 3  # test slides drawn as stitched student maps (annotated ones first; 0: none)
    slide_map_px: int = 1024  # longest side of a slide map's image
    slide_map_max_patches: int = 4000  # a slide with more tiled patches is drawn from a seeded sample of this many
    device: str = "auto"
    deterministic: bool = True
    resume: bool = True  # a killed seg-teacher / seg-distill goes on from its last epoch (resume.pt in its model folder)
    teacher: SegTeacherCfg = field(default_factory=SegTeacherCfg)
    distill: SegDistillCfg = field(default_factory=SegDistillCfg)


@dataclass
class EvaluateCfg:
    """Slide-level metrics of a trained model (``fbta evaluate``)."""

    split: str = "test"  # test → classification.<method> in metrics.json; val → classification.<method>_val


@dataclass
class QuPathCfg:
    """GeoJSON for QuPath (``fbta qupath``): tissue, the patch grid with scores, predicted tumour."""

    slides: List[str] = field(default_factory=list)  # empty: every labelled slide with coords
    dest: str = "qupath"  # folder under data.out
    patches: bool = True  # the patch grid as detections
    scores: bool = True  # instance scores of models/<train.method>_<mil.arch> as measurements, if trained
    tumour: bool = True  # models/seg_student's predicted tumour as "Tumor" annotations, if trained
    tumour_px: int = 2048  # longest side of the student's stitched map (its polygons' resolution)


@dataclass
class ExportCfg:
    """Features and coords in another tool's folder tree (``fbta export``)."""

    layout: ExportLayout = ExportLayout.trident  # trident: <mag>x_<ps>px_<ov>px_overlap/{features_<extractor>,patches}
    dest: str = "trident"  # folder under data.out
    link: LinkMode = LinkMode.hardlink  # hardlink (copy across file systems) | symlink | copy


@dataclass
class HeatmapCfg:
    """Instance-score heatmaps over slide thumbnails (``fbta heatmap``)."""

    slides: List[str] = field(default_factory=list)  # empty: every slide with features
    max_px: int = 1024  # longest side of the slide image under the heatmap
    cmap: str = "turbo"  # any matplotlib colormap name
    alpha: float = 0.5  # opacity of the coloured patches
    normalize: HeatmapNormalize = HeatmapNormalize.percentile  # percentile (rank within the slide) | minmax


@dataclass
class TrackingCfg:
    """MLflow: one run per stage execution (sqlite backend; the file store is refused by MLflow 3)."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlruns"  # where a new experiment keeps its artefacts (resolved to a file URI)
    experiment: str = "fbta"


@dataclass
class FlowsCfg:
    """Prefect orchestration (flows/): how the dvc.yaml DAG is scheduled; read by no DVC stage."""

    per_slide: List[str] = field(default_factory=lambda: ["tile", "extract", "cluster"])  # stages fanned out per slide
    slide_concurrency: int = 2  # per-slide tasks at once: threads, or the temporary Dask LocalCluster's workers
    slides_per_task: int = 1  # >1: each task takes this many slides (amortises the stage's start-up on small slides)
    retries: int = 2  # retries of a per-slide task (slide reads are the flaky part)
    retry_delay_s: float = 5.0
    stage_retries: int = 0  # retries of a whole (non per-slide) stage
    task_runner: TaskRunner = TaskRunner.thread  # thread | dask (prefect-dask): where the per-slide tasks run
    dask_address: Optional[str] = None  # dask: a scheduler, e.g. tcp://10.0.0.5:8786; None: a LocalCluster on 127.0.0.1


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
    fbta: FBTACfg = field(default_factory=FBTACfg)
    infer: InferCfg = field(default_factory=InferCfg)
    seg: SegCfg = field(default_factory=SegCfg)
    register: RegisterCfg = field(default_factory=RegisterCfg)
    tune: TuneCfg = field(default_factory=TuneCfg)
    predict: PredictCfg = field(default_factory=PredictCfg)
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)
    heatmap: HeatmapCfg = field(default_factory=HeatmapCfg)
    qupath: QuPathCfg = field(default_factory=QuPathCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)
    flows: FlowsCfg = field(default_factory=FlowsCfg)
