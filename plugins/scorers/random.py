"""Random baseline: uniform random importances from the run's seed."""
from __future__ import annotations

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.units import UnitTensors


class RandomScorer(Scorer):
    """Uniform random importance per unit (seeded)."""

    name = "random"
    scale = "kind"  # a uniform draw says nothing about kinds: each kind competes by its cost

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        g = torch.Generator().manual_seed(ctx.seed)
        ctx.total(0)
        return {k: [torch.rand(n, generator=g) for n in ns] for k, ns in adapter.unit_counts().items()}
