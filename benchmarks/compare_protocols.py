"""Paired comparison of arms from two protocol results on the same splits (e.g. features at 224 vs 112 px).

``fbta_protocol.py`` fixes one feature folder per run, so an input-size bisect is two
runs over the same cohort, folds and seeds; this pairs their units on (split, seed)
and reports each pair's ΔAUC with the protocol's bootstrap interval::

    python benchmarks/compare_protocols.py --name vanilla_bisect_sub025 \\
        --pair 'reports/bench/fbta_protocol_sub025_224.json:abmil:vanilla' \\
               'reports/bench/fbta_protocol_sub025_vanilla.json:abmil:vanilla' ...

Each ``--pair A B`` is ``results.json:arm``; a run whose splits differ from the
other's is refused (the pairs would not be the same slides).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, record
from protocol_stats import mean_sd, paired_bootstrap


def units_of(spec: str) -> tuple[dict, dict[tuple[str, int], dict]]:
    path, _, arm = spec.partition(":")
    data = json.loads((ROOT / path if not Path(path).is_absolute() else Path(path)).read_text())
    units = {(u["split"], u["seed"]): u for u in data["units"].values() if u["arm"] == arm}
    if not units:
        raise SystemExit(f"{spec}: no unit of arm {arm!r} in {path}")
    return data, units


def auc(u: dict) -> float:
    return float(u["test"][u["method"]]["auc"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", nargs=2, action="append", required=True, metavar=("A", "B"))
    p.add_argument("--name", required=True, help="results: reports/bench/<name>.json")
    p.add_argument("--boot", type=int, default=10_000)
    p.add_argument("--require-not-worse", action="store_true",
                   help="exit 1 when a pair's A is worse than its B beyond the interval (ΔAUC interval below 0)")
    args = p.parse_args()
    rows = []
    for a, b in args.pair:
        da, ua = units_of(a)
        db, ub = units_of(b)
        if da["splits"] != db["splits"]:
            raise SystemExit(f"{a} and {b} were run on different splits: not a paired comparison")
        keys = sorted(set(ua) & set(ub))
        diffs = [auc(ua[k]) - auc(ub[k]) for k in keys]
        rows.append({"a": a, "b": b, "units": len(keys), "a_auc": mean_sd(auc(ua[k]) for k in keys),
                     "b_auc": mean_sd(auc(ub[k]) for k in keys), "delta_auc": paired_bootstrap(diffs, args.boot, 0),
                     "wins": [sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)]})
        d = rows[-1]["delta_auc"]
        print(f"{a} − {b}: ΔAUC {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] over {len(keys)} units", flush=True)
    record(args.name, {"pairs": rows}, "; ".join(
        f"{r['a'].split('/')[-1]} − {r['b'].split('/')[-1]} ΔAUC {r['delta_auc']['mean']:+.3f} "
        f"[{r['delta_auc']['lo']:+.3f}, {r['delta_auc']['hi']:+.3f}] (n = {r['units']})" for r in rows))
    worse = [r for r in rows if r["delta_auc"]["hi"] < 0]
    for r in worse:
        print(f"REQUIREMENT FAILED: {r['a']} is worse than {r['b']}", file=sys.stderr)
    return 1 if args.require_not_worse and worse else 0


if __name__ == "__main__":
    sys.exit(main())
