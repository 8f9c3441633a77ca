"""Saved parameter rankings: importance scores on disk, tied to the model they were computed on.

A scores file is a safetensors file with one tensor per ``kind.layer`` and metadata (format, adapter,
model fingerprint, scorer and its options). A partial file (``Checkpoint``) lets an interrupted scoring
run resume where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .errors import ScoresMismatchError
from .units import UnitTensors

FORMAT = "optin-scores/1"


def fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameter names, shapes and values: equal only for the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if p.numel() else b"")
    return h.hexdigest()[:32]


@dataclass
class Scores:
    values: UnitTensors
    adapter: str
    fingerprint: str
    scorer: str
    options: dict = field(default_factory=dict)
    extras: dict[str, UnitTensors] = field(default_factory=dict)  # e.g. trajectory components md/kd
    scale: str = "global"  # what the values can be compared with (optin.contracts.Scorer.scale)

    def save(self, path: str | os.PathLike) -> None:
        tensors = {}
        for prefix, units in [("score", self.values), *self.extras.items()]:
            for kind, layers in units.items():
                for i, t in enumerate(layers):
                    tensors[f"{prefix}/{kind}.{i}"] = t.detach().float().contiguous()
        meta = {"format": FORMAT, "adapter": self.adapter, "fingerprint": self.fingerprint,
                "scorer": self.scorer, "options": json.dumps(self.options, sort_keys=True), "scale": self.scale}
        _atomic_save(tensors, meta, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        path = Path(path)
        if not path.is_file():
            raise ScoresMismatchError(f"scores file {str(path)!r} does not exist; create it with `optin score`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ScoresMismatchError(
                f"scores file {str(path)!r} is corrupt or not a safetensors file ({exc}); "
                "recompute it with `optin score`") from exc
        if meta.get("format") != FORMAT:
            raise ScoresMismatchError(
                f"{str(path)!r} is not an optin scores file (format {meta.get('format')!r}, expected {FORMAT!r})")
        groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        for key, t in tensors.items():
            prefix, _, rest = key.partition("/")
            kind, _, layer = rest.rpartition(".")
            groups.setdefault(prefix, {}).setdefault(kind, {})[int(layer)] = t
        units = {p: {k: [d[i] for i in sorted(d)] for k, d in g.items()} for p, g in groups.items()}
        return cls(values=units.pop("score", {}), adapter=meta["adapter"], fingerprint=meta["fingerprint"],
                   scorer=meta["scorer"], options=json.loads(meta.get("options", "{}")), extras=units,
                   scale=meta.get("scale", "global"))

    def check_matches(self, adapter_name: str, model_fingerprint: str, counts: dict[str, list[int]],
                      source: str = "the scores file") -> None:
        """Refuse scores computed on another model (different adapter, shapes or weights)."""
        if self.adapter != adapter_name:
            raise ScoresMismatchError(
                f"{source} was computed with adapter {self.adapter!r}, but this model uses {adapter_name!r}; "
                "rescore this model with `optin score`")
        mine = {k: [int(t.numel()) for t in v] for k, v in self.values.items()}
        if mine != {k: counts[k] for k in mine} or set(mine) - set(counts):
            raise ScoresMismatchError(
                f"{source} has units {mine} but the model has {counts}: it belongs to another model; "
                "rescore this model with `optin score`")
        if self.fingerprint != model_fingerprint:
            raise ScoresMismatchError(
                f"{source} was computed on other weights (fingerprint {self.fingerprint} != "
                f"{model_fingerprint}); rescore this model with `optin score`")


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


class Checkpoint:
    """Resumable store of partial scoring results, keyed by strings, valid for one exact job.

    ``job`` identifies the work (model fingerprint, scorer, options, calibration data); a file left by
    another job is ignored (and later overwritten) so stale partial results are never mixed in.
    """

    def __init__(self, path: str | os.PathLike, job: dict) -> None:
        self.path = Path(path)
        self.job = json.dumps(job, sort_keys=True)
        self.data: dict[str, torch.Tensor] = {}
        self.resumed = 0
        if self.path.is_file():
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    same = (f.metadata() or {}).get("job") == self.job
                if same:
                    self.data = load_file(str(self.path))
                    self.resumed = len(self.data)
            except (SafetensorError, OSError, ValueError):
                self.data = {}  # an unreadable partial file (e.g. killed mid-write) is recomputed

    def get(self, key: str) -> torch.Tensor | None:
        return self.data.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.data[key] = value.detach().float().contiguous().clone()
        _atomic_save(self.data, {"job": self.job}, self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
