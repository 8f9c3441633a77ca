"""Bringing scores to one common scale before any searcher sees them (``Scorer.scale``).

A searcher adds up the scores of the units it keeps, across kinds and layers, so the numbers must mean the
same thing everywhere. A ``"global"`` scorer promises that already (e.g. an expected loss increase). For a
``"kind"`` (or ``"layer"``) scorer, whose numbers are only comparable inside one kind (or one layer), each
group is rescaled so that its *average* unit is worth its *average* cost in MACs:

    s'_u = s_u / mean_{v in group}(s_v) * mean_{v in group}(c_v)

Then the search trades units of different groups by how they rank inside their group, never because one
group happens to produce larger numbers (weight norms of a head and of a neuron differ by the number of
weights they own; a uniform random score says nothing about kinds at all).
"""
from __future__ import annotations

import torch

from .contracts import SCALES
from .errors import OptinError
from .units import CostModel, UnitTensors


def unit_costs(costs: CostModel, kind: str, layer: int) -> float:
    """MACs one unit of ``kind`` in ``layer`` costs in the unpruned model (its removal saving there)."""
    return costs.removal_cost(costs.counts, kind, layer)


def to_common_scale(scores: UnitTensors, scale: str, costs: CostModel) -> UnitTensors:
    """``scores`` rescaled per kind (``"kind"``) or per layer (``"layer"``); unchanged for ``"global"``.

    A group whose scores are all zero (or whose mean is not positive) is left as it is."""
    if scale not in SCALES:
        raise OptinError(f"unknown score scale {scale!r}; a scorer declares one of {', '.join(SCALES)}")
    if scale == "global":
        return scores
    out: UnitTensors = {}
    for kind, layers in scores.items():
        if kind not in costs.counts:
            out[kind] = layers
            continue
        cost = [unit_costs(costs, kind, i) for i in range(len(layers))]
        if scale == "layer":
            out[kind] = [_rescale(t, t, torch.full((t.numel(),), c, dtype=torch.float64))
                         for t, c in zip(layers, cost)]
            continue
        every = torch.cat([t.double().flatten() for t in layers]) if layers else torch.zeros(0)
        every_cost = torch.cat([torch.full((t.numel(),), c, dtype=torch.float64) for t, c in zip(layers, cost)]) \
            if layers else torch.zeros(0)
        out[kind] = [_rescale(t, every, every_cost) for t in layers]
    return out


def _rescale(t: torch.Tensor, group: torch.Tensor, group_cost: torch.Tensor) -> torch.Tensor:
    """``t / mean(group) * mean(group_cost)`` (unchanged when the group's mean score is not positive)."""
    if not group.numel():
        return t
    mean = float(group.double().mean())
    if not mean > 0:
        return t
    return (t.double() / mean * float(group_cost.mean())).to(t.dtype)
