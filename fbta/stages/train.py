"""``fbta train``: a MIL head on frozen features → ``<data.out>/models/<method>_<arch>/``.

Writes ``best.pt`` (state dict, ``weights_only`` loadable) and ``meta.json``
as soon as an epoch improves, then ``history.csv``, ``curves.png`` and the
resolved ``config.yaml``; the curves also go to
``reports/plots/train_<variant>.csv`` for ``dvc plots``. One MLflow run per
execution with per-epoch metrics.

``train.method=vanilla``: the head on cached frozen features.
``train.method=fbta``: end-to-end FBTA (fbta/e2e/); the folder also gets
``translator.pt`` and ``extractor.pt`` (TFE* of the selected epoch; ``extractor_last.pt``:
of the last), and ``best.pt`` is the EMA head.
``train.method=e2e``: the end-to-end bound (fbta/e2e/full.py) in FBTA's extractor
configuration, whole bags, no translator (an identity ``translator.pt``).

Both methods share the EMA (``train.ema_*`` for vanilla, ``fbta.ema_*`` for FBTA:
same update, period and warm-up) and the selection rule (``train.min_epochs``,
``train.patience``); a comparison sets the two EMA groups equal. Every key of an
epoch's ``extra`` (FBTA: loss terms per view, ``gap_ratio``, ``tfe_drift``,
``tumour_share``, ``ema_decay``, the step-time split) becomes a history.csv
column and an MLflow metric.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from fbta.config import ConfigError, save_config
from fbta.io.metrics import write_csv
from fbta.mil.checkpoint import META, save_checkpoint
from fbta.mil.data import BagDataset, Cohort, feature_stats
from fbta.mil.plots import save_curves
from fbta.mil.registry import MILHead, create_mil
from fbta.mil.splits import Split
from fbta.device import fit_workers, resolve_device
from fbta.mil.train import FitOptions, fit
from fbta.training.loop import Epoch, seed_everything
from fbta.training.resume import RESUME, Resumable
from fbta.slides.cohort import CohortError
from fbta.stages.common import features_dir, out_dir
from fbta.stages.milrun import check_method_and_arch, load_cohort, model_folder, variant
from fbta.slide_status import StageReport
from fbta.tracking import stage_run


def _describe(split: Split, cohort: Cohort) -> str:
    parts = [f"{p} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})"
             for p, c in cohort.counts().items()]
    return f"slides: {' · '.join(parts)}; split from {split.source}"


def _check_trainable(cohort: Cohort, labels: str) -> None:
    """Refuse, before anything is written, a cohort no classifier can be trained or selected on."""
    if len(cohort.classes) < 2:
        found = ", ".join(f"'{c}'" for c in cohort.classes) or "none"
        raise CohortError(f"{labels}: classification needs at least 2 classes; the label column has {found} "
                          f"({sum(len(p) for p in cohort.parts.values())} slides with features)")
    counts = cohort.counts()
    absent = [c for c, n in counts["train"].items() if n == 0]
    if absent:
        raise CohortError(f"no training slide with features for class(es) {', '.join(absent)}; "
                          "check labels.csv's split column and the feature files")
    if not cohort.parts["val"]:
        raise CohortError("no validation slide with features: early stopping needs a val split")


def _head(cfg: DictConfig, in_dim: int, n_classes: int) -> tuple[MILHead, dict]:
    kwargs = {"dropout": cfg.mil.dropout, **OmegaConf.to_container(cfg.mil.kwargs, resolve=True)}
    try:
        return create_mil(cfg.mil.arch, in_dim, n_classes, **kwargs), kwargs
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"mil.* does not fit mil.arch={cfg.mil.arch}: {exc}") from None


EpochHook = Callable[[int, dict], None]


def _check_train_config(cfg: DictConfig) -> None:
    """The train.* values with a fixed range or set of choices; one line per mistake (exit 2)."""
    t = cfg.train
    if not 0.0 <= t.ema_alpha < 1.0:
        raise ConfigError(f"train.ema_alpha={t.ema_alpha} must be in [0, 1)")
    if t.min_epochs < 0:
        raise ConfigError(f"train.min_epochs={t.min_epochs} must be ≥ 0")


def run(cfg: DictConfig, on_epoch: Optional[EpochHook] = None) -> int:
    """Train and save; ``on_epoch(epoch, metrics)`` after every epoch (tuning: report / prune by raising)."""
    check_method_and_arch(cfg)
    _check_train_config(cfg)
    fbta = cfg.train.method in ("fbta", "e2e")  # both train FBTA's extractor (e2e: the end-to-end bound)
    if fbta:
        from fbta.stages.fbta_setup import check_fbta_config

        check_fbta_config(cfg)
    t = cfg.train
    split, cohort = load_cohort(cfg)
    report = StageReport("train")
    for sid, why in cohort.missing.items():
        report.failed(sid, why)
    _check_trainable(cohort, cfg.data.labels)
    print(f"train: {cfg.mil.arch} ({t.method}) on {features_dir(cfg)}; {_describe(split, cohort)}", flush=True)

    folder = model_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)  # the folder is incomplete until this run's first best epoch
    device = resolve_device(t.device, "train.device")
    seed_everything(t.seed, t.deterministic)
    head, mil_kwargs = _head(cfg, cohort.in_dim, len(cohort.classes))
    if t.standardize:
        mean, std = feature_stats(cohort.parts["train"])
        head.set_input_stats(torch.from_numpy(mean), torch.from_numpy(std))
    val_ds = BagDataset(cohort.parts["val"], preload=t.preload)
    name = variant(cfg)
    meta = {
        "method": t.method, "variant": name, "arch": cfg.mil.arch, "mil_kwargs": mil_kwargs,
        "in_dim": cohort.in_dim, "n_classes": len(cohort.classes), "classes": cohort.classes,
        "positive_class": cohort.classes[1] if len(cohort.classes) == 2 else None,
        "weights": "ema" if t.ema or fbta else "raw", "standardize": bool(t.standardize),
        "ema_alpha": cfg.fbta.ema_alpha if fbta else (t.ema_alpha if t.ema else None),
        "ema_every": (cfg.fbta.ema_every if fbta else t.ema_every) if fbta or t.ema else None,
        "ema_warmup": bool(cfg.fbta.ema_warmup if fbta else t.ema_warmup) if fbta or t.ema else None,
        "min_epochs": int(t.min_epochs),
        "features": str(features_dir(cfg)), "split_source": split.source,
        "split": {p: [it.slide_id for it in items] for p, items in cohort.parts.items()},
        "seed": t.seed, "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
    }
    # tuning trials start afresh: a pruner must see every epoch it judges
    resume = Resumable(folder / RESUME, _fingerprint(cfg, cohort)) if t.resume and on_epoch is None else None
    if fbta:
        fit_model, save_states = _fbta_fit(cfg, head, cohort, val_ds, device, meta, resume)
    else:
        fit_model, save_states = _vanilla_fit(cfg, head, cohort, val_ds, device, resume), None
    tags = {"fbta.method": t.method, "fbta.arch": cfg.mil.arch, "fbta.variant": name, "fbta.data_out": cfg.data.out}
    started = time.time()
    with stage_run(cfg, "train", f"train-{name}-{cfg.mil.arch}", tags) as mlrun:
        meta["mlflow_run_id"] = mlrun.run_id

        def save(states: dict, extra: dict) -> None:
            if save_states is not None:  # FBTA: translator + TFE* first, then the EMA head and meta.json
                save_states(folder, states)
                states = states["mil"]
            save_checkpoint(folder, states, {**meta, **extra})

        def after_epoch(ep: Epoch, best_state: dict | None) -> None:
            row = mlrun.log_epoch(ep)
            if best_state is not None:
                save(best_state, {**_best(ep), "complete": False})
            if on_epoch is not None:
                on_epoch(ep.epoch, row)

        result = fit_model(after_epoch)
        rows = [e.as_row() for e in result.history]
        if result.resumed_from:  # this MLflow run gets the whole curve; the killed run keeps its part
            mlrun.set_tags({"fbta.resumed_from_epoch": str(result.resumed_from)})
            for ep in result.history[:result.resumed_from]:
                mlrun.log_epoch(ep)
        final = {**meta, **_best(result.best), "epochs_run": len(rows), "stopped_early": result.stopped_early,
                 "seconds": round(time.time() - started, 2), "complete": True,
                 **{k: v for k, v in result.extra.items() if k.startswith("extractor_steps")}}
        save(result.best_state, {k: v for k, v in final.items() if k not in meta})
        write_csv(folder / "history.csv", rows)
        write_csv(out_dir(cfg, "reports", "plots") / f"train_{name}.csv", rows)
        save_curves(rows, folder / "curves.png", f"{name} {cfg.mil.arch}: best epoch {result.best_epoch}")
        save_config(cfg, folder / "config.yaml")
        mlrun.log_metrics({"best_epoch": result.best_epoch, "best_val_auc": result.best.val.auc,
                           "best_val_loss": result.best.val.loss, "epochs_run": len(rows)})
        for f in ("best.pt", META, "history.csv", "curves.png", "config.yaml", "translator.pt"):
            mlrun.log_artifact(folder / f, "model")
    if resume is not None:
        resume.finish()

    for part, items in cohort.parts.items():
        for it in items:
            report.done(it.slide_id, 0.0, split=part, label=cohort.classes[it.label], patches=it.n)
    report.write(out_dir(cfg, "reports", "status") / "train.json")
    b = result.best
    stop = f"stopped early after {len(rows)} epochs" if result.stopped_early else f"{len(rows)} epochs"
    per_epoch = sum(e.seconds for e in result.history) / len(result.history)
    print(f"train: best epoch {result.best_epoch} (val AUC {b.val.auc:.3f}, acc {b.val.acc:.3f}, "
          f"loss {b.val.loss:.3f}); {stop}, {per_epoch:.2f} s/epoch; model → {folder}", flush=True)
    note = selection_note(len(cohort.parts["val"]))
    if note:
        print(f"train: {note}", flush=True)
    if cohort.missing:
        print(report.summary(), flush=True)
    return report.exit_code(cfg.run.strict)


SMALL_VAL = 20  # below this, one slide moves a balanced split's val AUC by > 0.1 (2/n)


def selection_note(n_val: int) -> str:
    """A hint when the validation split is too small to select an epoch on."""
    if n_val >= SMALL_VAL:
        return ""
    return (f"note: {n_val} validation slide(s) — one slide moves val AUC by up to {2 / max(n_val, 1):.2f}, so the "
            "best epoch is close to a coin toss; give the val split more slides (split column or "
            "train.val_fraction), or compare methods with benchmarks/fbta_protocol.py")


def _best(ep: Epoch) -> dict[str, object]:
    return {"epoch": ep.epoch, **{k: round(v, 6) for k, v in ep.val.as_dict("val_").items()}}


def _fingerprint(cfg: DictConfig, cohort: Cohort) -> str:
    """What a resume.pt must match: every setting that shapes training, and the feature files it read."""
    settings = {k: OmegaConf.to_container(cfg[k], resolve=True)
                for k in ("data", "extract", "cluster", "mil", "train", "fbta") if k in cfg}
    files = [(it.slide_id, str(it.path), it.path.stat().st_size, it.path.stat().st_mtime_ns)
             for part in cohort.parts.values() for it in part]
    blob = json.dumps({"settings": settings, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _vanilla_fit(cfg: DictConfig, head: MILHead, cohort: Cohort, val_ds: BagDataset, device: torch.device,
                 resume: Optional[Resumable]):
    t = cfg.train
    train_ds = BagDataset(cohort.parts["train"], preload=t.preload)
    opts = FitOptions(epochs=t.epochs, patience=t.patience, lr=t.lr, weight_decay=t.weight_decay,
                      ema_alpha=t.ema_alpha if t.ema else None, ema_every=t.ema_every, ema_warmup=t.ema_warmup,
                      min_epochs=t.min_epochs, balanced=t.balanced, seed=t.seed,
                      num_workers=0 if t.preload else fit_workers(t.num_workers, "train.num_workers"), progress=cfg.run.progress)
    return lambda hook: fit(head, train_ds, val_ds, opts, device, hook, resume)


def _fbta_fit(cfg: DictConfig, head: MILHead, cohort: Cohort, val_ds: BagDataset, device: torch.device,
              meta: dict, resume: Optional[Resumable]):
    """FBTA's models and data; adds the translator/extractor description to ``meta`` (in place)."""
    from fbta.e2e.states import save_fbta_states, save_last_extractor
    from fbta.stages.fbta_setup import (build_models, build_tfe, fbta_meta, options, probe_patches, pseudo_bags,
                                        val_slides)
    from fbta.e2e.trainer import fit_fbta
    from fbta.e2e.accumulate import extractor_updates
    from fbta.io.h5 import feature_file_attrs

    e2e = cfg.train.method == "e2e"
    tfe, units = build_tfe(cfg, cohort.in_dim, device, feature_file_attrs(cohort.parts["train"][0].path)[0])
    models = build_models(cfg, head, tfe, identity=e2e)
    train_ds = pseudo_bags(cfg, cohort.parts["train"], whole=e2e)
    meta.update(fbta_meta(cfg, models, units))
    opts = options(cfg, e2e=e2e)
    probe = probe_patches(cfg, cohort.parts["val"])
    n_train = sum(p.numel() for p in tfe.parameters() if p.requires_grad)
    trainable = f"trainable: {len(units)} units, {n_train:,} parameters" if units else "frozen"
    if e2e:
        print(f"train: end-to-end bound, whole bags (≤ {cfg.fbta.max_bag} patches), view eb; TFE {tfe.name} "
              f"{trainable}; validation by re-extracting {len(cohort.parts['val'])} slides", flush=True)
    else:
        print(f"train: FBTA C={cfg.cluster.n_clusters} M={cfg.fbta.m} K={cfg.fbta.k} sampling={cfg.fbta.sampling} "
              f"views={'+'.join(cfg.fbta.views)}; TFE {tfe.name} {trainable}; "
              f"diagnostics on {len(probe) if probe is not None else 0} validation patches", flush=True)
    steps_per_epoch = len(cohort.parts["train"]) * opts.bags_per_slide
    meta["extractor"]["steps_per_epoch"] = steps_per_epoch

    def fit_model(hook):
        if e2e:
            from fbta.e2e.full import fit_e2e

            result = fit_e2e(models, train_ds, val_ds, val_slides(cfg, cohort.parts["val"]), cohort.classes, opts,
                             device, hook, resume, probe)
        else:
            result = fit_fbta(models, train_ds, val_ds, cohort.classes, opts, device, hook, resume, probe)
        # TFE* after the last epoch beside the selected one's: did the extractor learn more than was deployed?
        save_last_extractor(model_folder(cfg), models.tfe_ema)
        # steps the *extractor* received: none when it is frozen (fbta.trainable_extractor=false), however many
        # the head and translator took
        per_epoch = extractor_updates(steps_per_epoch, cfg.fbta.extractor_every) if units else 0
        result.extra.update(extractor_steps=per_epoch * len(result.history),
                            extractor_steps_at_best=per_epoch * (result.best_epoch + 1))
        return result
    return fit_model, save_fbta_states
