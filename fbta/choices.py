"""The settings with a fixed set of values, as ``StrEnum``s the schema (fbta/schema.py) types its fields with.

Why enums: OmegaConf refuses any other value when the config is loaded, naming
the key and the choices, so no stage checks them by hand; being ``str``
subclasses, they compare equal to, print as and serialise (JSON, YAML, MLflow
params, fingerprints) as their plain strings.
"""
from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """A fixed set of values: OmegaConf refuses anything else at load time, naming the key and the choices."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The choices as plain strings (what library code checks typed options against)."""
        return tuple(c.value for c in cls)


class SynthStyle(Choice):
    texture = "texture"
    drawn = "drawn"


class SynthDesign(Choice):
    detection = "detection"  # normal vs tumour slides: a tumour region on a share of the positives' tissue
    subtyping = "subtyping"  # two tumour subtypes: tumour-rich tissue in both classes, a subtle nuclear difference


class KMeansMethod(Choice):
    auto = "auto"
    torch = "torch"
    sklearn = "sklearn"
    elkan = "elkan"
    minibatch = "minibatch"


class TrainMethod(Choice):
    vanilla = "vanilla"
    fbta = "fbta"
    e2e = "e2e"  # the upper bound FBTA approximates: the extractor trained on whole bags, no translator


class EmaEvery(Choice):
    epoch = "epoch"
    step = "step"


class Sampling(Choice):
    kmeans = "kmeans"
    random = "random"
    all = "all"  # every patch of the slide (at most fbta.max_bag): the end-to-end bound's bag


class View(Choice):
    fb = "fb"
    eb = "eb"
    tb = "tb"


class TeacherLoss(Choice):
    dice = "dice"
    gmp_bce = "gmp_bce"


class KD(Choice):
    fusion = "fusion"
    blockwise = "blockwise"


class CEForm(Choice):
    authors = "authors"
    bce = "bce"


class StudentInit(Choice):
    backbone = "backbone"
    teacher = "teacher"


class Fusion(Choice):
    fixed = "fixed"
    learnable = "learnable"


class ExportLayout(Choice):
    trident = "trident"


class LinkMode(Choice):
    hardlink = "hardlink"
    symlink = "symlink"
    copy = "copy"


class HeatmapNormalize(Choice):
    percentile = "percentile"
    minmax = "minmax"


class TaskRunner(Choice):
    thread = "thread"
    dask = "dask"
