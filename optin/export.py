"""Saving and loading pruned models: safetensors weights + a JSON plan. No pickled modules.

Loading treats the folder as hostile: the plan's structure is checked, the architecture is first rebuilt on
PyTorch's ``meta`` device (no memory, no initialisation) where the adapters' rebuild helpers support it
(``rebuild_device``, ``check_layer_count``), and its tensor shapes are compared with the weights file's
header before anything real is allocated. A plan that declares a million layers or a 10^11-token vocabulary
fails in well under a second with one line.
"""
from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from safetensors import SafetensorError, safe_open
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


@dataclass(frozen=True)
class RebuildLimits:
    """What a rebuild may build, known from the weights file before anything is allocated."""

    tensors: int  # tensors in the weights file: a model has fewer layers than that
    meta: bool  # a checking pass: build on the meta device


_LIMITS: ContextVar[RebuildLimits | None] = ContextVar("optin_rebuild_limits", default=None)


def rebuild_limits() -> RebuildLimits | None:
    """The limits of the ``rebuild`` in progress (None outside ``load_pruned``)."""
    return _LIMITS.get()


def rebuild_device() -> Any:
    """Context for constructing a model inside ``Adapter.rebuild``: the ``meta`` device during
    ``load_pruned``'s checking pass (shapes without memory), else nothing changes."""
    limits = _LIMITS.get()
    return torch.device("meta") if limits is not None and limits.meta else nullcontext()


def check_layer_count(n: int, what: str) -> None:
    """Inside ``rebuild``: refuse a plan declaring more layers (``what``: e.g. "num_hidden_layers") than the
    weights file has tensors, before building them."""
    limits = _LIMITS.get()
    if limits is not None and n > limits.tensors:
        raise OptinError(f"the plan declares {what} = {n}, but the weights file holds only {limits.tensors} tensors; "
                         "the plan is damaged or belongs to another model: re-export the pruned model")


@contextmanager
def _limits(limits: RebuildLimits) -> Iterator[None]:
    token = _LIMITS.set(limits)
    try:
        yield
    finally:
        _LIMITS.reset(token)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's header (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise OptinError(f"cannot read weights {path}: {' '.join(str(exc).split())}; the file is damaged: "
                         "re-save it") from None


def _read_plan(directory: Path) -> dict:
    where = directory / PLAN
    try:
        plan = json.loads(where.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise OptinError(f"cannot read {where}: {' '.join(str(exc).split())}") from None
    if not isinstance(plan, dict):
        raise OptinError(f"{where} must be a JSON object, got a {type(plan).__name__}; re-export the pruned model")
    if plan.get("format") != FORMAT:
        raise OptinError(f"{where} is not an optin plan (format {plan.get('format')!r}, expected {FORMAT!r})")
    for key, kind in (("adapter", str), ("plan", dict), ("unit_counts", dict)):
        if not isinstance(plan.get(key), kind):
            got = "missing" if key not in plan else f"a {type(plan[key]).__name__}"
            raise OptinError(f"{where}: '{key}' must be a {'mapping' if kind is dict else 'string'}, got {got}; "
                             "the plan is damaged: re-export the pruned model")
    for kind, counts in plan["unit_counts"].items():
        if not isinstance(counts, list) or not all(type(n) is int and n >= 0 for n in counts):
            raise OptinError(f"{where}: unit_counts[{kind!r}] must be a list of unit counts >= 0 per layer, got "
                             f"{str(counts)[:80]}; the plan is damaged: re-export the pruned model")
    return plan


def _rebuild(adapter_cls: type[Adapter], plan: dict, directory: Path) -> Adapter:
    try:
        return adapter_cls.rebuild(plan["plan"], str(directory))
    except OptinError:
        raise
    except Exception as exc:  # noqa: BLE001 - the plan is user input: whatever breaks is bad input
        raise OptinError(f"cannot rebuild the pruned model from {directory / PLAN} (adapter {adapter_cls.name!r}): "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}; the plan is damaged or "
                         "comes from another optin version: re-export the pruned model") from None


def _check_against(adapter: Adapter, plan: dict, shapes: dict[str, tuple[int, ...]], directory: Path) -> None:
    """The rebuilt architecture must have the plan's unit counts and exactly the file's tensor shapes."""
    counts = adapter.unit_counts()
    for kind, want in plan["unit_counts"].items():
        if counts.get(kind) != want:
            raise OptinError(f"{directory / PLAN}: unit_counts[{kind!r}] is {str(want)[:80]} but the plan's "
                             f"architecture has {str(counts.get(kind))[:80]}; re-export the pruned model")
    differ = shape_differences(adapter.model, shapes, lambda k: _is_tied(adapter, k), "plan")
    if differ:
        raise OptinError(f"{directory} does not match its plan: {differ}; the plan or the weights were changed: "
                         "re-export the pruned model")


def shape_differences(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]],
                      optional: Any = lambda key: False, ours: str = "model") -> str | None:
    """How ``model``'s state dict differs from a weights file's ``shapes`` in a few words (None: identical);
    ``optional(key)`` marks tensors the file may leave out (tied weights)."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in mine if k not in shapes and not optional(k)]
    unexpected = [k for k in shapes if k not in mine]
    differ = [f"{k}: {ours} {mine[k]}, file {shapes[k]}" for k in mine if k in shapes and mine[k] != shapes[k]]
    parts = [f"{len(differ)} tensors of other shapes (e.g. {'; '.join(differ[:2])})" if differ else "",
             f"{len(missing)} missing (e.g. {', '.join(missing[:2])})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else ""]
    return ", ".join(p for p in parts if p) or None


def load_pruned(directory: str | Path) -> Adapter:
    """Rebuild the pruned architecture from its plan and load its weights (original weights not needed).

    Nothing is allocated before the plan is known to match the weights file (see the module docstring)."""
    directory = Path(directory)
    refuse_remote_code(directory)
    plan = _read_plan(directory)
    shapes = weight_shapes(directory / WEIGHTS)
    longest = max((len(v) for v in plan["unit_counts"].values()), default=0)
    if longest > len(shapes):
        raise OptinError(f"{directory / PLAN}: unit_counts lists {longest} layers but the weights file holds only "
                         f"{len(shapes)} tensors; the plan is damaged: re-export the pruned model")
    adapter_cls = registry.get("adapter", plan["adapter"])
    with _limits(RebuildLimits(tensors=len(shapes), meta=True)):
        probe = _rebuild(adapter_cls, plan, directory)
    _check_against(probe, plan, shapes, directory)
    if any(t.is_meta for t in probe.model.state_dict().values()):
        with _limits(RebuildLimits(tensors=len(shapes), meta=False)):
            adapter = _rebuild(adapter_cls, plan, directory)
    else:  # an adapter that built a real model in the checking pass: use it
        adapter = probe
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise OptinError(f"cannot read weights {directory / WEIGHTS}: {' '.join(str(exc).split())}") from None
    missing, unexpected = adapter.model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _is_tied(adapter, m)]
    if missing or unexpected:
        raise OptinError(f"{directory} does not match its plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    adapter.model.eval()
    return adapter


def _is_tied(adapter: Adapter, key: str) -> bool:
    keys = getattr(adapter.model, "_tied_weights_keys", None) or {}
    return key in keys
