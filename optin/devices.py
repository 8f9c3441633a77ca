"""Where a run computes (``--device``) and in which precision (``--dtype``).

The model is moved once, after loading; batches are moved when they are made (floating tensors take the
run's dtype, integer tensors such as token ids and labels stay integers). Scores are accumulated in float64
on the CPU whatever the device (scorers move their results), so reduced precision changes the forward
passes, not the bookkeeping.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import OptinError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked to exist here."""
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise OptinError(f"--device {name!r} is not a device: use cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptinError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptinError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered 0..{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise OptinError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    elif device.type != "cpu":
        raise OptinError(f"--device {name}: unsupported device type {device.type!r}; use cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``float32`` (default), ``bfloat16`` or ``float16``."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise OptinError(f"--dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``batch`` with every tensor on ``device``; floating tensors in ``dtype``."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        out[k] = v
    return out


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (so that wall-clock timings of asynchronous devices mean something)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def available_bytes(device: torch.device) -> int:
    """Memory a job may use on ``device`` now: free CUDA memory, or the system's available memory (Linux
    ``MemAvailable``; 4 GiB where it cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
