"""Magnitude baseline: a unit's importance is the norm of the weights it owns."""
from __future__ import annotations

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.units import UnitTensors


class MagnitudeScorer(Scorer):
    """Norm of each unit's weights (heads: Q/K/V rows + output columns; neurons: in row + out column)."""

    name = "magnitude"
    scale = "kind"  # weight norms: a head owns 4 x 64 x 384 weights, a neuron 2 x 384

    def __init__(self, p: float = 2.0) -> None:
        self.p = float(p)

    def describe(self) -> dict:
        return {"p": self.p}

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        weights = adapter.unit_weights()
        ctx.total(sum(len(w) for ws in weights.values() for w in ws))
        out: UnitTensors = {}
        for kind, layers in weights.items():
            out[kind] = []
            for w in layers:
                out[kind].append(w.double().norm(p=self.p, dim=1).float().cpu() if w.numel() else torch.zeros(w.shape[0]))
                ctx.advance(w.shape[0])
        return out
