"""Two pipeline output trees (``data.out`` of two ``dvc repro`` runs): did a refactor change any result?

Why: a change meant to keep behaviour (issue #18's one training loop) must leave every
model bit-identical and every metric equal; only wall times, run ids and the config
file's new keys may differ. This compares, side by side:
- every ``.pt`` (state dicts, tensor by tensor) and every ``.h5`` (dataset by dataset);
- ``reports/metrics.json`` leaf by leaf, wall-time keys reported apart;
- every ``models/*/history.csv`` on the columns both have, timing columns left out.

    python tools/compare_runs.py /tmp/before/data /tmp/after/data     # exit 1 when a result differs
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

TIMING = ("second", "_s", "speedup", "wall")  # keys of wall-clock figures (not results)


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(obj):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _tensors(val, f"{prefix}.{key}").items()}
    return {}


def same_pt(a: Path, b: Path) -> bool:
    ta, tb = _tensors(torch.load(a, weights_only=True)), _tensors(torch.load(b, weights_only=True))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def same_h5(a: Path, b: Path) -> bool:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        names: list[str] = []
        fa.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        return all(n in fb and np.array_equal(fa[n][()], fb[n][()]) for n in names)


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def compare(a: Path, b: Path) -> list[str]:
    """The differing results (empty: the runs agree); prints a summary as it goes."""
    bad: list[str] = []
    for kind, same in (("*.pt", same_pt), ("*.h5", same_h5)):
        files = sorted(p.relative_to(a) for p in a.rglob(kind))
        diff = [str(f) for f in files if not (b / f).exists() or not same(a / f, b / f)]
        print(f"{kind}: {len(files) - len(diff)} of {len(files)} identical" + (f"; differ: {diff[:10]}" if diff else ""))
        bad += diff
    ma, mb = (_leaves(json.loads((p / "reports/metrics.json").read_text())) for p in (a, b))
    keys = sorted(set(ma) | set(mb))
    timing = [k for k in keys if any(t in k for t in TIMING)]
    diff = [k for k in keys if k not in timing and ma.get(k) != mb.get(k)]
    print(f"metrics.json: {len(keys) - len(timing)} results, {len(diff)} differ; {len(timing)} wall-time keys not compared")
    bad += [f"metrics.json:{k} {ma.get(k)} vs {mb.get(k)}" for k in diff]
    for h in sorted(a.glob("models/*/history.csv")):
        ra, rb = (list(csv.DictReader(open(p))) for p in (h, b / h.relative_to(a)))
        cols = [c for c in ra[0] if c in rb[0] and not any(t in c for t in TIMING)] if ra and rb else []
        diff_rows = [i for i, (x, y) in enumerate(zip(ra, rb)) if any(x[c] != y[c] for c in cols)]
        ok = len(ra) == len(rb) and not diff_rows
        print(f"{h.relative_to(a)}: {len(ra)} vs {len(rb)} epochs, {len(cols)} columns compared: "
              f"{'identical' if ok else f'rows differ {diff_rows[:5]}'}")
        bad += [] if ok else [str(h.relative_to(a))]
    return bad


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    differ = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("same results" if not differ else f"{len(differ)} result(s) differ")
    sys.exit(1 if differ else 0)
