"""optin-taylor: an example third-party optin plugin (see CONTRIBUTING.md of optin)."""
from __future__ import annotations

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.errors import OptinError
from optin.units import UnitTensors

from .activation import ActivationScorer

__all__ = ["ActivationScorer", "TaylorScorer"]


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """Split every tensor of ``batch`` on dim 0 into chunks of ``size`` examples; other values are shared."""
    n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    return [{k: v[s:s + size] if torch.is_tensor(v) else v for k, v in batch.items()} for s in range(0, n, size)]


class TaylorScorer(Scorer):
    """First-order Taylor importance: |sum over micro-batches of mask * d(loss)/d(mask)|."""

    name = "taylor"
    needs_labels = True  # the task loss needs labels; the core refuses unlabelled calibration data
    scale = "global"  # first-order loss changes: one unit (the loss) for every kind and layer

    def __init__(self, micro_batch: int = 8) -> None:  # plugin option: --set micro_batch=4
        if int(micro_batch) < 1:
            raise OptinError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = int(micro_batch)

    def describe(self) -> dict:
        return {"micro_batch": self.micro_batch}  # stored in the scores file

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        counts = adapter.unit_counts()  # {kind: [units per layer]}
        masks = {k: [torch.ones(n, requires_grad=True) for n in ns] for k, ns in counts.items()}
        flat = [m for ms in masks.values() for m in ms]
        sums = [torch.zeros(m.numel()) for m in flat]
        frozen = [p for p in adapter.model.parameters() if p.requires_grad]
        for p in frozen:  # only the masks need gradients
            p.requires_grad_(False)
        try:
            micro = [mb for b in batches for mb in micro_batches(b, self.micro_batch)]
            ctx.total(len(micro))
            for mb in micro:
                with adapter.masked(masks):
                    loss = adapter.loss(mb)
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
                for acc, m, g in zip(sums, flat, grads):
                    if g is not None:  # a unit kind the loss does not reach keeps 0
                        acc += (m * g).detach()
                ctx.advance(1)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        it = iter(sums)
        return {k: [next(it).abs() for _ in ns] for k, ns in counts.items()}
