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
    """Load ``source``: a named model, a folder (HF checkpoint or optin export) or a hub id."""
    named = named_models()
    if source in named:
        source = named[source].build()
    path = Path(source).expanduser()
    if path.exists():
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
            return cls.load(source)
    where = "the folder" if path.exists() else "the Hugging Face hub (offline?)"
    raise OptinError(f"no adapter handles model {source!r} (looked in {where}); installed adapters: "
                     f"{', '.join(registry.names('adapter'))}; named models: {', '.join(sorted(named)) or 'none'}")
