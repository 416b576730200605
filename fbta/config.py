"""Loading the configuration: the schema (fbta/schema.py) ← ``params.yaml`` ← ``key=value`` overrides.

Every mismatch — an unknown key (with the nearest one suggested), a value of the
wrong type or outside a :class:`~fbta.schema.Choice` — becomes one ``ConfigError``
line naming the file or override, the key and the problem.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fbta.schema import Config


SCALED_DECODE_ENV = "FBTA_SCALED_DECODE"  # extract.scaled_decode, for fbta.slides.reader.open_slide


class ConfigError(ValueError):
    """A params file or override that does not fit the schema (exit code 2)."""


class InputError(ValueError):
    """A stage input that cannot be used — no trained model, an unreachable tracking store (exit code 2).

    Defined here, beside ConfigError, so the CLI can catch it without importing torch or mlflow.
    """


def suggest_key(key: str) -> Optional[str]:
    """The schema key nearest to a mistyped dotted ``key``, mended part by part (None: nothing close).

    Why part by part: ``trian.lr`` and ``train.lrr`` should both lead to
    ``train.lr``, and a whole-string match would prefer any short key.
    """
    node: Any = OmegaConf.to_container(OmegaConf.structured(Config))
    mended = []
    for part in key.split("."):
        if not isinstance(node, dict) or not node:
            return None
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
            if not close:
                return None
            part = close[0]
        mended.append(part)
        node = node[part]
    fixed = ".".join(mended)
    return fixed if fixed != key else None


def _one_line(exc: OmegaConfBaseException, source: str, key_hint: str = "") -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0].strip()
    if "Key '" in msg and "not in" in msg:
        key = key_hint if key_hint.startswith(key) else key  # an override names the whole key it meant
        near = suggest_key(key)
        return f"{source}: unknown key '{key}'" + (f" (did you mean '{near}'?)" if near else "")
    choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if key and choice:  # a Choice field (fbta/choices.py)
        return f"{source}: {key}='{choice.group(1)}' must be one of {choice.group(2)}"
    if key:
        return f"{source}: bad value for '{key}': {msg}"
    return f"{source}: {msg}"


def _first_leaf(tree: Any, key: str) -> str:
    """``trian`` → ``trian.lr``: a mistyped section is reported with the first key under it."""
    node = OmegaConf.select(tree, key, default=None) if key else None
    while isinstance(node, DictConfig) and len(node):
        first = next(iter(node))
        key, node = f"{key}.{first}", node[first]
    return key


def load_config(params: str | Path | None = "params.yaml", overrides: Sequence[str] = ()) -> DictConfig:
    """Schema ← params.yaml ← ``key=value`` overrides; raise ConfigError on any mismatch."""
    cfg: DictConfig = OmegaConf.structured(Config)
    if params is not None:
        path = Path(params)
        if path.exists():
            try:
                loaded = OmegaConf.load(path)
            except Exception as exc:  # yaml syntax
                raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
            try:
                cfg = OmegaConf.merge(cfg, loaded)
            except OmegaConfBaseException as exc:
                raise ConfigError(_one_line(exc, str(path), _first_leaf(loaded, getattr(exc, "full_key", "")))) from exc
        elif str(params) != "params.yaml":
            raise ConfigError(f"{path}: params file not found")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, f"override '{item}'", item.split("=", 1)[0].strip())) from exc
    _refuse_env(OmegaConf.to_container(cfg, resolve=False), "")
    OmegaConf.set_readonly(cfg, True)
    # every patch reader — DataLoader workers forked or spawned, per-slide task processes — reads the
    # switch from the environment (fbta.slides.reader), so the config's value is exported there
    os.environ[SCALED_DECODE_ENV] = "1" if cfg.extract.scaled_decode else "0"
    return cfg


def _refuse_env(node: Any, key: str) -> None:
    """No ``${oc.env:…}``: every value is logged to MLflow and saved beside outputs, so an environment
    secret interpolated into params would be copied there; tools read their own variables instead."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_env(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_env(v, f"{key}[{i}]")
    elif isinstance(node, str) and "oc.env" in node:
        raise ConfigError(f"'{key}': ${{oc.env:…}} is not allowed (params are logged to MLflow and saved with "
                          "outputs); let the tool read its own environment variable, e.g. MLFLOW_TRACKING_PASSWORD")


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config beside a stage's outputs, atomically."""
    from fbta.io.atomic import atomic_write_text

    atomic_write_text(Path(path), OmegaConf.to_yaml(cfg, resolve=True))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
