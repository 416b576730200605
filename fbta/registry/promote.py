"""Registry versions and alias promotion (⚑): ``@champion`` moves only to a better model.

Rules: the classifier is judged on its validation AUC (equal AUC → the lower
validation loss wins), the segmenter on its validation F1. Each version keeps
its metrics as version tags (``fbta.val_auc`` …), so a later candidate is
compared with what the champion scored when it was registered. A promoted
candidate takes ``@champion`` and the old champion takes ``@previous``; a
rejected one is tagged ``fbta.decision=rejected`` with the reason and no alias
moves. A segmenter whose ``meta.json`` says ``beats_baselines: false`` (no
epoch beat the trivial all-background / all-tumour maps on validation, see
``fbta.seg.train.Selection``) is refused outright: it never becomes champion,
not even of an empty registry (:func:`refusal`). Read-compare-set runs under an exclusive file lock beside the store, so
two registrations at once cannot both believe they beat the same champion.
The lock is a ``flock``: it works between processes, and the kernel drops it
when its holder dies, so a killed registration leaves no stale lock (the empty
lock file stays and is harmless). It spans only processes that see the same
lock file: beside a SQLite store that is every process using that store; for a
server store (``http://``, PostgreSQL) it is the ``fallback_dir`` given, i.e.
one machine's registrations into one output folder.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from fbta.io.lock import file_lock
from fbta.io.store import sqlite_file
from fbta.registry.pyfunc import CLASSIFIER, SEGMENTER

CHAMPION, PREVIOUS = "champion", "previous"
TAG = "fbta."


@dataclass(frozen=True)
class Rule:
    """Which validation metric decides, and the tie-breaker (lower is better)."""

    metric: str
    tie_break: Optional[str] = None


RULES = {CLASSIFIER: Rule("val_auc", "val_loss"), SEGMENTER: Rule("val_f1")}


def _num(v: Any) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def candidate_metrics(kind: str, meta: Mapping[str, Any]) -> dict[str, float]:
    """The deciding metrics from a model folder's ``meta.json`` (missing or NaN ones left out)."""
    rule = RULES[kind]
    keys = [rule.metric] + ([rule.tie_break] if rule.tie_break else [])
    return {k: v for k in keys if (v := _num(meta.get(k))) is not None}


def refusal(kind: str, tags: Mapping[str, str]) -> Optional[str]:
    """Why a candidate may never take ``@champion`` whatever the champion scored; None when it may.

    Reads the version tags ``fbta.beats_baselines`` / ``fbta.baseline_val_f1``
    copied from the model's meta.json. A version without the tag (registered
    before the flag existed) is judged by the usual rule.
    """
    if kind != SEGMENTER or str(tags.get(TAG + "beats_baselines", "")).strip().lower() not in ("false", "0"):
        return None
    floor = _num(tags.get(TAG + "baseline_val_f1"))
    return ("degenerate segmenter: no epoch beat the trivial all-background/all-tumour maps on validation"
            + (f" (val F1 to beat {floor:.4f})" if floor is not None else "") + " — meta.json beats_baselines=false")


def version_metrics(kind: str, tags: Mapping[str, str]) -> dict[str, float]:
    rule = RULES[kind]
    keys = [rule.metric] + ([rule.tie_break] if rule.tie_break else [])
    return {k: v for k in keys if (v := _num(tags.get(TAG + k))) is not None}


def beats(kind: str, cand: Mapping[str, float], champ: Mapping[str, float]) -> tuple[bool, str]:
    """(candidate is better, why) under the kind's rule."""
    rule = RULES[kind]
    m = rule.metric
    if m not in cand:
        return False, f"candidate has no {m}"
    if m not in champ:
        return False, f"the champion has no recorded {m} (version tag {TAG}{m}); cannot show the candidate is better"
    if cand[m] > champ[m]:
        return True, f"{m} {cand[m]:.4f} > {champ[m]:.4f}"
    if cand[m] < champ[m]:
        return False, f"{m} {cand[m]:.4f} < {champ[m]:.4f}"
    t = rule.tie_break
    if t and t in cand and t in champ:
        if cand[t] < champ[t]:
            return True, f"{m} tied at {cand[m]:.4f}, {t} {cand[t]:.4f} < {champ[t]:.4f}"
        return False, f"{m} tied at {cand[m]:.4f}, {t} {cand[t]:.4f} ≥ {champ[t]:.4f}"
    return False, f"{m} tied at {cand[m]:.4f}"


def files_sha256(files: list[Path]) -> str:
    """One digest over the model's files (name + bytes): the same weights are never registered twice."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def lock_file(tracking_uri: str, fallback_dir: Path, name: str) -> Path:
    """``.<db>.<model>.lock`` beside a SQLite store; else in ``fallback_dir`` (one machine's promotions)."""
    db = sqlite_file(tracking_uri)
    return db.parent / f".{db.name}.{name}.lock" if db is not None else Path(fallback_dir).resolve() / f".{name}.lock"


def ensure_registered_model(client: Any, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by a concurrent registration
            client.get_registered_model(name)


def champion_of(client: Any, name: str) -> Any:
    """The ``@champion`` version, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def find_version(client: Any, name: str, sha: str) -> Any:
    """An existing version of ``name`` with the same files, or None."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if (mv.tags or {}).get(TAG + "sha256") == sha:
            return mv
    return None


def promote(client: Any, name: str, kind: str, version: str, lock: Path) -> dict[str, Any]:
    """Compare version ``version`` with ``@champion`` and move the aliases if it is better; the decision."""
    with file_lock(lock):
        cand = client.get_model_version(name, version)
        cand_m = version_metrics(kind, cand.tags or {})
        champ = champion_of(client, name)
        champ_m = version_metrics(kind, champ.tags or {}) if champ is not None else None
        warning = None
        refused = refusal(kind, cand.tags or {})
        if refused and not (champ is not None and str(champ.version) == str(version)):
            better, reason = False, refused
        elif champ is None:
            better, reason = (True, "no champion yet") if RULES[kind].metric in cand_m else \
                (False, f"candidate has no {RULES[kind].metric}")
        elif str(champ.version) == str(version):
            better, reason = False, "already the champion"
        else:
            better, reason = beats(kind, cand_m, champ_m or {})
            split_a, split_b = (cand.tags or {}).get(TAG + "val_split"), (champ.tags or {}).get(TAG + "val_split")
            if split_a and split_b and split_a != split_b:
                warning = "validation sets differ: the metrics are not measured on the same slides"
        if champ is not None and str(champ.version) == str(version):
            decision = "unchanged"
        elif better:
            if champ is not None:
                client.set_registered_model_alias(name, PREVIOUS, champ.version)
            client.set_registered_model_alias(name, CHAMPION, version)
            decision = "promoted"
        else:
            decision = "rejected"
        if decision != "unchanged":
            client.set_model_version_tag(name, version, TAG + "decision", decision)
            client.set_model_version_tag(name, version, TAG + "decision_reason", reason)
        aliases = dict(client.get_registered_model(name).aliases or {})
    return {
        "model": name, "kind": kind, "metric": RULES[kind].metric, "decision": decision, "reason": reason,
        "candidate": {"version": str(version), **cand_m},
        "champion_before": None if champ is None else {"version": str(champ.version), **(champ_m or {})},
        "aliases": {k: str(v) for k, v in sorted(aliases.items())}, "warning": warning,
        "refused": refused,  # why the candidate can never be champion (None: judged by the rule)
    }


def decision_line(d: Mapping[str, Any]) -> str:
    """One line a person reads in the log."""
    v, name = d["candidate"]["version"], d["model"]
    before = d["champion_before"]
    if d["decision"] == "promoted":
        prev = f"; v{before['version']} → @{PREVIOUS}" if before else ""
        return f"{name} v{v} → @{CHAMPION} ({d['reason']}{prev})"
    if d["decision"] == "unchanged":
        return f"{name} v{v} is already @{CHAMPION}; aliases unchanged"
    champ = f" against @{CHAMPION} v{before['version']}" if before else ""
    return f"{name} v{v} rejected{champ} ({d['reason']}); aliases unchanged"
