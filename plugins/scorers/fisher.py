"""PTF's Fisher importance (Kwon et al., NeurIPS 2022): squared mask gradients of the task loss.

Every unit gets a mask variable fixed at 1; for each micro-batch of labelled calibration data the
gradient of the task loss w.r.t. the masks is squared and accumulated (the empirical Fisher diagonal).
"""
from __future__ import annotations

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.errors import OptinError
from optin.units import UnitTensors


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """Micro-batches of ``size`` examples (tensors split on dim 0, other values shared)."""
    n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    return [{k: (v[i:i + size] if torch.is_tensor(v) else v) for k, v in batch.items()} for i in range(0, n, size)]


class FisherScorer(Scorer):
    """Sum over micro-batches of (d task loss / d unit mask)^2."""

    name = "fisher"
    scale = "global"
    needs_labels = True

    def __init__(self, micro_batch: int = 8) -> None:
        self.micro_batch = int(micro_batch)
        if self.micro_batch < 1 or self.micro_batch != micro_batch:
            raise OptinError(f"fisher scorer: micro_batch must be a positive whole number of examples, got "
                             f"{micro_batch!r} (e.g. --set micro_batch=8)")

    def describe(self) -> dict:
        return {"micro_batch": self.micro_batch}

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        counts = adapter.unit_counts()
        masks = {k: [torch.ones(n, requires_grad=True) for n in ns] for k, ns in counts.items()}
        fisher = {k: [torch.zeros(n, dtype=torch.float64) for n in ns] for k, ns in counts.items()}
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            micro = [m for b in batches for m in split_batch(b, self.micro_batch)]
            ctx.total(len(micro))
            for mb in micro:
                with adapter.masked(masks):
                    loss = adapter.loss(mb)
                flat = [m for ms in masks.values() for m in ms]
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                it = iter(grads)
                for kind in masks:
                    for i in range(len(masks[kind])):
                        g = next(it)
                        if g is not None:
                            fisher[kind][i] += g.detach().double().pow(2).cpu()
                ctx.advance(1)
        finally:
            for p in params:
                p.requires_grad_(True)
        return {k: [t.float() for t in v] for k, v in fisher.items()}  # accumulated in float64
