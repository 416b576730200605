"""The search space of ``fbta tune``: ``tune.*`` lists in params.yaml → Optuna distributions → config values.

Why lists in params.yaml: they stay typed by the schema and overridable from
the CLI or ``dvc exp run -S tune.k=[5,10]``. Integer knobs (C, M, K) are
categorical choices; learning rates are ``[low, high]`` searched on a log
scale. One value fixes a knob without tuning it; ``[]`` leaves the params
value alone. FBTA-only knobs are ignored for ``train.method=vanilla``.
Parameters are named by their config key (``cluster.n_clusters``), so a
trial's parameters are overrides as they stand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from fbta.config import ConfigError


@dataclass(frozen=True)
class Knob:
    key: str  # config key the value goes to
    kind: str  # choice (integers) | log (float range)
    fbta_only: bool


KNOBS: dict[str, Knob] = {
    "n_clusters": Knob("cluster.n_clusters", "choice", True),  # C
    "m": Knob("fbta.m", "choice", True),  # M
    "k": Knob("fbta.k", "choice", True),  # K
    "lr": Knob("train.lr", "log", False),
    "extractor_lr": Knob("fbta.extractor_lr", "log", True),
    "translator_lr": Knob("fbta.translator_lr", "log", True),
}


@dataclass(frozen=True)
class Space:
    """What a trial suggests (``choices`` / ``ranges``) and what every trial gets as it is (``fixed``)."""

    choices: dict[str, list[int]]
    ranges: dict[str, tuple[float, float]]
    fixed: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {**{k: list(v) for k, v in self.choices.items()},
                **{k: {"low": lo, "high": hi, "log": True} for k, (lo, hi) in self.ranges.items()},
                **{k: {"fixed": v} for k, v in self.fixed.items()}}


def search_space(tune: Mapping[str, Any], method: str) -> Space:
    """The space of the ``tune`` section for ``train.method``; a malformed ``tune.*`` list is a ConfigError."""
    fbta = method == "fbta"
    choices: dict[str, list[int]] = {}
    ranges: dict[str, tuple[float, float]] = {}
    fixed: dict[str, Any] = {}
    for name, knob in KNOBS.items():
        values = list(tune[name])
        if not values or (knob.fbta_only and not fbta):
            continue
        if knob.kind == "choice":
            if any(int(v) != v or v < 1 for v in values):
                raise ConfigError(f"tune.{name}={values}: choices must be positive integers")
            uniq = sorted({int(v) for v in values})
            if len(uniq) == 1:
                fixed[knob.key] = uniq[0]
            else:
                choices[knob.key] = uniq
            continue
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values) or len(values) > 2:
            raise ConfigError(f"tune.{name}={values}: give [low, high] (positive, log-uniform) or one fixed value")
        if len(values) == 1 or values[0] == values[1]:
            fixed[knob.key] = float(values[0])
        elif values[0] > values[1]:
            raise ConfigError(f"tune.{name}={values}: low must be below high")
        else:
            ranges[knob.key] = (float(values[0]), float(values[1]))
    if not choices and not ranges:
        raise ConfigError(f"nothing to tune for train.method={method}: every tune.* list is empty or "
                          "has one value" + ("" if fbta else " (C, M, K and the extractor/translator rates apply "
                                             "to train.method=fbta only)"))
    return Space(choices, ranges, fixed)


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    """One trial's config values (suggested + fixed), keyed by config key."""
    values: dict[str, Any] = dict(space.fixed)
    for key, options in space.choices.items():
        values[key] = trial.suggest_categorical(key, options)
    for key, (lo, hi) in space.ranges.items():
        values[key] = trial.suggest_float(key, lo, hi, log=True)
    return values


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3}`` → ``{"train": {"lr": 1e-3}}`` (params.yaml shape)."""
    out: dict[str, Any] = {}
    for key, v in values.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def with_values(cfg: DictConfig, values: Mapping[str, Any]) -> DictConfig:
    """A read-only copy of ``cfg`` with dotted-key values merged in (validated by the schema)."""
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.create(nested(values)))
    except Exception as exc:  # noqa: BLE001 - an OmegaConf validation error
        raise ConfigError(f"tuning values {dict(values)} do not fit the schema: {str(exc).splitlines()[0]}") from None
    OmegaConf.set_readonly(merged, True)
    return merged
