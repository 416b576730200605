"""``fbta register``: trained models → MLflow registry versions; ``@champion`` moves only to a better one.

For each of ``register.models`` (classifier, segmenter): load the model folder
(so a broken model fails here, not when served), log it as one pyfunc model
in this stage's MLflow run, register a version of ``fbta-classifier`` /
``fbta-segmenter`` tagged with its validation metrics, and promote it if it
beats the current champion (fbta/registry/promote.py). The decision — both
metrics, the reason, the aliases after — is written to
``<data.out>/reports/registry/<name>.json`` and printed as one line.
Re-running with unchanged weights registers nothing new.
"""
from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from fbta.config import ConfigError, InputError
from fbta.io.atomic import atomic_write_text
from fbta.stages.common import out_dir
from fbta.tracking import stage_run

KINDS = ("classifier", "segmenter")


def run(cfg: DictConfig) -> int:
    r = cfg.register
    kinds = list(r.models)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"register.models={kinds}: choose from {', '.join(KINDS)}")
    if not cfg.tracking.enabled:
        raise ConfigError("fbta register needs tracking.enabled=true: the registry lives in the MLflow store")

    from fbta.registry.promote import decision_line, lock_file, promote
    from fbta.registry.publish import default_folder, register_folder

    folders = {k: default_folder(cfg, k) for k in kinds}
    for kind, folder in folders.items():
        if not (folder / "meta.json").is_file():
            raise InputError(f"{folder}: no trained {kind} (meta.json missing); train it first, set "
                             f"register.{kind}, or leave {kind} out of register.models")
    names = {"classifier": r.classifier_name, "segmenter": r.segmenter_name}
    reports = out_dir(cfg, "reports", "registry")
    with stage_run(cfg, "register", f"register-{'-'.join(kinds)}", {"fbta.data_out": cfg.data.out}) as mlrun:
        client = mlrun.client
        for kind in kinds:
            name, folder = names[kind], folders[kind]
            reg = register_folder(client, mlrun.run_id, kind, folder, name)
            mlrun.log_metrics({f"{kind}_{k}": v for k, v in reg.metrics.items()})
            if r.promote:
                d = promote(client, name, kind, reg.version, lock_file(cfg.tracking.uri, reports, name))
            else:
                d = {"model": name, "kind": kind, "decision": "registered", "reason": "register.promote=false",
                     "candidate": {"version": reg.version, **reg.metrics}, "champion_before": None,
                     "aliases": {k: str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()},
                     "warning": None}
            d.update({"new_version": reg.created, "folder": str(folder), "register_run_id": mlrun.run_id,
                      "tracking_uri": cfg.tracking.uri, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            dest = reports / f"{name}.json"
            atomic_write_text(dest, json.dumps(d, indent=2, sort_keys=True) + "\n")
            mlrun.log_artifact(dest, "registry")
            mlrun.set_tags({f"fbta.{kind}_version": reg.version, f"fbta.{kind}_decision": d["decision"]})
            line = decision_line(d) if d["decision"] != "registered" else \
                f"{name} v{reg.version} registered (register.promote=false); aliases unchanged"
            reuse = "" if reg.created else " (same files as an existing version: nothing new registered)"
            print(f"register: {line}{reuse}; decision → {dest}", flush=True)
            if d.get("warning"):
                print(f"register: warning: {d['warning']}", flush=True)
    return 0
