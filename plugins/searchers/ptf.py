"""PTF's greedy mask search under a MACs budget (Kwon et al. 2022, ``search_mac``; OPTIN A.1).

Sort units by importance. For each possible number k of kept heads (the most important k), spend what
the budget leaves on the most important remaining units (neurons, channels) that fit, and keep the k
whose kept importances sum highest. Without a "heads" kind this is a greedy fill by importance.

CNN cost models couple layers (a convolution costs in proportion to its kept input x output channels,
``CostModel.pairs``), so a unit's cost depends on what else is kept. There (and wherever the cost model
sets a per-kind ``min_keep``) the search removes units in ascending importance, updating each removal's
exact saving, until the MACs fit; every layer keeps at least ``min_keep`` units.

``normalize="mean"`` divides every layer's scores by that layer's mean first, so that layers compete by
relative importance (scores of early and late CNN layers differ by orders of magnitude, and a global
ranking would empty the late layers); CNN adapters ask for it through ``Adapter.search_defaults``.
"""
from __future__ import annotations

import torch

from optin.contracts import Searcher
from optin.errors import BudgetError, OptinError
from optin.units import CostModel, UnitTensors


def _flatten(scores: UnitTensors, costs: CostModel, kinds: list[str]):
    """Flat (score, cost, kind, layer, index) arrays for the given kinds."""
    s, c, where = [], [], []
    for kind in kinds:
        for layer, t in enumerate(scores[kind]):
            s.append(t.float())
            c.append(torch.full((t.numel(),), float(costs.per_unit[kind][layer])))
            where += [(kind, layer, i) for i in range(t.numel())]
    if not s:
        return torch.zeros(0), torch.zeros(0), []
    return torch.cat(s), torch.cat(c), where


def _unforced(scores: torch.Tensor, costs: torch.Tensor, where: list[tuple[str, int, int]], masks: UnitTensors
              ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int, int]]]:
    """The flat units not already kept in ``masks`` (by the ``min_keep`` floor)."""
    free = [j for j, (kind, layer, i) in enumerate(where) if masks[kind][layer][i] == 0]
    if len(free) == len(where):
        return scores, costs, where
    idx = torch.tensor(free, dtype=torch.long)
    return scores[idx], costs[idx], [where[j] for j in free]


def greedy_fill(scores: torch.Tensor, costs: torch.Tensor, capacity: float) -> torch.Tensor:
    """Indices of the longest prefix of units by descending importance whose total cost fits."""
    order = torch.argsort(scores, descending=True, stable=True)
    fits = torch.cumsum(costs[order].double(), 0) <= capacity + 1e-6
    return order[: int(fits.sum())]


def layer_normalized(scores: torch.Tensor) -> torch.Tensor:
    """One layer's scores divided by their mean (unchanged when the mean is not positive)."""
    mean = scores.float().mean() if scores.numel() else torch.tensor(0.0)
    return scores / mean if mean > 0 else scores


def greedy_prune(order: list[int], where: list[tuple[str, int, int]], costs: CostModel, capacity: float,
                 min_keep: int | dict[str, int] = 1) -> set[int]:
    """Flat indices removed when dropping units in ``order`` (least important first) until the MACs are at
    most ``capacity``; each removal saves its exact marginal MACs given what is still kept. ``min_keep``
    (one number, or one per kind) is the fewest units a layer keeps."""
    floor = (lambda kind: min_keep) if isinstance(min_keep, int) else (lambda kind: min_keep.get(kind, 0))
    kept = {k: list(v) for k, v in costs.counts.items()}
    current = costs.macs(kept)
    removed: set[int] = set()
    for idx in order:
        if current <= capacity + 1e-6:
            break
        kind, layer, _ = where[idx]
        if kept[kind][layer] <= floor(kind):
            continue
        current -= costs.removal_cost(kept, kind, layer)
        kept[kind][layer] -= 1
        removed.add(idx)
    if current > capacity + 1e-6:
        least = min_keep if isinstance(min_keep, int) else max(min_keep.values(), default=0)
        raise BudgetError(f"cannot reach the budget while keeping {least} unit(s) per layer: the smallest model "
                          f"has {current / costs.macs():.4g} of the MACs, the budget asks for {capacity / costs.macs():.4g}; "
                          "raise the budget")
    return removed


def ptf_search(head_scores: torch.Tensor, head_costs: torch.Tensor, other_scores: torch.Tensor,
               other_costs: torch.Tensor, capacity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (kept heads, kept others) index sets under ``capacity`` MACs (pure function)."""
    h_order = torch.argsort(head_scores, descending=True, stable=True)
    o_order = torch.argsort(other_scores, descending=True, stable=True)
    o_cum_cost = torch.cumsum(other_costs[o_order].double(), 0)
    o_cum_score = torch.cumsum(other_scores[o_order].double(), 0)
    h_cum_cost = torch.cumsum(head_costs[h_order].double(), 0)
    h_cum_score = torch.cumsum(head_scores[h_order].double(), 0)
    best, best_k, best_n = -float("inf"), 0, 0
    for k in range(0, head_scores.numel() + 1):
        used = float(h_cum_cost[k - 1]) if k else 0.0
        remaining = capacity - used
        if remaining < -1e-6:
            break
        n = int((o_cum_cost <= remaining + 1e-6).sum())
        value = (float(h_cum_score[k - 1]) if k else 0.0) + (float(o_cum_score[n - 1]) if n else 0.0)
        if value > best:
            best, best_k, best_n = value, k, n
    return h_order[:best_k], o_order[:best_n]


class PTFSearcher(Searcher):
    """Greedy heads-then-neurons search under a MACs budget (PTF)."""

    name = "ptf"

    def __init__(self, min_keep: int | None = None, normalize: str = "none") -> None:
        if min_keep is not None and (isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0):
            raise OptinError(f"ptf searcher: min_keep must be a whole number >= 0 (units every layer keeps of each "
                             f"kind), got {min_keep!r}")
        if normalize not in ("none", "mean"):
            raise OptinError(f"ptf searcher: normalize must be 'none' or 'mean', got {normalize!r}")
        self.min_keep = min_keep  # None: 1 on the coupled (CNN) path, no floor on PTF's own path
        self.normalize = normalize

    def search(self, scores: UnitTensors, costs: CostModel, budget: float) -> UnitTensors:
        capacity = budget * costs.macs() - costs.fixed
        if capacity < 0:
            raise BudgetError(f"budget {budget} is below the MACs no unit accounts for "
                              f"({costs.fixed / costs.macs():.3f} of the model); raise the budget")
        kinds = [k for k in costs.per_unit if k in scores]
        if self.normalize == "mean":
            scores = {k: [layer_normalized(t) for t in v] for k, v in scores.items()}
        if costs.pairs or costs.min_keep:
            return self._search_coupled(scores, costs, kinds, budget * costs.macs())
        masks = {k: [torch.zeros(t.numel()) for t in scores[k]] for k in kinds}
        capacity -= self._keep_floor(scores, costs, kinds, masks, budget)
        heads = ["heads"] if "heads" in kinds else []
        others = [k for k in kinds if k not in heads]
        hs, hc, hw = _unforced(*_flatten(scores, costs, heads), masks)
        os_, oc, ow = _unforced(*_flatten(scores, costs, others), masks)
        if heads:
            keep_h, keep_o = ptf_search(hs, hc, os_, oc, capacity)
        else:
            keep_h, keep_o = torch.zeros(0, dtype=torch.long), greedy_fill(os_, oc, capacity)
        for where, keep in ((hw, keep_h), (ow, keep_o)):
            for idx in keep.tolist():
                kind, layer, i = where[idx]
                masks[kind][layer][i] = 1.0
        return masks

    def _keep_floor(self, scores: UnitTensors, costs: CostModel, kinds: list[str], masks: UnitTensors,
                    budget: float) -> float:
        """With ``min_keep`` set: mark the ``min_keep`` best units of every kind in every layer kept in ``masks``
        and return their MACs (an unreachable floor is a BudgetError naming it)."""
        if not self.min_keep:
            return 0.0
        spent = 0.0
        for kind in kinds:
            for layer, t in enumerate(scores[kind]):
                best = torch.argsort(t.float(), descending=True, stable=True)[: self.min_keep]
                masks[kind][layer][best] = 1.0
                spent += float(costs.per_unit[kind][layer]) * best.numel()
        if spent > budget * costs.macs() - costs.fixed + 1e-6:
            raise BudgetError(f"min_keep={self.min_keep}: keeping that many units of every kind in every layer costs "
                              f"{(spent + costs.fixed) / costs.macs():.4g} of the MACs, above the budget {budget}; "
                              "lower min_keep or raise the budget")
        return spent

    def _search_coupled(self, scores: UnitTensors, costs: CostModel, kinds: list[str], capacity: float) -> UnitTensors:
        flat, _, where = _flatten(scores, costs, kinds)
        order = torch.argsort(flat, stable=True).tolist()
        floors = {k: max(1 if self.min_keep is None else self.min_keep, costs.min_keep.get(k, 0)) for k in kinds}
        removed = greedy_prune(order, where, costs, capacity, floors)
        masks = {k: [torch.ones(t.numel()) for t in scores[k]] for k in kinds}
        for idx in removed:
            kind, layer, i = where[idx]
            masks[kind][layer][i] = 0.0
        return masks
