"""Per-layer unit tensors (scores, masks) and the analytic cost model shared by every plugin.

A ``UnitTensors`` maps a unit kind ("heads", "neurons", "channels", ...) to one 1-D tensor per layer.
Scores use it for importances (higher = keep), masks for keep flags (1 = keep, 0 = remove).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

UnitTensors = dict[str, list[torch.Tensor]]


def counts_of(units: UnitTensors) -> dict[str, list[int]]:
    return {kind: [int(t.numel()) for t in layers] for kind, layers in units.items()}


def ones_like_counts(counts: dict[str, list[int]]) -> UnitTensors:
    return {kind: [torch.ones(n) for n in ns] for kind, ns in counts.items()}


def kept_counts(masks: UnitTensors) -> dict[str, list[int]]:
    return {kind: [int((t > 0).sum()) for t in layers] for kind, layers in masks.items()}


def same_masks(a: UnitTensors, b: UnitTensors) -> bool:
    """Whether two sets of masks are equal, kind by kind and layer by layer."""
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def kept_indices(masks: UnitTensors) -> dict[str, list[list[int]]]:
    return {kind: [torch.nonzero(t > 0).flatten().tolist() for t in layers]
            for kind, layers in masks.items()}


@dataclass
class CostModel:
    """MACs of a model as ``fixed + sum of kept units x per-unit MACs + sum of coupled pairs``.

    ``per_unit[kind][layer]`` is the MACs one unit of that kind costs in that layer (it may differ
    per layer, e.g. when tokens are reduced); ``fixed`` is what no unit accounts for but the budget
    still counts (0 for the BERT model of DESIGN.md 3.3). ``pairs`` holds bilinear terms
    ``(kind_a, layer_a, kind_b, layer_b, macs)`` costing ``macs x kept_a x kept_b``: a convolution whose
    input and output channels are both units (CNNs) costs in proportion to their product.
    """

    per_unit: dict[str, list[float]]
    counts: dict[str, list[int]]
    fixed: float = 0.0
    notes: dict[str, float] = field(default_factory=dict)
    pairs: list[tuple[str, int, str, int, float]] = field(default_factory=list)
    # Fewest units a layer of this kind may keep (e.g. 1 for conv channels: a conv cannot lose them all).
    min_keep: dict[str, int] = field(default_factory=dict)

    def macs(self, kept: dict[str, list[int]] | None = None) -> float:
        kept = kept or self.counts
        total = self.fixed
        for kind, costs in self.per_unit.items():
            total += sum(c * n for c, n in zip(costs, kept[kind]))
        for ka, la, kb, lb, c in self.pairs:
            total += c * kept[ka][la] * kept[kb][lb]
        return float(total)

    def removal_cost(self, kept: dict[str, list[int]], kind: str, layer: int) -> float:
        """MACs saved by removing one unit of ``kind`` in ``layer`` given the current ``kept`` counts."""
        saved = self.per_unit.get(kind, [0.0] * (layer + 1))[layer]
        for ka, la, kb, lb, c in self.pairs:
            if (ka, la) == (kind, layer):
                saved += c * kept[kb][lb]
            if (kb, lb) == (kind, layer):
                saved += c * kept[ka][la]
        return float(saved)

    def macs_of_masks(self, masks: UnitTensors) -> float:
        kept = kept_counts(masks)
        return self.macs({k: kept.get(k, self.counts[k]) for k in self.counts})
