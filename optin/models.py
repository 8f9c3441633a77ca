"""Resolving ``--model`` into an adapter: a named model, a local folder, a pruned export or a hub id."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from . import registry
from .contracts import Adapter
from .errors import OptinError
from .export import is_pruned_dir, load_pruned
from .hooks import collect
from .registry import one_line
from .safety import refuse_remote_code


@dataclass
class NamedModel:
    """A model known by name (``--model NAME``). ``build()`` returns a local folder, building and
    caching it on first use (e.g. fine-tuning shipped weights on a shipped task)."""

    name: str
    description: str
    task: str
    build: Callable[[], str]
    defaults: dict = field(default_factory=dict)  # CLI flag defaults for this model (user flags win)


def cache_dir() -> Path:
    """Where built models and data caches live: ``$OPTIN_CACHE`` or ``~/.cache/optin``."""
    return Path(os.environ.get("OPTIN_CACHE", Path.home() / ".cache" / "optin"))


def named_models() -> dict[str, NamedModel]:
    return collect("optin_models")


def adapter_for(model: nn.Module, name: str | None = None) -> type[Adapter]:
    """The adapter class for an in-memory model (``name`` forces one)."""
    if name:
        cls = registry.get("adapter", name)
        if not cls.handles(model):
            raise OptinError(f"adapter {name!r} does not handle {type(model).__name__}")
        return cls
    for info in registry.plugins("adapter"):
        if info.available:
            cls = registry.get("adapter", info.name)
            if cls.handles(model):
                return cls
    raise OptinError(f"no adapter handles {type(model).__name__}; installed adapters: "
                     f"{', '.join(registry.names('adapter'))}. Write one (see CONTRIBUTING.md) or pass --adapter")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".safetensors", ".bin", ".pt", ".json"))


def load_model(source: str, adapter: str | None = None) -> Adapter:
    """Load ``source``: a named model, a folder (HF checkpoint or optin export) or a hub id.

    A folder that asks to run its own code is refused; an adapter's loading failure (truncated weights, a
    config that does not match them) is an OptinError naming the adapter and the file."""
    named = named_models()
    if source in named:
        source = named[source].build()
    path = Path(source).expanduser()
    if path.exists():
        refuse_remote_code(path)
        if is_pruned_dir(path):
            return load_pruned(path)
        source = str(path)
    elif _looks_like_path(source):
        raise OptinError(f"model path {source!r} does not exist; pass a folder with config.json, an optin "
                         f"output folder, or a named model ({', '.join(sorted(named)) or 'none installed'})")
    candidates = [adapter] if adapter else [i.name for i in registry.plugins("adapter") if i.available]
    for name in candidates:
        cls = registry.get("adapter", name)
        if cls.claims(source):
            return load_with(cls, source)
    where = f"the folder ({folder_summary(path)})" if path.exists() else "the Hugging Face hub (offline?)"
    raise OptinError(f"no adapter handles model {source!r} (looked in {where}); installed adapters: "
                     f"{adapter_coverage()}; named models: {', '.join(sorted(named)) or 'none'}")


def load_with(cls: type[Adapter], source: str, **kwargs: object) -> Adapter:
    """``cls.load(source)`` with any failure of the underlying libraries turned into one OptinError."""
    try:
        return cls.load(source, **kwargs)
    except OptinError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model folder is user input: whatever breaks is bad input
        raise OptinError(f"adapter {cls.name!r} cannot load model {source!r}: {type(exc).__name__}: "
                         f"{one_line(exc, 240)}; check that the folder is complete and its weights belong to its "
                         "config (re-save or re-download it)") from None


def folder_summary(path: Path) -> str:
    """What a model folder says it is: its config's model_type and architectures (for error messages)."""
    import json

    cfg = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return "no readable config.json"
    if not isinstance(data, dict):
        return "config.json is not a JSON object"
    found = [f"{k} {data[k]!r}" for k in ("model_type", "timm_class", "architecture") if data.get(k)]
    archs = data.get("architectures")
    if isinstance(archs, list) and archs:
        found.append("architectures " + ", ".join(map(str, archs[:3])))
    return "config.json: " + ("; ".join(found) if found else "no model_type")


def adapter_coverage() -> str:
    """Every installed adapter with what it loads (``Adapter.sources``, else its summary)."""
    out = []
    for info in registry.plugins("adapter"):
        if not info.available:
            out.append(f"{info.name} (unavailable: {info.error})")
            continue
        covers = getattr(registry.get("adapter", info.name), "sources", "") or info.summary
        out.append(f"{info.name} ({covers})" if covers else info.name)
    return "; ".join(out)
