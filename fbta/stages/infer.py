"""``fbta infer``: an FBTA model on the held-out slides, two ways → ⚑ ``classification.fbta`` / ``fbta_reextract``.

``fbta``: the deployed path — translator over every cached frozen feature of
a slide, then the EMA MIL head; no patch is read. ``fbta_reextract``
(``infer.reextract=true``): every patch re-read and re-encoded by the EMA
extractor TFE*, then the same head — the expensive path the translator stands
in for. Both are timed end to end on the same slides; the fragment
``reports/metrics/infer_fbta.json`` also carries the speed-up and how often
the two paths agree (the translator's fidelity).
"""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from fbta.config import ConfigError
from fbta.e2e.states import load_ema_extractor
from fbta.e2e.classifier import load_classifier
from fbta.e2e.reextract import reextract_slide, translate_slide
from fbta.device import fit_workers, resolve_device
from fbta.slides.cohort import CohortError, read_labels
from fbta.stages.common import out_dir
from fbta.stages.evaluate import held_out, report_variant, variant_files
from fbta.stages.milrun import check_method_and_arch, model_folder, variant


def run(cfg: DictConfig) -> int:
    check_method_and_arch(cfg)
    if cfg.train.method not in ("fbta", "e2e"):
        raise ConfigError("fbta infer compares the translator and re-extraction paths of an FBTA model: "
                          "set train.method=fbta (or e2e, the end-to-end bound, whose real score is "
                          "classification.e2e_reextract); a vanilla model is scored by `fbta evaluate`")
    folder = model_folder(cfg)
    device = resolve_device(cfg.train.device, "train.device")
    model = load_classifier(folder, device)
    if model.translator is None:
        raise ConfigError(f"{folder}: model has no translator; train it with train.method=fbta")
    part, items, classes = held_out(cfg, model.meta, folder)
    name = variant(cfg)

    translated = [translate_slide(model, it.path) for it in items]
    t_translate = sum(r.seconds for r in translated)
    probs_t = np.stack([r.probs for r in translated])
    n_patches = sum(r.patches for r in translated)
    report_variant(cfg, name, part, items, classes, probs_t, model.meta, fragment="infer",
                   extra={"seconds": round(t_translate, 4), "patches": n_patches, "path": "translator"})
    if not cfg.infer.reextract:
        _drop_stale(cfg, f"{name}_reextract")
        return 0

    entries = read_labels(cfg.data.labels, cfg.data.slides)
    missing = [it.slide_id for it in items if not entries[it.slide_id].path.exists()]
    if missing:
        raise CohortError(f"re-extraction needs the slide files; not found: {', '.join(missing[:5])} "
                          "(set data.slides, or infer.reextract=false)")
    tfe = load_ema_extractor(folder, model.meta, device)
    redone = []
    with tqdm(total=n_patches, unit="patch", desc="re-extract", disable=not cfg.run.progress,
              dynamic_ncols=True) as bar:
        for it in items:
            e = entries[it.slide_id]
            redone.append(reextract_slide(model, tfe, it.path, e.path, e.mpp, device, cfg.infer.batch_size,
                                          fit_workers(cfg.infer.num_workers, "infer.num_workers"), cfg.extract.amp, bar.update))
    t_reextract = sum(r.seconds for r in redone)
    probs_r = np.stack([r.probs for r in redone])
    same = float(np.mean(probs_r.argmax(1) == probs_t.argmax(1)))
    gap = float(np.abs(probs_r - probs_t).max(1).mean())
    speedup = t_reextract / max(t_translate, 1e-9)
    report_variant(cfg, f"{name}_reextract", part, items, classes, probs_r, model.meta, fragment="infer",
                   extra={"seconds": round(t_reextract, 4), "patches": n_patches, "path": "reextract",
                          "speedup_translator": round(speedup, 2), "agreement": round(same, 4),
                          "mean_abs_prob_gap": round(gap, 4)})
    print(f"infer: {n_patches} patches on {len(items)} slides — translator {t_translate:.2f} s, re-extraction "
          f"{t_reextract:.1f} s ({speedup:.0f}× slower); same prediction on {same:.0%} of slides, "
          f"mean |Δp| {gap:.3f}", flush=True)
    return 0


def _drop_stale(cfg: DictConfig, name: str) -> None:
    """A skipped re-extraction leaves no numbers from an earlier run (``fbta report`` rebuilds metrics.json)."""
    for path in (*variant_files(cfg, name).values(), out_dir(cfg, "reports", "metrics") / f"infer_{name}.json"):
        path.unlink(missing_ok=True)
