"""The protocol's control arms and extractor probes (issue #29): ``oracle``, ``e2e``, and what each extractor learned.

- ``arch:e2e`` — the end-to-end bound (``fbta train train.method=e2e``, scored
  by ``fbta infer``: every test patch re-extracted by TFE*). Its test score is
  ``classification.e2e_reextract``; ``e2e_on_frozen`` (its head on the cached
  frozen features) is kept as a diagnostic.
- ``arch:oracle`` — FBTA's extractor configuration trained on **patch** targets
  from the masks (benchmarks/extractor_controls.py) for as many steps of as
  many patches as the unit's FBTA arm plans (epochs × training slides ×
  ``fbta.bags_per_slide`` steps of C·M), every slide of the split re-extracted
  with it, then the same MIL head trained and evaluated on those features with
  the same budget and selection as ``arch:vanilla``.
- **Probes** (``--probe-patches N``): per split, up to N labelled patches per
  slide (tumour vs normal on a detection cohort, subtype A vs B tumour on a
  subtyping one); a logistic-regression probe fitted on the training slides'
  patches, scored on the test slides'. Reported for the frozen features and,
  per unit, for the extractor the arm **selected** (``extractor.pt``) and the
  one it had after its **last** epoch (``extractor_last.pt``), with the number
  of extractor steps each received. Each also ``*_heldout``: the same probe
  fitted and scored on the test slides alone (slide-grouped CV), blind to what
  an extractor memorised of the training slides it was trained on.
- **Recovered share** = mean(FBTA − vanilla) / mean(e2e − vanilla) over the
  matched units, with a bootstrap interval (resampling units).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from extractor_controls import (ExtractorConfig, PatchSet, load_patches, patch_targets, patch_probes, reextract,
                                train_oracle, tumour_share)

from fbta.config import load_config
from fbta.e2e.pseudobags import patch_attrs
from fbta.e2e.states import load_ema_extractor
from fbta.io.h5 import read_features

CONTROL_METHODS = ("e2e", "oracle")


class ProbeSets:
    """Per split: the (train slides, test slides) labelled patch sets, built once and shared by its units."""

    def __init__(self, features: Path, slides: Path, masks: Optional[Path], labels: Mapping[str, str],
                 per_slide: int, seed: int = 0) -> None:
        self.features, self.slides, self.masks, self.per_slide, self.seed = features, slides, masks, per_slide, seed
        self.classes = sorted(set(labels.values()))
        self.labels = {s: self.classes.index(c) for s, c in labels.items()}
        self._targets: Optional[dict[str, np.ndarray]] = None
        self._sets: dict[str, tuple[PatchSet, PatchSet]] = {}
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()

    def slide(self, sid: str) -> tuple[str, Path, Path, None]:
        if sid not in self._paths:  # the slide folder is listed once per slide, not once per patch set
            self._paths[sid] = next(iter(sorted(self.slides.glob(f"{sid}.*"))), self.slides / f"{sid}.svs")
        return sid, self._paths[sid], self.features / "h5_files" / f"{sid}.h5", None

    def targets(self) -> dict[str, np.ndarray]:
        if self._targets is None:
            shares, n = {}, {}
            for sid in self.labels:
                h5 = self.slide(sid)[2]
                _, coords, attrs = read_features(h5)
                shares[sid] = tumour_share(self.masks, sid, coords, patch_attrs(h5, attrs))
                n[sid] = len(coords)
            self._targets = patch_targets(shares, self.labels, n)
        return self._targets

    def of(self, split: str, part: Mapping[str, str], per_slide: Optional[int] = None) -> tuple[PatchSet, PatchSet]:
        """(training slides' patches, test slides' patches) of one split."""
        key = f"{split}/{per_slide}"
        with self._lock:
            if key not in self._sets:
                rng = np.random.default_rng(self.seed)
                sets = [load_patches([self.slide(s) for s, p in sorted(part.items()) if p == which],
                                     self.targets(), per_slide if per_slide is not None else self.per_slide, rng)
                        for which in ("train", "test")]
                self._sets[key] = (sets[0], sets[1])
            return self._sets[key]


def planned_steps(cfg: Any, n_train: int) -> int:
    """The extractor steps FBTA plans under ``cfg``: epochs × training slides × bags per slide."""
    epochs = cfg.fbta.epochs if cfg.fbta.epochs is not None else cfg.train.epochs
    return int(epochs) * int(n_train) * int(cfg.fbta.bags_per_slide)


def extractor_probes(folder: Path, sets: tuple[PatchSet, PatchSet]) -> dict[str, Any]:
    """Probe AUC of the selected and the last TFE* of a model folder, with their step counts."""
    meta = json.loads((folder / "meta.json").read_text())
    out: dict[str, Any] = {"steps_selected": meta.get("extractor_steps_at_best"), "steps_last": meta.get("extractor_steps")}
    for key, last in (("selected", False), ("last", True)):
        if last and not (folder / "extractor_last.pt").exists():
            continue
        ext = load_ema_extractor(folder, meta, torch.device("cpu"), last=last)
        out[key], out[f"{key}_heldout"] = patch_probes(ext, *sets)
    return out


def frozen_probes(sets: tuple[PatchSet, PatchSet]) -> dict[str, Optional[float]]:
    """Both probes of the cached frozen features: the yardstick every extractor's probes are read against."""
    fitted, heldout = patch_probes(None, *sets)
    return {"frozen": fitted, "frozen_heldout": heldout}


def run_oracle(params: Path, overrides: Sequence[str], part: Mapping[str, str], split: str, seed: int,
               probes: ProbeSets, out: Path, train_head: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The oracle unit: train FBTA's extractor configuration on patch targets, probe it, re-extract the split's
    slides, and let ``train_head(features_folder)`` train + evaluate the MIL head on them (the vanilla budget)."""
    cfg = load_config(params, list(overrides))
    n_train = sum(p == "train" for p in part.values())
    xcfg = ExtractorConfig.of(cfg, planned_steps(cfg, n_train))
    train, test = probes.of(split, part, per_slide=0)  # every labelled training patch the oracle may learn from
    ext, info = train_oracle(xcfg, train, seed)
    sets = probes.of(split, part)
    result: dict[str, Any] = {"oracle": {**xcfg.describe(), **{k: v for k, v in info.items() if k != "curve"},
                                         "train_patches": len(train)},
                              "probe": frozen_probes(sets)}
    p_final, h_final = patch_probes(ext, *sets)  # the oracle selects no epoch: its final extractor is both
    result["probe"].update(selected=p_final, last=p_final, selected_heldout=h_final, last_heldout=h_final,
                           steps_selected=xcfg.steps, steps_last=xcfg.steps)
    folder = reextract(ext, [probes.slide(s) for s in sorted(part)], out / "oracle_features")
    result.update(train_head(folder))
    return result


def recovered_share(units: Mapping[str, Mapping[str, Any]], arch: str, n_boot: int = 10_000,
                    seed: int = 0) -> Optional[dict[str, Any]]:
    """mean(FBTA − vanilla) / mean(e2e − vanilla) over (split, seed) units that have all three, with a
    percentile-bootstrap interval over those units (None when no unit has all three)."""
    def auc(arm: str) -> dict[tuple[str, int], float]:
        return {(u["split"], u["seed"]): float(u["test"][u["method"]]["auc"]) for u in units.values()
                if u["arm"] == arm and u["test"].get(u["method"], {}).get("auc") is not None}

    v, f, e = auc(f"{arch}:vanilla"), auc(f"{arch}:fbta"), auc(f"{arch}:e2e")
    keys = sorted(set(v) & set(f) & set(e))
    if not keys:
        return None
    gain = np.array([f[k] - v[k] for k in keys])
    bound = np.array([e[k] - v[k] for k in keys])

    def share(ix: np.ndarray) -> float:  # no end-to-end gain (bound ≤ 0): nothing to recover, no share
        b = bound[ix].mean()
        return float(gain[ix].mean() / b) if b > 1e-9 else float("nan")

    rng = np.random.default_rng(seed)
    boot = np.array([share(rng.integers(0, len(keys), len(keys))) for _ in range(n_boot)])
    boot = boot[np.isfinite(boot)]
    return {"arch": arch, "n": len(keys), "fbta_minus_vanilla": round(float(gain.mean()), 4),
            "e2e_minus_vanilla": round(float(bound.mean()), 4),
            "share": None if not np.isfinite(share(np.arange(len(keys)))) else round(share(np.arange(len(keys))), 3),
            "lo": round(float(np.percentile(boot, 2.5)), 3) if len(boot) else None,
            "hi": round(float(np.percentile(boot, 97.5)), 3) if len(boot) else None}


def cost_ratio(units: Mapping[str, Mapping[str, Any]], arch: str, n_project: int = 10_000) -> Optional[dict[str, Any]]:
    """Training seconds per epoch of the end-to-end bound over FBTA's, measured at this cohort's bag size and
    projected to ``n_project`` patches a slide (the bound's cost grows with N, FBTA's step with C·M only).

    From the last epoch of each matched unit: the bound's seconds per patch = its training seconds /
    (steps × mean bag); FBTA's seconds per step = its training seconds / steps."""
    def per(arm: str) -> dict[tuple[str, int], Mapping[str, Any]]:
        return {(u["split"], u["seed"]): u for u in units.values() if u["arm"] == arm
                and u.get("diagnostics", {}).get("train_seconds") and u.get("extractor_steps") and u.get("epochs_run")}

    f, e = per(f"{arch}:fbta"), per(f"{arch}:e2e")
    keys = sorted(set(f) & set(e))
    if not keys:
        return None
    steps = lambda u: u["extractor_steps"] / u["epochs_run"]  # noqa: E731 (steps per epoch)
    measured = [e[k]["diagnostics"]["train_seconds"] / f[k]["diagnostics"]["train_seconds"] for k in keys]
    per_patch = [e[k]["diagnostics"]["train_seconds"] / (steps(e[k]) * e[k]["diagnostics"]["n_subset"]) for k in keys]
    per_step = [f[k]["diagnostics"]["train_seconds"] / steps(f[k]) for k in keys]
    bag = float(np.mean([e[k]["diagnostics"]["n_subset"] for k in keys]))
    return {"arch": arch, "n": len(keys), "mean_bag": round(bag, 1),
            "measured_ratio": round(float(np.mean(measured)), 2),
            "e2e_seconds_per_patch": round(float(np.mean(per_patch)), 4),
            "fbta_seconds_per_step": round(float(np.mean(per_step)), 4), "projected_n": n_project,
            "projected_ratio": round(float(np.mean(per_patch)) * n_project / float(np.mean(per_step)), 1)}
