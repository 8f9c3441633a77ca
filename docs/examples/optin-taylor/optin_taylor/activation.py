"""The ``activation`` scorer: how strongly each unit fires on the calibration data (no labels, no gradients).

It uses one adapter method, ``probe``, so it works with every adapter, whatever the model family: ``probe``
runs the model on a batch and shows each layer's units as a tensor (valid positions, units, unit size), the
padding already dropped.
"""
from __future__ import annotations

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.errors import OptinError
from optin.units import UnitTensors

STATISTICS = {"rms": 2.0, "mean_abs": 1.0}  # statistic -> the power p of the mean of |activation|^p


class ActivationScorer(Scorer):
    """Activation size: root-mean-square (or mean absolute) activation of each unit over the calibration data."""

    name = "activation"
    # A head's and a neuron's activations are not on one scale: the core rescales each kind (optin.scales)
    # so that only the ranking inside a kind decides.
    scale = "kind"

    def __init__(self, statistic: str = "rms") -> None:  # plugin option: --set statistic=mean_abs
        if statistic not in STATISTICS:
            raise OptinError(f"unknown statistic {statistic!r}; use one of {', '.join(STATISTICS)}")
        self.statistic = statistic

    def describe(self) -> dict:
        return {"statistic": self.statistic}

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        p = STATISTICS[self.statistic]
        counts = adapter.unit_counts()
        sums = {kind: [torch.zeros(n, dtype=torch.float64) for n in ns] for kind, ns in counts.items()}
        values = {kind: torch.zeros(len(ns), dtype=torch.float64) for kind, ns in counts.items()}

        def observe(kind: str, layer: int, x: torch.Tensor) -> None:  # x: (positions, units, unit size)
            sums[kind][layer] += x.detach().double().abs().pow(p).sum(dim=(0, 2))
            values[kind][layer] += x.shape[0] * x.shape[2]

        mine = ctx.mine(len(batches))  # with several processes, each probes its share of the batches
        ctx.total(len(mine))
        with torch.no_grad():
            for i in mine:
                adapter.probe(batches[i], observe)
                ctx.advance(1)
        out: UnitTensors = {}
        for kind, layers in sums.items():
            n = ctx.reduce(values[kind]).clamp_min(1)  # ctx.reduce sums over the processes
            out[kind] = [(ctx.reduce(s) / n[layer]).pow(1 / p).float() for layer, s in enumerate(layers)]
        return out
