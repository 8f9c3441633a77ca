"""Gradients of the task loss with respect to unit masks, for gradient-based scorers (``fisher``, the example
``taylor``): every unit gets a mask variable fixed at 1, the model's own parameters are frozen meanwhile (only
the masks need gradients), and the calibration batches are cut into micro-batches."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .contracts import Adapter, Batch, ScoreContext
from .units import UnitTensors


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """Micro-batches of ``size`` examples (tensors split on dim 0, other values shared)."""
    n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    return [{k: (v[i:i + size] if torch.is_tensor(v) else v) for k, v in batch.items()} for i in range(0, n, size)]


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Within the context, the model's parameters do not require gradients; restored afterwards, always."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def mask_gradient_sums(adapter: Adapter, batches: list[Batch], micro_batch: int, ctx: ScoreContext,
                       each: Callable[[torch.Tensor], torch.Tensor] = lambda g: g) -> UnitTensors:
    """Sum over the micro-batches of ``batches`` (``micro_batch`` examples each) of ``each(g)``, ``g`` being the
    gradient of ``adapter.loss`` with respect to every unit's mask at 1 (in float64): ``{kind: [(n,) float64
    per layer]}`` on the CPU, 0 where the loss does not reach a layer. The model's parameters are frozen
    meanwhile; progress goes to ``ctx``, one step a micro-batch."""
    counts = adapter.unit_counts()
    masks = {k: [torch.ones(n, requires_grad=True) for n in ns] for k, ns in counts.items()}
    flat = [m for ms in masks.values() for m in ms]
    sums = [torch.zeros(m.numel(), dtype=torch.float64) for m in flat]
    with frozen(adapter.model):
        micro = [m for b in batches for m in micro_batches(b, micro_batch)]
        ctx.total(len(micro))
        for mb in micro:
            with adapter.masked(masks):
                loss = adapter.loss(mb)
            for acc, g in zip(sums, torch.autograd.grad(loss, flat, allow_unused=True)):
                if g is not None:
                    acc += each(g.double()).cpu()
            ctx.advance(1)
    it = iter(sums)
    return {k: [next(it) for _ in ns] for k, ns in counts.items()}
