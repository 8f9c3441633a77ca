"""Measuring a model: accuracy on labelled batches, parameter count, and throughput."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from .contracts import Adapter, Batch


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(adapter: Adapter, batches: list[Batch], advance: Callable[[int], None] = lambda n: None) -> float:
    """Top-1 accuracy of ``adapter``'s model over labelled batches."""
    adapter.model.eval()
    correct = total = 0
    for batch in batches:
        pred = adapter.logits(batch).argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += int(batch["labels"].numel())
        advance(1)
    return correct / max(total, 1)


@torch.no_grad()
def agreement(a: Adapter, b: Adapter, batches: list[Batch]) -> float:
    """Fraction of examples where two models predict the same class."""
    same = total = 0
    for batch in batches:
        pa, pb = a.logits(batch).argmax(-1), b.logits(batch).argmax(-1)
        same += int((pa == pb).sum())
        total += int(pa.numel())
    return same / max(total, 1)


@torch.no_grad()
def throughput(runs: dict[str, Callable[[], object]], examples: int, warmup: int = 3, repeats: int = 15,
               min_seconds: float = 0.0) -> dict[str, float]:
    """Examples per second of each callable on the same batch, timed interleaved in one process.

    Each callable is warmed up, then the callables take turns so that machine noise hits all of them;
    the figure is ``examples / median(seconds per call)``.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    start = time.perf_counter()
    i = 0
    while i < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        i += 1
    return {k: examples / statistics.median(v) for k, v in times.items()}
