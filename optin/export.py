"""Saving and loading pruned models: safetensors weights + a JSON plan. No pickled modules."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import registry
from .contracts import Adapter
from .errors import OptinError
from .safety import refuse_remote_code

PLAN = "optin-plan.json"
WEIGHTS = "model.safetensors"
FORMAT = "optin-pruned/1"


def save_pruned(adapter: Adapter, directory: str | Path, info: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``optin-plan.json`` (and adapter extras such as a tokenizer)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in adapter.model.state_dict().items()}
    save_file(_untie(state), str(directory / WEIGHTS))
    plan = {"format": FORMAT, "adapter": adapter.name, "plan": adapter.plan(),
            "unit_counts": adapter.unit_counts(), "info": info or {}}
    (directory / PLAN).write_text(json.dumps(plan, indent=2))
    adapter.save_extras(str(directory))
    return directory


def _untie(state: dict) -> dict:
    """safetensors refuses shared storage: give tied tensors (e.g. decoder = embeddings) their own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def is_pruned_dir(path: str | Path) -> bool:
    return (Path(path) / PLAN).is_file()


def load_pruned(directory: str | Path) -> Adapter:
    """Rebuild the pruned architecture from its plan and load its weights (original weights not needed)."""
    directory = Path(directory)
    refuse_remote_code(directory)
    try:
        plan = json.loads((directory / PLAN).read_text())
    except (OSError, ValueError) as exc:
        raise OptinError(f"cannot read {directory / PLAN}: {exc}") from exc
    if plan.get("format") != FORMAT:
        raise OptinError(f"{directory / PLAN} is not an optin plan (format {plan.get('format')!r})")
    adapter_cls = registry.get("adapter", plan["adapter"])
    adapter = adapter_cls.rebuild(plan["plan"], str(directory))
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise OptinError(f"cannot read weights {directory / WEIGHTS}: {exc}") from exc
    missing, unexpected = adapter.model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _is_tied(adapter, m)]
    if missing or unexpected:
        raise OptinError(f"{directory} does not match its plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    adapter.model.eval()
    return adapter


def _is_tied(adapter: Adapter, key: str) -> bool:
    keys = getattr(adapter.model, "_tied_weights_keys", None) or {}
    return key in keys
