"""Shippable exports of a (pruned) model, for users who deploy without optin, and onnxruntime sessions for
``optin bench --onnx``.

- ONNX (``export_onnx``): the adapter's ``logits`` traced into one graph with ``torch.onnx.export(...,
  dynamo=True)`` (dynamic batch, and sequence length for token inputs), retried without the ONNX optimizer,
  with static shapes, and with the TorchScript exporter only where that fails; every file is checked with
  onnxruntime against PyTorch's outputs on a sample batch (and on its first example when the batch size is
  dynamic), and deleted if they differ by more than the tolerance. The result says which exporter was used.
- A plain Hugging Face folder (``export_hf``): ``Adapter.hf_model()``, a transformers model whose config
  states the pruned sizes, saved with ``save_pretrained``; ``from_pretrained`` loads it without optin.

onnx, onnxruntime and onnxscript are optional (``pip install 'optin[onnx]'``); without them the ONNX routes
refuse in one line.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .contracts import Adapter, Batch
from .errors import OptinError
from .registry import one_line

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
TOLERANCE = 1e-4  # max abs difference between the exported model's logits and PyTorch's
TARGETS = ("labels", "masks")  # batch entries that are targets, not model inputs
ONNX_FILE = "model.onnx"
EMBED_LIMIT = 1 << 30  # weights above this many bytes go to an external data file (ONNX's limit is 2 GB)


def onnx_missing() -> str | None:
    """Why ONNX export and onnxruntime timing cannot run here (None when they can)."""
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if not missing:
        return None
    return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: pip install 'optin[onnx]'"


def require_onnx(what: str) -> None:
    why = onnx_missing()
    if why:
        raise OptinError(f"{what} needs onnx, onnxruntime and onnxscript; {why}")


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` the model reads (every tensor but the targets), in the batch's order."""
    return {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in TARGETS}


class _Logits(nn.Module):
    """``adapter.logits`` over positional tensors (what the exporters trace)."""

    def __init__(self, adapter: Adapter, names: list[str]) -> None:
        super().__init__()
        self.adapter, self.model, self.names = adapter, adapter.model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits(dict(zip(self.names, tensors)))


def _sort_stable(self: Any, stable: Any = None, dim: int = -1, descending: bool = False) -> Any:
    """``aten.sort.stable`` as ONNX TopK over the whole axis (TopK breaks ties by position, as a stable sort
    does); the dynamo exporter has no translation of its own (ToMe's and the prune reducer's orderings)."""
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim, end=dim + 1) if dim != -1 else op.Shape(self, start=-1)
    values, indices = op.TopK(self, k, axis=dim, largest=descending, sorted=True)
    return values, indices


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: the file, the exporter that made it, whether the batch (and sequence)
    size is dynamic, the inputs' names, the largest difference from PyTorch on the sample batch, and the
    attempts that failed before it (one line each)."""

    path: str
    exporter: str
    dynamic: bool
    inputs: list[str]
    max_abs_diff: float
    failed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        shapes = "dynamic batch size" if self.dynamic else "the sample batch's fixed shapes"
        after = f"; after {len(self.failed)} failed attempt(s): {'; '.join(self.failed)}" if self.failed else ""
        return (f"{self.path} ({self.exporter} exporter, {shapes}; inputs {', '.join(self.inputs)}; max abs difference "
                f"from PyTorch {self.max_abs_diff:.2g}{after})")


def _dynamic_shapes(inputs: dict[str, torch.Tensor]) -> tuple:
    """One shared batch dimension for every input, one shared sequence dimension for token inputs."""
    from torch.export import Dim

    batch, sequence = Dim("batch"), Dim("sequence")
    return (tuple({0: batch, **({1: sequence} if x.dim() == 2 and not x.is_floating_point() else {})}
                  for x in inputs.values()),)


def _attempts(inputs: dict[str, torch.Tensor], external: bool) -> list[tuple[str, str, bool, dict]]:
    """(label, exporter, dynamic, keyword arguments of torch.onnx.export) in the order they are tried; with
    ``external`` the weights go to a ``.data`` file next to the graph (ONNX files hold at most 2 GB)."""
    names = list(inputs)
    dynamic = next(iter(inputs.values())).shape[0] > 1  # torch.export specialises a batch of one
    common = {"input_names": names, "output_names": ["logits"]}
    dynamo = {**common, "dynamo": True, "custom_translation_table": {torch.ops.aten.sort.stable: _sort_stable},
              "external_data": external}
    axes = {n: {0: "batch", **({1: "sequence"} if x.dim() == 2 and not x.is_floating_point() else {})}
            for n, x in inputs.items()}
    out = []
    if dynamic:
        out += [("dynamo, dynamic shapes", "dynamo", True, {**dynamo, "dynamic_shapes": _dynamic_shapes(inputs)}),
                ("dynamo, dynamic shapes, not optimised", "dynamo", True,
                 {**dynamo, "dynamic_shapes": _dynamic_shapes(inputs), "optimize": False})]
    torchscript = {**common, "dynamo": False, "opset_version": 17}
    out += [("dynamo, static shapes", "dynamo", False, {**dynamo, "optimize": False})]
    if dynamic:
        out += [("TorchScript, dynamic shapes", "torchscript", True, {**torchscript, "dynamic_axes": axes})]
    out += [("TorchScript, static shapes", "torchscript", False, torchscript)]
    return out


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def _session(path: str | Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    feeds = {n: inputs[n].detach().cpu().numpy() for n in names}
    return torch.from_numpy(session.run(None, feeds)[0])


def _difference(path: Path, inputs: dict[str, torch.Tensor], expected: torch.Tensor, wrapper: nn.Module,
                dynamic: bool) -> float:
    """The largest difference between the ONNX model's and PyTorch's logits on ``inputs`` (and on its first
    example alone when the batch size is dynamic)."""
    session = _session(path)
    diff = float((_run(session, inputs) - expected.cpu()).abs().max())
    if dynamic:
        one = {k: v[:1] for k, v in inputs.items()}
        with torch.no_grad():
            ref = wrapper(*one.values())
        diff = max(diff, float((_run(session, one) - ref.cpu()).abs().max()))
    return diff


def export_onnx(adapter: Adapter, batch: Batch, path: str | Path, tolerance: float = TOLERANCE) -> OnnxExport:
    """Write ``adapter``'s model as an ONNX graph at ``path`` (see the module docstring), checked with
    onnxruntime on ``batch`` (the model on the CPU in float32). Raises OptinError naming each exporter's
    failure when no file matches PyTorch within ``tolerance``; nothing is left at ``path`` then."""
    require_onnx("ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = {k: v.cpu() for k, v in model_inputs(batch).items()}
    if not inputs:
        raise OptinError(f"adapter {adapter.name!r}: the sample batch has no input tensors to export with")
    adapter.model.cpu().float().eval()
    wrapper = _Logits(adapter, list(inputs)).eval()
    with torch.no_grad():
        expected = wrapper(*inputs.values())
    failed: list[str] = []
    conversion_failed = False
    external = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) > EMBED_LIMIT
    for label, exporter, dynamic, kwargs in _attempts(inputs, external):
        if conversion_failed and label.endswith("not optimised"):
            continue  # the same conversion without the optimiser fails the same way
        _remove(path)
        try:
            with _quiet():
                torch.onnx.export(wrapper, tuple(inputs.values()), str(path), **kwargs)
            diff = _difference(path, inputs, expected, wrapper, dynamic)
        except Exception as exc:  # noqa: BLE001 - every exporter failure is reported, then the next is tried
            conversion_failed = label.startswith("dynamo, dynamic")
            failed.append(f"{label}: {_reason(exc)}")
            continue
        if diff <= tolerance:
            return OnnxExport(str(path), exporter, dynamic, list(inputs), diff, failed)
        failed.append(f"{label}: outputs differ from PyTorch's by {diff:.2g}")
    _remove(path)
    raise OptinError(f"adapter {adapter.name!r}: the model does not export to ONNX with outputs within {tolerance:g} "
                     f"of PyTorch's ({'; '.join(failed)}); use the optin folder (optin.load_pruned) instead")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines, warnings and graph dumps (some printed by C++ straight to the file
    descriptors) kept off the user's screen."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _reason(exc: BaseException) -> str:
    """The useful line of an exporter's error (its exception summary when it has one)."""
    text = str(exc)
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
        text = text.split("⬆️", 1)[0].split("(Refer to", 1)[0]
    return one_line(RuntimeError(" ".join(text.split()) or type(exc).__name__), 160)


def export_hf(adapter: Adapter, batch: Batch, directory: str | Path, tolerance: float = TOLERANCE,
              before_writing: Callable[[], None] = lambda: None) -> dict:
    """Write ``adapter.hf_model()`` with ``save_pretrained`` (and the tokenizer or image processor) into
    ``directory``, after checking that it computes the adapter's logits on ``batch`` (``before_writing`` runs
    once the check passed, e.g. to remove an earlier export). Returns what was written: the path, the model
    class, the unit counts its config states, the difference from the pruned model."""
    plain = adapter.hf_model()
    inputs = model_inputs(batch)
    twin = type(adapter)(plain, adapter.processor)  # the same adapter around the plain model: the same inputs
    with torch.no_grad():
        expected, got = adapter.logits(dict(inputs)), twin.logits(dict(inputs))
    diff = float((got - expected).abs().max())
    if diff > tolerance:
        raise OptinError(f"adapter {adapter.name!r}: the plain Hugging Face model differs from the pruned one by "
                         f"{diff:.2g} on the sample batch; export with --format onnx")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on the user's screen
    before_writing()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain.config.architectures = [type(plain).__name__]
    plain.save_pretrained(directory)
    adapter.save_extras(str(directory))
    return {"path": str(directory), "model_class": type(plain).__name__, "max_abs_diff": diff,
            "unit_counts": adapter.unit_counts()}


def sample_batch(adapter: Adapter, source: str, task: str | None, data: str | None, batch_size: int) -> Batch:
    """``batch_size`` test examples of the task to trace and check an export with: ``task``/``data``, else the
    task a named model or the pruned model's plan records."""
    from .export import PLAN
    from .recipe import batches_of, resolve_task
    from .tasks import known_tasks, sample

    if task is None and data is None:
        plan = Path(source) / PLAN
        try:
            recorded = (json.loads(plan.read_text()).get("info") or {}).get("task") if plan.is_file() else None
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded in known_tasks():
            task = recorded
    try:
        the_task = resolve_task(task, data, source)
    except OptinError:
        raise OptinError("pass --task NAME or --data FILE: the export is traced and checked on a few of their "
                         "examples (the model's plan records no built-in task)") from None
    the_task.prepare(adapter, source)
    examples = sample(the_task.examples("test"), batch_size, 0)
    if not examples:
        raise OptinError(f"task {the_task.name!r} has no test examples to trace the export with")
    return batches_of(adapter, examples, batch_size)[0]


# --- onnxruntime timing (optin bench --onnx) ----------------------------------------------------------

def cached_onnx(adapter: Adapter, batch: Batch, where: Path) -> tuple[Callable[[], object], OnnxExport]:
    """An onnxruntime call of ``adapter``'s model on ``batch``, exported once to ``where`` (reused while its
    record, ``where.json``, says it was made from the same weights and input shapes and it still matches
    PyTorch on this batch). Returns the call and the export."""
    record = where.with_name(where.name + ".json")
    key = _cache_key(adapter, batch)
    export = None
    if where.is_file() and record.is_file():
        try:
            saved = json.loads(record.read_text())
            export = OnnxExport(**saved["export"]) if saved.get("key") == key else None
        except (OSError, ValueError, TypeError, KeyError):
            export = None
    inputs = {k: v.cpu() for k, v in model_inputs(batch).items()}
    if export is not None:
        wrapper = _Logits(adapter, list(inputs)).eval()
        with torch.no_grad():
            expected = wrapper(*inputs.values())
        try:
            ok = _difference(where, inputs, expected, wrapper, False) <= TOLERANCE
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            ok = False
        export = export if ok else None
    if export is None:
        export = export_onnx(adapter, batch, where)
        record.write_text(json.dumps({"key": key, "export": asdict(export)}, indent=2))
    session = _session(where)
    names = [i.name for i in session.get_inputs()]
    feeds = {n: inputs[n].numpy() for n in names}
    return (lambda: session.run(None, feeds)), export


def _cache_key(adapter: Adapter, batch: Batch) -> dict:
    """What a cached ONNX file depends on: the parameters (a cheap fingerprint), the input shapes, torch."""
    total = 0.0
    for p in adapter.model.parameters():
        total += float(p.detach().double().sum())
    return {"adapter": adapter.name, "parameters": sum(p.numel() for p in adapter.model.parameters()),
            "sum": round(total, 6), "inputs": {k: list(v.shape) for k, v in model_inputs(batch).items()},
            "torch": torch.__version__}


def onnx_cache_path(source: str, folder: str | Path | None, cache: Path) -> Path:
    """Where ``optin bench --onnx`` keeps a model's ONNX file: next to the model (``FOLDER/model.onnx``) when it
    is a folder we may write to, else in ``cache`` under a name made from the source."""
    if folder is not None:
        folder = Path(folder)
        if folder.is_dir():
            probe = folder / ".optin-write-test"
            try:
                probe.touch()
                probe.unlink()
                return folder / ONNX_FILE
            except OSError:
                pass
    import hashlib

    name = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return cache / "onnx" / name / ONNX_FILE


def clear(path: Path) -> None:
    """Remove an earlier export at ``path`` (a file and its external data, or a folder)."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        _remove(path)


def export_onnx_to(adapter: Adapter, batch: Batch, path: Path, tolerance: float = TOLERANCE) -> OnnxExport:
    """``export_onnx`` into a staging folder next to ``path``, moved to ``path`` (replacing what is there) only
    once it passed: a failed export leaves an earlier file as it was."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".optin-export-") as tmp:
        result = export_onnx(adapter, batch, Path(tmp) / path.name, tolerance)
        clear(path)
        for made in Path(tmp).iterdir():  # the graph and, for large models, its external data file
            made.replace(path.parent / made.name)
    result.path = str(path)
    return result
