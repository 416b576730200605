"""The numbers of benchmarks/fbta_protocol.py, pure functions of unit results and features.

- statistics: paired percentile bootstrap, mean ± sd;
- baselines: constant predictions and the pooled-feature logistic-regression probe;
- unit history: a unit's last-epoch diagnostics and seconds per epoch from its history.csv;
- report: per-arm summaries, the paired A − B table, the markdown tables and headline, JSON cleaning.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

import common  # noqa: F401  (project root first on sys.path: `fbta` is the package, not benchmarks/fbta.py)

PROBE_GRID = (0.01, 0.1, 1.0, 10.0)
METRICS = ("auc", "acc", "f1")
DIAGNOSTICS = ("gap_ratio", "tfe_drift", "l_dist", "l_cons", "l_cls", "l_cls_fb", "l_cls_eb", "l_cls_tb",
               "tumour_share", "n_subset", "train_seconds")
DIAG_PREFIXES = ("l_cls_", "diag_", "gap_", "tfe_", "tumour_")


# -- statistics -------------------------------------------------------------------------------


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Mean of paired differences and its percentile-bootstrap interval (units resampled with replacement).

    NaN differences (an undefined AUC) are dropped; ``n`` is how many were used.
    """
    d = np.asarray([x for x in diffs if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(d) == 0:
        return {"n": 0, "mean": math.nan, "lo": math.nan, "hi": math.nan}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    # a constant sample has every resampled mean equal to it (up to float rounding)
    lo, hi = min(float(lo), float(d.mean())), max(float(hi), float(d.mean()))
    return {"n": int(len(d)), "mean": float(d.mean()), "lo": lo, "hi": hi}


def mean_sd(xs: Iterable[Optional[float]]) -> tuple[float, float, int]:
    v = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))


# -- baselines --------------------------------------------------------------------------------


def pooled_features(files: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """slide → mean over its instances of the frozen features."""
    from fbta.io.h5 import read_features

    return {sid: read_features(p)[0].mean(0) for sid, p in files.items()}


def _scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from fbta.mil.metrics import score

    s = score(y, probs)
    return {"auc": s.auc, "acc": s.acc, "f1": s.f1, "n": s.n}


def pooled_probe(x: Mapping[str, np.ndarray], part: Mapping[str, str], labels: Mapping[str, str],
                 classes: Sequence[str], c: Optional[float] = None) -> dict[str, float]:
    """Standardised logistic regression on pooled features of the train part, C fixed or chosen by val AUC
    (ties → the C nearest 1), scored on the test part with the project's metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def xy(p: str) -> tuple[np.ndarray, np.ndarray]:
        ids = sorted(s for s, q in part.items() if q == p)
        return np.stack([x[s] for s in ids]), np.array([classes.index(labels[s]) for s in ids])

    (xtr, ytr), (xva, yva), (xte, yte) = xy("train"), xy("val"), xy("test")

    def fit(cv: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=cv, max_iter=5000)).fit(xtr, ytr)

    val_auc = {}
    if c is None:
        for cv in PROBE_GRID:
            val_auc[cv] = _scores(yva, _full_probs(fit(cv), xva, len(classes)))["auc"]
        finite = {k: v for k, v in val_auc.items() if not math.isnan(v)}
        c = max(finite, key=lambda k: (round(finite[k], 9), -abs(math.log10(k)))) if finite else 1.0
    out = _scores(yte, _full_probs(fit(c), xte, len(classes)))
    return {**out, "C": c, "val_auc": val_auc.get(c, math.nan)}


def _full_probs(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    p = np.zeros((len(x), n_classes))
    p[:, model.classes_] = model.predict_proba(x)
    return p


def constant_baselines(part: Mapping[str, str], labels: Mapping[str, str], classes: Sequence[str]) -> dict:
    """``all-<class>``: every test slide predicted as that class (AUC 0.5, accuracy = its share)."""
    ids = sorted(s for s, q in part.items() if q == "test")
    y = np.array([classes.index(labels[s]) for s in ids])
    out = {}
    for i, c in enumerate(classes):
        probs = np.full((len(ids), len(classes)), 0.0)
        probs[:, i] = 1.0
        out[f"all-{c}"] = _scores(y, probs)
    return out


# -- unit history -----------------------------------------------------------------------------


def history_diagnostics(path: Path) -> dict[str, float]:
    """The last epoch's diagnostic columns of a history.csv ({} when absent)."""
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    if not rows:
        return {}
    out = {}
    for k, v in rows[-1].items():
        if k in DIAGNOSTICS or k.startswith(DIAG_PREFIXES):
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                pass
    return out


def epoch_seconds(path: Path) -> Optional[float]:
    if not path.exists():
        return None
    secs = [float(r["seconds"]) for r in csv.DictReader(path.open()) if (r.get("seconds") or "").strip()]
    return float(np.mean(secs)) if secs else None


# -- report -----------------------------------------------------------------------------------


def unit_key(arm: str, split: str, seed: int) -> str:
    return f"{arm}|{split}|seed{seed}"


def _main_metric(u: Mapping[str, Any], m: str) -> Optional[float]:
    v = u["test"].get(u["method"], {}).get(m)
    return None if v is None else float(v)


def summarise(units: Mapping[str, Mapping[str, Any]], arms: Sequence[str], baselines: Mapping[str, Mapping]) -> dict:
    """Per arm (and baseline): mean, sd, n over its units of every metric."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        us = [u for u in units.values() if u["arm"] == arm]
        if not us:
            continue
        row: dict[str, Any] = {"units": len(us)}
        for m in METRICS:
            row[m] = mean_sd(_main_metric(u, m) for u in us)
        re_ = [u["test"].get(f"{u['method']}_reextract", {}).get("auc") for u in us]
        if any(v is not None for v in re_):
            row["reextract_auc"] = mean_sd(re_)
        for k in ("val_auc", "best_epoch", "epochs_run", "seconds_per_epoch", "wall_seconds", "extractor_steps"):
            row[k] = mean_sd(u.get(k) for u in us)
        probes = sorted({k for u in us for k in u.get("probe", {})})
        if probes:  # the held-out patch probe of the frozen features and of this arm's extractors
            row["probe"] = {k: mean_sd(u.get("probe", {}).get(k) for u in us) for k in probes}
        diag = sorted({k for u in us for k in u.get("diagnostics", {})})
        row["diagnostics"] = {k: mean_sd(u["diagnostics"].get(k) for u in us) for k in diag}
        out[arm] = row
    names = sorted({b for per in baselines.values() for b in per})
    for b in names:
        vals = [per[b] for per in baselines.values() if b in per]
        out[f"[{b}]"] = {"units": len(vals), **{m: mean_sd(v[m] for v in vals) for m in METRICS}}
    return out


def paired_table(units: Mapping[str, Mapping[str, Any]], pairs: Sequence[tuple[str, str]],
                 baselines: Mapping[str, Mapping], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per comparison A − B: units matched on (split, seed); B may be a baseline ``[probe]`` (matched on split)."""
    rows = []
    for a, b in pairs:
        ua = {(u["split"], u["seed"]): u for u in units.values() if u["arm"] == a}
        row: dict[str, Any] = {"a": a, "b": b}
        matched = []
        for (split, seed), u in sorted(ua.items()):
            if b.startswith("["):
                ref = baselines.get(split, {}).get(b.strip("[]"))
                if ref is not None:
                    matched.append((u, {m: ref[m] for m in METRICS}))
            else:
                v = next((w for w in units.values() if w["arm"] == b and w["split"] == split and w["seed"] == seed),
                         None)
                if v is not None:
                    matched.append((u, {m: _main_metric(v, m) for m in METRICS}))
        if not matched:
            continue
        for m in METRICS:
            diffs = [_nan(_main_metric(u, m)) - _nan(r[m]) for u, r in matched]
            row[m] = paired_bootstrap(diffs, n_boot, seed)
            if m == "auc":
                d = [x for x in diffs if not math.isnan(x)]
                row["auc_wins"] = [sum(x > 0 for x in d), sum(x == 0 for x in d), sum(x < 0 for x in d)]
        rows.append(row)
    return rows


def _nan(x: Optional[float]) -> float:
    return math.nan if x is None else float(x)


def _cell(t: Sequence[float], digits: int = 3) -> str:
    mean, sd, n = t
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _delta(d: Mapping[str, float]) -> str:
    if d["n"] == 0:
        return "–"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def markdown(summary: Mapping[str, Mapping[str, Any]], paired: Sequence[Mapping[str, Any]], title: str,
             shares: Sequence[Mapping[str, Any]] = (), costs: Sequence[Mapping[str, Any]] = ()) -> str:
    lines = [f"### {title}", "", "| arm | units | test AUC | test ACC | test F1 | re-extract AUC | val AUC | "
             "best epoch | epochs | s/epoch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, r in summary.items():
        g = lambda k, digits=3: _cell(r[k], digits) if k in r else ""  # noqa: E731
        lines.append(f"| {arm} | {r['units']} | {g('auc')} | {g('acc')} | {g('f1')} | {g('reextract_auc')} | "
                     f"{g('val_auc')} | {g('best_epoch', 1)} | {g('epochs_run', 1)} | {g('seconds_per_epoch', 2)} |")
    lines += ["", "Paired differences A − B (same split and seed), mean [bootstrap 95 % interval]:", "",
              "| A − B | units | Δ AUC | Δ ACC | Δ F1 | AUC wins/ties/losses |", "|---|---|---|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['a']} − {p['b']} | {p['auc']['n']} | {_delta(p['auc'])} | {_delta(p['acc'])} | "
                     f"{_delta(p['f1'])} | {'/'.join(map(str, p['auc_wins']))} |")
    if shares:
        lines += ["", "FBTA's recovered share of the end-to-end gain, mean(FBTA − vanilla) / mean(e2e − vanilla) "
                  "[bootstrap 95 % interval over units]:", "", "| head | units | FBTA − vanilla | e2e − vanilla | share |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s['arch']} | {s['n']} | {s['fbta_minus_vanilla']:+.3f} | {s['e2e_minus_vanilla']:+.3f} | "
                  + (f"{s['share']} [{s['lo']}, {s['hi']}] |" if s["share"] is not None
                     else "– (the bound does not beat vanilla: nothing to recover) |") for s in shares]
    if costs:
        lines += ["", "Training time per epoch, end-to-end bound / FBTA (last epoch of matched units; the bound's cost "
                  "grows with the bag, FBTA's step with C·M only):", "",
                  "| head | units | mean bag (patches) | measured ratio | bound s/patch | FBTA s/step | projected ratio |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['arch']} | {c['n']} | {c['mean_bag']} | {c['measured_ratio']}× | {c['e2e_seconds_per_patch']} | "
                  f"{c['fbta_seconds_per_step']} | {c['projected_ratio']}× at N = {c['projected_n']:,} |" for c in costs]
    probe_arms = {a: r["probe"] for a, r in summary.items() if r.get("probe")}
    if probe_arms:
        heldout = any("frozen_heldout" in d for d in probe_arms.values())
        cols = [("frozen", "frozen", 3), ("selected", "selected", 3), ("last", "last", 3),
                ("steps_selected", "steps selected", 0), ("steps_last", "steps last", 0)]
        if heldout:
            cols += [("frozen_heldout", "held-out-only: frozen", 3), ("selected_heldout", "selected", 3),
                     ("last_heldout", "last", 3)]
        lines += ["", "Held-out patch probe AUC (frozen features; the arm's selected and last extractor) and the "
                  "extractor steps received (selected / last)"
                  + ("; held-out-only: fitted and scored on the test slides alone (slide-grouped CV)" if heldout else "")
                  + ":", "", "| arm | " + " | ".join(label for _, label, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for a, d in probe_arms.items():
            lines.append(f"| {a} | " + " | ".join(_cell(d[k], digits) if k in d else "" for k, _, digits in cols) + " |")
    diag_arms = {a: r["diagnostics"] for a, r in summary.items() if r.get("diagnostics")}
    if diag_arms:
        cols = sorted({k for d in diag_arms.values() for k in d})
        lines += ["", "Last-epoch diagnostics (history.csv), mean ± sd over units:", "",
                  "| arm | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for a, d in diag_arms.items():
            lines.append(f"| {a} | " + " | ".join(_cell(d[c]) if c in d else "" for c in cols) + " |")
    return "\n".join(lines)


def headline(summary: Mapping[str, Mapping[str, Any]], paired: Sequence[Mapping[str, Any]], title: str) -> str:
    arms = "; ".join(f"{a} AUC {r['auc'][0]:.2f}" + (f"±{r['auc'][1]:.2f}" if r["auc"][2] > 1 else " (n = 1)")
                     for a, r in summary.items()
                     if r["auc"][2] and not a.startswith("[all-"))
    deltas = "; ".join(f"{p['a']} − {p['b']} ΔAUC {_delta(p['auc'])}" for p in paired if not p["b"].startswith("["))
    return f"{title}: {arms}" + (f" | {deltas}" if deltas else "")


# -- JSON -------------------------------------------------------------------------------------


def clean(o: Any) -> Any:
    """JSON-ready: NaN → null, tuples → lists, numpy scalars → Python, paths → str."""
    if isinstance(o, Mapping):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return o
