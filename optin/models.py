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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((*WEIGHT_SUFFIXES, ".json"))


def takes_checkpoint(cls: type[Adapter]) -> bool:
    """Whether an adapter's ``load`` takes a separate weights file (``checkpoint=``)."""
    import inspect

    try:
        return "checkpoint" in inspect.signature(cls.load).parameters
    except (TypeError, ValueError):
        return False


def load_model(source: str, adapter: str | None = None, checkpoint: str | None = None) -> Adapter:
    """Load ``source``: a named model, a folder (HF checkpoint or optin export) or a hub id; ``checkpoint``
    is a weights file for an architecture named without weights (``timm:NAME``).

    A folder that asks to run its own code is refused; an adapter's loading failure (truncated weights, a
    config that does not match them) is an OptinError naming the adapter and the file."""
    named = named_models()
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise OptinError(f"checkpoint {checkpoint!r} is not a file; pass the weights file (a state dict: "
                         ".safetensors, .pth or .bin) of the architecture given with --model timm:NAME")
    if source in named:
        if checkpoint is not None:
            raise OptinError(f"--checkpoint does not apply to the named model {source!r}, which has its weights; "
                             "pass --model timm:NAME --checkpoint FILE")
        source = named[source].build()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
        raise OptinError(f"{source!r} is a weights file, which does not say which architecture it belongs to; pass "
                         f"--model timm:ARCHITECTURE --checkpoint {source} (a timm state dict), or a model folder "
                         "with config.json (e.g. written by timm.models.save_for_hf or save_pretrained)")
    if path.exists():
        refuse_remote_code(path)
        if is_pruned_dir(path):
            if checkpoint is not None:
                raise OptinError(f"--checkpoint does not apply to {source!r}, a pruned optin output with its weights")
            return load_pruned(path)
        source = str(path)
    elif _looks_like_path(source):
        raise OptinError(f"model path {source!r} does not exist; pass a folder with config.json, an optin "
                         f"output folder, or a named model ({', '.join(sorted(named)) or 'none installed'})")
    candidates = [adapter] if adapter else [i.name for i in registry.plugins("adapter") if i.available]
    for name in candidates:
        cls = registry.get("adapter", name)
        if cls.claims(source):
            if checkpoint is None:
                return load_with(cls, source)
            if not takes_checkpoint(cls):
                takers = [i.name for i in registry.plugins("adapter")
                          if i.available and takes_checkpoint(registry.get("adapter", i.name))]
                raise OptinError(f"adapter {cls.name!r} loads {source!r} with its own weights and takes no --checkpoint; "
                                 f"--checkpoint is for architectures named without weights (adapters: "
                                 f"{', '.join(takers) or 'none'}, e.g. --model timm:NAME)")
            return load_with(cls, source, checkpoint=str(Path(checkpoint).expanduser()))
    where = f"the folder ({folder_summary(path)})" if path.exists() else "the Hugging Face hub (offline?)"
    if adapter:  # a forced adapter that does not load it: say what it loads and which adapters do load it
        others = [i.name for i in registry.plugins("adapter")
                  if i.available and i.name != adapter and registry.get("adapter", i.name).claims(source)]
        loads = getattr(registry.get("adapter", adapter), "sources", "") or "see `optin list`"
        raise OptinError(f"adapter {adapter!r} (--adapter) does not load model {source!r} (looked in {where}); it "
                         f"loads {loads}; " + (f"adapters that load it: {', '.join(others)} (drop --adapter)"
                                               if others else f"no installed adapter loads it: {adapter_coverage()}"))
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
