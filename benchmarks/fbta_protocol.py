"""A protocol that can tell (issue #14): vanilla vs FBTA, per MIL head, on identical splits, seeds and budget.

One *unit* = one arm × one split × one seed: ``fbta train`` into its own
folder, then ``fbta evaluate`` (vanilla) or ``fbta infer`` (FBTA: translator
path, plus TFE* re-extraction with ``--reextract``), with tracking off. Every
arm sees exactly the same splits (a per-split labels.csv with a ``split``
column, passed as ``data.labels``), the same seeds and the same ``--set``
overrides. The cohort's frozen features and clusters are shared read-only
(``data.features`` and a ``clusters`` symlink).

Two protocols::

    # stratified 5-fold CV: test = fold k, val = fold k+1 (or --val slice: a stratified slice of the rest)
    .venv/bin/python benchmarks/fbta_protocol.py --protocol kfold --folds 5 --seeds 0 1 2 --data /tmp/c48 \\
        --arms abmil:vanilla abmil:fbta transmil:vanilla transmil:fbta mambamil:vanilla mambamil:fbta \\
               'abmil:fbta:fbta.views=[eb]' 'abmil:fbta:fbta.views=[fb,eb]' abmil:fbta:fbta.trainable_extractor=false \\
               abmil:fbta:fbta.sampling=random abmil:fbta:fbta.k=20 \\
        --set train.epochs=20 train.patience=6 train.ema=true train.ema_alpha=0.9 train.ema_every=epoch \\
              fbta.ema_alpha=0.9 fbta.ema_every=epoch train.ema_warmup=true fbta.ema_warmup=true

    # the paper's few-shot regime: per draw, 10 train + 5 val slides per class (seeded by the draw), the rest test
    .venv/bin/python benchmarks/fbta_protocol.py --protocol fewshot --draws 5 --train-per-class 10 \\
        --val-per-class 5 --seeds 0 --data /tmp/c48 --arms abmil:vanilla abmil:fbta --set ...

Control arms (issue #29, benchmarks/protocol_controls.py): ``arch:e2e`` is the end-to-end
bound (FBTA's extractor configuration on whole bags with slide labels, no translator,
scored by re-extracting every test patch); ``arch:oracle`` trains the same extractor
configuration on **patch** targets from the masks (as many steps of C·M patches as FBTA
plans), re-extracts the split and trains the vanilla head on it. ``--probe-patches N``
adds the held-out patch probe of the frozen features and of every arm's selected and
last extractor, with the steps each received; the table then also carries FBTA's
recovered share, mean(FBTA − vanilla) / mean(e2e − vanilla). ``--jobs 2`` runs two
units at once (one torch thread each); ``--require 'A>=B'`` exits 1 when A is worse than
B beyond the paired interval (a regression check on vanilla's defaults)::

    .venv/bin/python benchmarks/fbta_protocol.py --protocol kfold --folds 5 --data /tmp/sub025 \\
        --arms abmil:vanilla abmil:fbta abmil:e2e abmil:oracle --probe-patches 16 --jobs 2

An arm is ``arch:method[:key=value;key=value]`` (its own overrides after the
common ``--set`` ones). The same EMA must be given to both methods: FBTA
always validates and deploys its EMA teacher (``fbta.ema_alpha``,
``fbta.ema_every``); vanilla only with ``train.ema=true`` — pass
``train.ema=true train.ema_alpha=0.9 train.ema_every=epoch fbta.ema_alpha=0.9
fbta.ema_every=epoch`` (and ``train.ema_warmup`` = ``fbta.ema_warmup``) via
``--set``, or the comparison is EMA vs no EMA. The
effective budget of every arm (epochs, patience, lr, EMA) is resolved from
params.yaml + overrides, printed, stored, and any difference between arms is
warned about. ``train.epochs=N`` in ``--set`` also sets ``fbta.epochs=N``
unless that is given too (params.yaml's CPU demo gives FBTA fewer epochs).

What each number means (all on the unit's *test* split unless named val):

- per arm: mean ± sample sd over its units (splits × seeds) of test AUC
  (binary: positive-class AUC; more classes: one-vs-rest macro), accuracy
  (argmax) and macro-F1 of the deployed path (``classification.<method>``);
  ``re-extract AUC`` is the TFE* path (``--reextract``); val AUC is the
  model-selection score at the best epoch.
- paired Δ (A − B): per unit, A's metric minus B's on the same split and seed,
  then the mean and a percentile-bootstrap 95 % interval over units (10,000
  resamples, seeded). Pairs: X:fbta − X:vanilla per head; every arm with
  overrides − its arch:method without (the ablations vs full ``abmil:fbta``);
  every arm − the pooled probe. An interval that excludes 0 is a difference
  this protocol can tell; units of one split share it, so the interval is
  optimistic when seeds, not splits, dominate the spread.
- baselines per test split: ``all-<class>`` (constant prediction: AUC 0.5,
  accuracy = that class's share) and ``probe``: mean-pooled frozen features →
  standardised logistic regression fitted on the same train split, C chosen on
  the val split (``--probe-c val``, grid 0.01–10) or fixed, scored on the test
  split. A MIL arm that does not beat the probe learned nothing pooling cannot.
- per unit also: best epoch, epochs run, wall and per-epoch seconds, and the
  last epoch's diagnostics from history.csv when present (gap_ratio,
  tfe_drift, l_dist, l_cons, l_cls_fb/eb/tb, tumour_share, ...).

Results accumulate in ``reports/bench/fbta_protocol_<name>.json`` (``--name``,
default the protocol): a unit already there is skipped, so an interrupted
protocol resumes (and a unit killed mid-training resumes from its resume.pt).
The splits, overrides and data are fixed per name: changing them is an error
(choose another ``--name``). At the end a markdown table is printed, stored in
the JSON, and a BENCHMARKS.md row written (only for the default ``--results``).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from common import ROOT, machine, record
from protocol_design import (Arm, budget_of, budget_warnings, check_overrides, fewshot_splits, kfold_splits,
                             mirror_epochs, pairs_of, parse_arm, split_labels_csv)
from protocol_controls import ProbeSets, cost_ratio, recovered_share
from protocol_units import Context, UnitFailed, run_unit
from protocol_stats import (clean, constant_baselines, headline, markdown, paired_table, pooled_features,
                            pooled_probe, summarise, unit_key)

from fbta.io.atomic import atomic_write_text


# -- main -------------------------------------------------------------------------------------


def _write(path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(clean(payload), indent=2, allow_nan=False))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", choices=("kfold", "fewshot"), required=True)
    p.add_argument("--name", help="results name (default: the protocol): reports/bench/fbta_protocol_<name>.json")
    p.add_argument("--arms", nargs="+", default=["abmil:vanilla", "abmil:fbta"],
                   help="arch:method[:key=value;key=value] per arm")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed values (every arm, every split)")
    p.add_argument("--set", nargs="*", default=[], dest="common", metavar="KEY=VALUE",
                   help="overrides for every arm (epochs, patience, EMA, device, head sizes)")
    p.add_argument("--folds", type=int, default=5, help="kfold: number of stratified folds")
    p.add_argument("--val", choices=("fold", "slice"), default="fold",
                   help="kfold: val = the next fold, or a stratified slice of the training folds")
    p.add_argument("--val-fraction", type=float, default=0.2, help="kfold --val slice: share of the rest")
    p.add_argument("--draws", type=int, default=5, help="fewshot: number of random draws")
    p.add_argument("--train-per-class", type=int, default=10)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the folds / draws (not of training)")
    p.add_argument("--splits", nargs="*", default=None, help="run only these splits (e.g. fold0 draw1)")
    p.add_argument("--reextract", action="store_true", help="FBTA arms also score TFE* re-extraction")
    p.add_argument("--probe-c", default="val", help="probe's C: 'val' (chosen on the val split) or a number")
    p.add_argument("--boot", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=ROOT / "data",
                   help="the cohort's data.out after tile/extract/cluster (slides/, labels.csv, features/, clusters/)")
    p.add_argument("--features", type=Path, help="feature folder (default: <data>/features/<extract.model>)")
    p.add_argument("--labels", type=Path, help="labels.csv (default: <data>/labels.csv)")
    p.add_argument("--slides", type=Path, help="slide folder (default: <data>/slides)")
    p.add_argument("--masks", type=Path, help="annotation masks (default: <data>/masks if present)")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    p.add_argument("--out", type=Path, default=Path("/tmp/fbta_protocol"), help="unit folders: <out>/<name>/...")
    p.add_argument("--results", type=Path, help="results JSON (default: reports/bench/fbta_protocol_<name>.json; "
                   "only the default gets a BENCHMARKS.md row)")
    p.add_argument("--keep-models", action="store_true", help="keep each unit's *.pt files (default: deleted)")
    p.add_argument("--keep-going", action="store_true", help="a failed unit is reported, not fatal (retried next run)")
    p.add_argument("--probe-patches", type=int, default=0,
                   help="held-out patch probe of every extractor (frozen, each fbta/e2e arm's selected and last "
                        "TFE*, the oracle's) on up to this many labelled patches per slide; needs masks (0: off)")
    p.add_argument("--require", nargs="*", default=[], metavar="A>=B",
                   help="exit 1 when arm A is worse than arm B with the paired interval of ΔAUC entirely below 0 "
                        "(e.g. the default vanilla against an earlier configuration of it)")
    p.add_argument("--jobs", type=int, default=1,
                   help="units run at once (each with 1 torch thread when > 1); results are the same")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from fbta.config import ConfigError, load_config
    from fbta.io.h5 import feature_files
    from fbta.slides.cohort import read_labels

    name = args.name or args.protocol
    bench_name = f"fbta_protocol_{name}"
    default_results = ROOT / "reports" / "bench" / f"{bench_name}.json"
    results = (args.results or default_results).resolve()
    try:
        arms = [parse_arm(s) for s in args.arms]
        check_overrides(args.common, "--set")
    except ValueError as exc:
        print(f"fbta_protocol: error: {exc}", file=sys.stderr)
        return 2
    if len({a.spec for a in arms}) != len(arms):
        print("fbta_protocol: error: an arm is listed twice", file=sys.stderr)
        return 2
    common = mirror_epochs(list(args.common))
    data = args.data.resolve()
    params = args.params.resolve()
    try:
        base_cfg = load_config(params, common)
    except ConfigError as exc:
        print(f"fbta_protocol: error: --set: {exc}", file=sys.stderr)
        return 2
    features = (args.features or data / "features" / base_cfg.extract.model).resolve()
    labels_path = (args.labels or data / "labels.csv").resolve()
    slides = (args.slides or data / "slides").resolve()
    masks = args.masks.resolve() if args.masks else (data / "masks" if (data / "masks").is_dir() else None)

    # the cohort: labelled slides with a feature file
    rows = {r["slide_id"].strip(): r for r in csv.DictReader(labels_path.read_text(encoding="utf-8-sig").splitlines())}
    entries = read_labels(labels_path, slides)  # validates the CSV like the stages do
    files = feature_files(features)
    labels = {sid: e.label for sid, e in entries.items() if e.label and sid in files}
    left_out = sorted(sid for sid, e in entries.items() if e.label and sid not in files)
    if left_out:
        print(f"note: {len(left_out)} labelled slide(s) without features left out: {', '.join(left_out[:5])}")
    if not labels:
        print(f"fbta_protocol: error: no labelled slide has features in {features}", file=sys.stderr)
        return 2
    classes = sorted(set(labels.values()))
    try:
        if args.protocol == "kfold":
            splits = kfold_splits(labels, args.folds, args.split_seed, args.val, args.val_fraction)
            desc = f"stratified {args.folds}-fold CV (val: {args.val}), {len(labels)} slides"
        else:
            splits = fewshot_splits(labels, args.draws, args.train_per_class, args.val_per_class, args.split_seed)
            desc = (f"few-shot {args.train_per_class}+{args.val_per_class} per class, {args.draws} draws, "
                    f"{len(labels)} slides")
    except ValueError as exc:
        print(f"fbta_protocol: error: {exc}", file=sys.stderr)
        return 2
    run_splits = list(splits) if args.splits is None else args.splits
    unknown = [s for s in run_splits if s not in splits]
    if unknown:
        print(f"fbta_protocol: error: unknown split(s) {unknown}; have {list(splits)}", file=sys.stderr)
        return 2

    # budget: resolved per arm (validates every override before the first unit)
    budget: dict[str, dict[str, Any]] = {}
    for a in arms:
        try:
            budget[a.spec] = budget_of(params, [*common, *a.overrides], a.method)
        except ConfigError as exc:
            print(f"fbta_protocol: error: arm {a.spec}: {exc}", file=sys.stderr)
            return 2
    warnings = budget_warnings(budget, {a.spec: a.overrides for a in arms})
    print(f"protocol {name}: {desc}; arms {len(arms)}, seeds {args.seeds}, splits {run_splits}")
    print(f"common overrides: {' '.join(common) or '(none)'}")
    for a, b in budget.items():
        print(f"  budget {a}: {json.dumps(b)}")
    for w in warnings:
        print(f"WARNING: {w}", file=sys.stderr)

    settings = {"protocol": args.protocol, "description": desc, "folds": args.folds, "val": args.val,
                "val_fraction": args.val_fraction, "draws": args.draws, "train_per_class": args.train_per_class,
                "val_per_class": args.val_per_class, "split_seed": args.split_seed, "common_overrides": common,
                "params": str(params), "data": str(data), "features": str(features), "labels": str(labels_path),
                "reextract": args.reextract, "probe_c": args.probe_c, "probe_patches": args.probe_patches}
    state: dict[str, Any] = json.loads(results.read_text()) if results.exists() else {}
    if state.get("settings") not in (None, settings):
        old = state["settings"]
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        print(f"fbta_protocol: error: {results} was made with other settings {diff}; choose another --name "
              "(or delete it to start over)", file=sys.stderr)
        return 2
    units: dict[str, dict[str, Any]] = state.get("units", {})
    out_root = (args.out / name).resolve()
    if args.probe_patches and masks is None:
        print("fbta_protocol: error: --probe-patches needs annotation masks (--masks or <data>/masks)", file=sys.stderr)
        return 2
    probes = ProbeSets(features, slides, masks, labels, args.probe_patches) if args.probe_patches else None
    ctx = Context(out_root, params, data, slides, features, masks, tuple(common), args.reextract, args.keep_models,
                  probes, 1 if args.jobs > 1 else 0)

    # per-split labels.csv (identical for every arm and seed) and the baselines
    pooled = pooled_features({s: files[s] for s in labels})
    probe_c = None if args.probe_c == "val" else float(args.probe_c)
    baselines: dict[str, dict[str, Any]] = {}
    split_csv: dict[str, Path] = {}
    for sname in run_splits:
        part = splits[sname]
        path = out_root / "splits" / sname / "labels.csv"
        text = split_labels_csv(part, rows)
        if path.exists() and path.read_text() != text:
            print(f"fbta_protocol: error: {path} holds another split than this protocol draws; use another "
                  "--out or --name", file=sys.stderr)
            return 2
        if not path.exists():
            atomic_write_text(path, text)
        split_csv[sname] = path
        baselines[sname] = {**constant_baselines(part, labels, classes),
                            "probe": pooled_probe(pooled, part, labels, classes, probe_c)}

    payload_base = {"settings": settings, "machine": machine(), "classes": classes, "left_out": left_out,
                    "budget": budget, "budget_warnings": warnings, "arms": [a.spec for a in arms],
                    "seeds": args.seeds,
                    "splits": {s: {p: [k for k, q in part.items() if q == p] for p in ("train", "val", "test")}
                               for s, part in splits.items()}}
    todo = [(a, s, seed) for s in run_splits for seed in args.seeds for a in arms]
    failed: list[str] = []
    lock = threading.Lock()

    def one(i: int, arm: Arm, sname: str, seed: int) -> None:
        key = unit_key(arm.spec, sname, seed)
        if key in units:
            print(f"[{i}/{len(todo)}] {key}: done before, skipped", flush=True)
            return
        print(f"[{i}/{len(todo)}] {key} ...", flush=True)
        try:
            u = run_unit(ctx, arm, sname, seed, split_csv[sname], splits[sname])
        except UnitFailed as exc:
            with lock:
                failed.append(key)
            if not args.keep_going:
                raise
            print(f"  FAILED (continuing): {exc}", file=sys.stderr, flush=True)
            return
        with lock:
            units[key] = u
            _write(results, {**state, **payload_base, "baselines": {**state.get("baselines", {}), **baselines},
                             "units": units})
        m = u["test"].get(arm.method, {})
        pr = f"; probe {u['probe']}" if u.get("probe") else ""
        print(f"  {key}: test AUC {m.get('auc')}, ACC {m.get('acc')}, F1 {m.get('f1')}; val AUC {u.get('val_auc')}; "
              f"best epoch {u.get('best_epoch')}/{u.get('epochs_run')}; {u['wall_seconds']:.0f} s{pr}", flush=True)

    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for f in [pool.submit(one, i, *t) for i, t in enumerate(todo, 1)]:
                f.result()
    except UnitFailed as exc:
        print(f"fbta_protocol: unit {failed[-1] if failed else ''} failed: {exc}", file=sys.stderr)
        return 1

    all_baselines = {**state.get("baselines", {}), **baselines}
    arm_specs = [a.spec for a in arms]
    # exactly this command's units (arms × splits × seeds): the table is reproducible from the command line,
    # whatever other units earlier commands left in the same results file
    asked = {unit_key(a.spec, sp, seed) for a, sp, seed in todo}
    mine = {k: u for k, u in units.items() if k in asked}
    summary = summarise(mine, arm_specs, {s: all_baselines[s] for s in run_splits if s in all_baselines})
    pairs = pairs_of(arms) + [(a.spec, "[probe]") for a in arms]
    paired = paired_table(mine, pairs, all_baselines, args.boot, args.boot_seed)
    title = f"fbta_protocol {name}: {desc}, seeds {args.seeds}"
    shares = [r for r in (recovered_share(mine, arch, args.boot, args.boot_seed)
                          for arch in sorted({a.arch for a in arms})) if r is not None]
    costs = [r for r in (cost_ratio(mine, arch) for arch in sorted({a.arch for a in arms})) if r is not None]
    table = markdown(summary, paired, title, shares, costs)
    print("\n" + table)
    for w in warnings:
        print(f"WARNING: {w}")
    payload = {**state, **payload_base, "baselines": all_baselines, "units": units, "summary": summary,
               "paired": paired, "recovered_share": shares, "cost_ratio": costs, "table_md": table, "failed": failed}
    line = headline(summary, paired, title) + "".join(
        f" | {s['arch']} recovered share {s['share']} [{s['lo']}, {s['hi']}]" if s["share"] is not None
        else f" | {s['arch']}: e2e − vanilla {s['e2e_minus_vanilla']:+.3f}, no gain to recover" for s in shares)
    if results == default_results.resolve():
        record(bench_name, clean(payload), line)
    else:
        _write(results, payload)
        print(f"\n{line}\n→ {results}")
    broken = check_requirements(args.require, mine, all_baselines, args.boot, args.boot_seed)
    for line in broken:
        print(f"REQUIREMENT FAILED: {line}", file=sys.stderr)
    return 1 if failed or broken else 0


def check_requirements(require: Sequence[str], units: dict[str, Any], baselines: dict[str, Any], n_boot: int,
                       seed: int) -> list[str]:
    """``A>=B``: broken when A − B's paired ΔAUC interval lies entirely below 0 (one line per broken one)."""
    broken = []
    for spec in require:
        a, sep, b = spec.partition(">=")
        if not sep:
            broken.append(f"{spec!r} is not A>=B")
            continue
        rows = paired_table(units, [(a.strip(), b.strip())], baselines, n_boot, seed)
        if not rows:
            broken.append(f"{spec}: no matched units of both arms")
        elif rows[0]["auc"]["hi"] < 0:
            d = rows[0]["auc"]
            broken.append(f"{spec}: ΔAUC {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] over {d['n']} units")
    return broken


if __name__ == "__main__":
    sys.exit(main())
