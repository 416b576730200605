"""Which extractor configuration can learn? The oracle (patch targets) per configuration, on one split.

For each configuration (trainable units, extractor lr, BatchNorm mode, steps), the
oracle of benchmarks/extractor_controls.py trains FBTA's extractor on patch targets
from the masks — bags of C·M patches of one slide, FBTA's augmentation — and the
held-out patch probe is read every ``--probe-every`` steps and at the end, next to
the frozen features' probe, both fitted on the training slides' patches and
held-out-only (fitted and scored on the test slides by slide-grouped CV: blind to
what the oracle memorised of its training slides). A configuration in which even the
oracle leaves both probes where the frozen features have them cannot show FBTA's
gain, whatever the labels.

    python benchmarks/extractor_sweep.py --data /tmp/sub02 --steps 1500 \\
        --configs 'blocks=3;bn=eval;lr=1.5e-5' 'blocks=-1;bn=train;lr=5e-5'
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from common import ROOT, record
from extractor_controls import (ExtractorConfig, frozen_patch_probes, load_patches, patch_probes, patch_targets,
                                train_oracle, tumour_share)

from fbta.config import load_config
from fbta.e2e.pseudobags import patch_attrs
from fbta.io.h5 import read_features


def parse_config(spec: str, base: ExtractorConfig) -> ExtractorConfig:
    """``blocks=3;bn=eval;lr=1.5e-5;steps=1500;size=224;hed=0.2;batch=mixed`` over ``base``."""
    kw = {}
    for part in filter(None, spec.split(";")):
        k, v = part.split("=", 1)
        if k == "blocks":
            kw["train_blocks"] = int(v)
        elif k == "bn":
            if v not in ("eval", "train"):
                raise SystemExit(f"bn={v}: choose eval (pretrained statistics) or train")
            kw["freeze_bn"] = v == "eval"
        elif k == "lr":
            kw["lr"] = float(v)
        elif k == "steps":
            kw["steps"] = int(v)
        elif k == "size":
            kw["input_size"] = int(v)
        elif k == "batch":  # slides per step: slide (1, FBTA's one-slide bags), mixed (one patch of each of `bag`
            # slides: a control of the control) or a number of slides, the classes sharing them evenly
            n = {"slide": 1, "mixed": base.bag}.get(v) or (int(v) if v.isdigit() else 0)
            if not 1 <= n <= base.bag or base.bag % n:
                raise SystemExit(f"batch={v}: choose slide, mixed or a number of slides dividing the bag ({base.bag})")
            kw["slides_per_step"] = n
        elif k == "hed":  # fbta.augment.hed_sigma: stain jitter against slides told apart by their stain
            kw["augment"] = replace(kw.get("augment", base.augment), hed_sigma=float(v))
        else:
            raise SystemExit(f"unknown config key {k!r} in {spec!r} (blocks, bn, lr, steps, size, hed, batch)")
    return replace(base, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="cohort data.out: labels.csv (split column), slides/, "
                   "masks/, features/<model>/")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--probe-every", type=int, default=500)
    p.add_argument("--per-slide", type=int, default=24, help="labelled patches per test slide (the probe's test set)")
    p.add_argument("--train-per-slide", type=int, default=0,
                   help="labelled patches per training slide the oracle learns from and the probe is fitted on "
                        "(0: all of them — what FBTA's extractor sees; a few per slide lets 1,500 steps memorise "
                        "them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="extractor_sweep")
    p.add_argument("--set", nargs="*", default=[], dest="overrides", help="params overrides (fbta.*, extract.*)")
    args = p.parse_args()
    cfg = load_config(ROOT / "params.yaml", [f"data.out={args.data}", *args.overrides])
    base = ExtractorConfig.of(cfg, args.steps)
    rows = list(csv.DictReader((args.data / "labels.csv").open()))
    classes = sorted({r["label"] for r in rows})
    h5 = args.data / "features" / cfg.extract.model / "h5_files"
    shares, n, cached_sizes = {}, {}, set()
    for r in rows:
        feats, coords, attrs = read_features(h5 / f"{r['slide_id']}.h5")
        cached_sizes.add(int(attrs.get("input_size", 0)))
        shares[r["slide_id"]] = tumour_share(args.data / "masks", r["slide_id"], coords,
                                             patch_attrs(h5 / f"{r['slide_id']}.h5", attrs))
        n[r["slide_id"]] = len(coords)
    targets = patch_targets(shares, {r["slide_id"]: classes.index(r["label"]) for r in rows}, n)
    rng = np.random.default_rng(args.seed)
    part = {s: [(r["slide_id"], args.data / "slides" / f"{r['slide_id']}.svs", h5 / f"{r['slide_id']}.h5", None)
                for r in rows if r["split"] == s] for s in ("train", "test")}
    train = load_patches(part["train"], targets, args.train_per_slide, rng)
    test = load_patches(part["test"], targets, args.per_slide, rng)
    frozen_at: dict[int, tuple[float, float | None]] = {}

    def frozen_probes(size: int) -> tuple[float, float | None]:
        if size not in frozen_at:
            frozen_at[size] = frozen_patch_probes(cfg.extract.model, cfg.extract.weights, cached_sizes, size,
                                                  train, test)
        return frozen_at[size]

    frozen, frozen_heldout = frozen_probes(base.input_size)
    result = {"data": str(args.data), "classes": classes, "patches": {"train": len(train), "test": len(test)},
              "input_size": base.input_size,
              "frozen_probe": frozen, "frozen_probe_heldout": frozen_heldout, "per_slide": args.per_slide,
              "train_per_slide": args.train_per_slide, "configs": {}}
    print(f"frozen probe {result['frozen_probe']}, held-out-only {result['frozen_probe_heldout']} "
          f"({result['patches']})", flush=True)
    out = ROOT / "reports" / "bench" / f"{args.name}.json"
    partial = out.with_suffix(".partial.tmp")
    done = {}
    for old in (out, partial, out.with_suffix(".partial.json")):  # a killed or extended sweep resumes: finished
        # configs (same cohort, patches and frozen probe) are kept
        if old.exists():
            prev = json.loads(old.read_text())
            if all(prev.get(k) == result[k] for k in ("data", "per_slide", "train_per_slide", "frozen_probe")):
                done.update(prev.get("configs", {}))
    for spec in args.configs:
        if spec in done and done[spec].get("steps") == parse_config(spec, base).steps:
            result["configs"][spec] = done[spec]
            print(f"{spec}: done before (probe {done[spec]['probe']}), kept", flush=True)
            continue
        c = parse_config(spec, base)
        ext, info = train_oracle(c, train, args.seed, (train, test), args.probe_every)
        fitted, heldout = patch_probes(ext, train, test)
        res = {**c.describe(), **info, "probe": fitted, "probe_heldout": heldout}
        base_fitted, base_heldout = frozen_probes(c.input_size)  # a size= config: the frozen probe at its size
        if c.input_size != base.input_size:
            res["frozen_probe"], res["frozen_probe_heldout"] = base_fitted, base_heldout
        res["gain"] = round(res["probe"] - base_fitted, 4)
        res["gain_heldout"] = (None if res["probe_heldout"] is None or base_heldout is None
                               else round(res["probe_heldout"] - base_heldout, 4))
        result["configs"][spec] = res
        print(f"{spec}: probe {res['probe']} (frozen {base_fitted}, gain {res['gain']:+.3f}), held-out-only "
              f"{res['probe_heldout']} (gain {res['gain_heldout']}); "
              f"{info['seconds']} s; curve {info['curve']}", flush=True)
        partial.write_text(json.dumps(result, indent=2))
        del ext
    for old in (partial, out.with_suffix(".partial.json")):
        old.unlink(missing_ok=True)
    record(args.name, result, f"oracle (patch targets) in FBTA's extractor configuration, {args.steps} steps of "
           f"{base.bag}-patch bags (one slide's, unless batch= gives more), {cfg.extract.model} {base.input_size} px: "
           f"held-out patch probe "
           f"frozen {result['frozen_probe']} (held-out-only {result['frozen_probe_heldout']}); "
           + "; ".join(f"{k} → {v['probe']} ({v['gain']:+.3f}; held-out-only {v.get('probe_heldout', '–')})"
                       for k, v in result["configs"].items()))


if __name__ == "__main__":
    main()
