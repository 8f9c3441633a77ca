"""Saved parameter rankings: importance scores on disk, tied to the model they were computed on.

A scores file is a safetensors file with one tensor per ``kind.layer`` and metadata (format, adapter,
model fingerprint, scorer and its options). A partial file (``Checkpoint``) lets an interrupted scoring
run resume where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from safetensors import safe_open

from .contracts import SCALES
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


# A tensor name in a scores file: ``prefix/kind.layer`` (e.g. ``score/heads.3``, ``md/neurons.0``).
_NAME = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9_]{0,31})/(?P<kind>[A-Za-z][A-Za-z0-9_-]{0,31})"
                   r"\.(?P<layer>0|[1-9][0-9]{0,5})")
_FIX = "recompute it with `optin score`"


def check_unit_tensors(units: UnitTensors, source: str, fix: str = _FIX) -> None:
    """Scores must be one finite 1-D float tensor per layer (``source`` names where they came from, ``fix``
    what to do about it)."""
    for kind, layers in units.items():
        for i, t in enumerate(layers):
            if not torch.is_tensor(t) or t.dim() != 1 or not t.is_floating_point():
                shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ScoresMismatchError(f"{source}: {kind} of layer {i} must be a 1-D float tensor (one score per "
                                          f"unit), got {shape}; {fix}")
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ScoresMismatchError(f"{source}: {bad} of the {t.numel()} {kind} scores of layer {i} are NaN or "
                                          f"infinite (a search on them would remove arbitrary units); {fix}")


@dataclass
class Scores:
    values: UnitTensors
    adapter: str
    fingerprint: str
    scorer: str
    options: dict = field(default_factory=dict)
    extras: dict[str, UnitTensors] = field(default_factory=dict)  # e.g. trajectory components md/kd
    scale: str = "global"  # what the values can be compared with (optin.contracts.Scorer.scale)
    seed: int | None = None  # the run's seed (calibration sample, random scorers)
    calibration_examples: int | None = None  # how many examples the scores were computed on

    def save(self, path: str | os.PathLike) -> None:
        check_unit_tensors(self.values, "scores to save")
        tensors = {}
        for prefix, units in [("score", self.values), *self.extras.items()]:
            for kind, layers in units.items():
                for i, t in enumerate(layers):
                    tensors[f"{prefix}/{kind}.{i}"] = t.detach().float().contiguous()
        meta = {"format": FORMAT, "adapter": self.adapter, "fingerprint": self.fingerprint,
                "scorer": self.scorer, "options": json.dumps(self.options, sort_keys=True), "scale": self.scale}
        for key in ("seed", "calibration_examples"):
            if getattr(self, key) is not None:
                meta[key] = str(int(getattr(self, key)))
        _atomic_save(tensors, meta, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        """Read and validate a scores file: tensor names, shapes, finite values and metadata are checked,
        so a damaged or hand-made file is refused in one line instead of steering the search."""
        path = Path(path)
        where = f"scores file {str(path)!r}"
        if not path.is_file():
            raise ScoresMismatchError(f"{where} does not exist; create it with `optin score`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ScoresMismatchError(
                f"{where} is corrupt or not a safetensors file ({' '.join(str(exc).split())}); {_FIX}") from None
        if meta.get("format") != FORMAT:
            raise ScoresMismatchError(
                f"{where} is not an optin scores file (format {meta.get('format')!r}, expected {FORMAT!r})")
        missing = [k for k in ("adapter", "fingerprint", "scorer") if not meta.get(k)]
        if missing:
            raise ScoresMismatchError(f"{where} lacks the metadata {', '.join(missing)}; {_FIX}")
        try:
            options = json.loads(meta.get("options", "{}"))
        except ValueError:
            options = None
        if not isinstance(options, dict):
            raise ScoresMismatchError(f"{where} has options metadata that is not a JSON object; {_FIX}")
        scale = meta.get("scale", "global")
        if scale not in SCALES:
            raise ScoresMismatchError(f"{where} has an unknown scale {scale!r} (known: {', '.join(SCALES)}); {_FIX}")
        groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        for key, t in tensors.items():
            m = _NAME.fullmatch(key)
            if m is None:
                shown = key if len(key) <= 60 else key[:57] + "..."
                raise ScoresMismatchError(f"{where} holds a tensor named {shown!r}; names are prefix/kind.layer "
                                          f"(e.g. score/heads.0); {_FIX}")
            groups.setdefault(m["prefix"], {}).setdefault(m["kind"], {})[int(m["layer"])] = t
        units: dict[str, UnitTensors] = {}
        for prefix, kinds in groups.items():
            for kind, layers in kinds.items():
                if sorted(layers) != list(range(len(layers))):
                    raise ScoresMismatchError(f"{where}: the {prefix}/{kind} layers are {sorted(layers)[:8]}, not "
                                              f"0..{len(layers) - 1}; {_FIX}")
            units[prefix] = {k: [d[i] for i in range(len(d))] for k, d in kinds.items()}
            check_unit_tensors(units[prefix], where)
        values = units.pop("score", {})
        if not values and not (units.get("tokens") or {}).get("tokens"):
            raise ScoresMismatchError(f"{where} holds no scores (no score/KIND.LAYER tensors); {_FIX}")
        return cls(values=values, adapter=meta["adapter"], fingerprint=meta["fingerprint"], scorer=meta["scorer"],
                   options=options, extras=units, scale=scale, seed=_int_or_none(meta.get("seed")),
                   calibration_examples=_int_or_none(meta.get("calibration_examples")))

    def check_matches(self, adapter_name: str, model_fingerprint: str, counts: dict[str, list[int]],
                      source: str = "the scores file") -> None:
        """Refuse scores computed on another model (different adapter, kinds, shapes or weights)."""
        if self.adapter != adapter_name:
            raise ScoresMismatchError(
                f"{source} was computed with adapter {self.adapter!r}, but this model uses {adapter_name!r}; "
                "rescore this model with `optin score`")
        mine = {k: [int(t.numel()) for t in v] for k, v in self.values.items()}
        if set(mine) - set(counts) or any(mine[k] != counts[k] for k in mine):  # a scorer may skip kinds
            raise ScoresMismatchError(
                f"{source} has units {mine} but the model has {counts}: it belongs to another model; "
                "rescore this model with `optin score`")
        if self.fingerprint != model_fingerprint:
            raise ScoresMismatchError(
                f"{source} was computed on other weights (fingerprint {self.fingerprint} != "
                f"{model_fingerprint}); rescore this model with `optin score`")


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


class Checkpoint:
    """Resumable store of partial scoring results, keyed by strings, valid for one exact job.

    ``job`` identifies the work (model fingerprint, scorer, options, calibration data); a file left by
    another job is ignored (and replaced on the first ``put``) so stale partial results are never mixed in.

    The file is an append-only journal: a header naming the job, then one record per ``put`` (an 8-byte
    length and a small safetensors blob holding that one tensor). A ``put`` writes only its own record, so
    storing after every chunk of work costs what the chunk's result weighs, not the whole file; a record cut
    short by a kill is dropped on resume (the work of that one put is redone) and later records are
    appended after the last complete one. Values keep their dtype (float64 partial sums stay bitwise).
    """

    MAGIC = b"optin-checkpoint/2\n"
    MAX_RECORD = 1 << 31  # a length beyond this is damage, not a record

    def __init__(self, path: str | os.PathLike, job: dict) -> None:
        self.path = Path(path)
        self.job = json.dumps(job, sort_keys=True)
        self.data: dict[str, torch.Tensor] = {}
        self._valid_bytes = 0  # length of the journal's readable prefix for this job (0: start a new file)
        if self.path.is_file():
            try:
                self._read()
            except (SafetensorError, OSError, ValueError):
                self.data, self._valid_bytes = {}, 0  # unreadable: recomputed
        self.resumed = len(self.data)

    def _read(self) -> None:
        raw = self.path.read_bytes()
        if not raw.startswith(self.MAGIC):
            return
        pos, records = len(self.MAGIC), []
        while pos + 8 <= len(raw):
            n = int.from_bytes(raw[pos:pos + 8], "little")
            if n > self.MAX_RECORD or pos + 8 + n > len(raw):
                break  # cut short (killed while writing): everything before it is good
            records.append(raw[pos + 8:pos + 8 + n])
            pos += 8 + n
        if not records:
            return
        header = safe_load_bytes(records[0])
        if header[1].get("job") != self.job:
            return  # another job's partial results
        for blob in records[1:]:
            tensors, _ = safe_load_bytes(blob)
            self.data.update(tensors)
        self._valid_bytes = pos

    def get(self, key: str) -> torch.Tensor | None:
        return self.data.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        """Keep ``value`` under ``key`` (durable at once: appended to the journal, O(size of value))."""
        value = value.detach().cpu().contiguous().clone()
        self.data[key] = value
        record = _frame(save_bytes({key: value}))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._valid_bytes == 0:  # a new journal for this job (replacing another job's or a damaged one)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(self.MAGIC + _frame(save_bytes({}, {"job": self.job})) + record)
            os.replace(tmp, self.path)
            self._valid_bytes = self.path.stat().st_size
            return
        with open(self.path, "r+b") as fh:
            fh.truncate(self._valid_bytes)  # drop a record cut short by an earlier kill
            fh.seek(self._valid_bytes)
            fh.write(record)
        self._valid_bytes += len(record)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.data, self._valid_bytes = {}, 0


def _frame(blob: bytes) -> bytes:
    return len(blob).to_bytes(8, "little") + blob


def safe_load_bytes(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an in-memory safetensors blob."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return load_bytes(blob), meta if isinstance(meta, dict) else {}
