"""PTF's greedy mask search under a MACs budget (Kwon et al. 2022, ``search_mac``; OPTIN A.1).

Sort units by importance. For each possible number k of kept heads (the most important k), spend what
the budget leaves on the most important remaining units (neurons, channels) that fit, and keep the k
whose kept importances sum highest. Without a "heads" kind this is a greedy fill by importance.
"""
from __future__ import annotations

import torch

from optin.contracts import Searcher
from optin.errors import BudgetError
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


def greedy_fill(scores: torch.Tensor, costs: torch.Tensor, capacity: float) -> torch.Tensor:
    """Indices of the longest prefix of units by descending importance whose total cost fits."""
    order = torch.argsort(scores, descending=True, stable=True)
    fits = torch.cumsum(costs[order].double(), 0) <= capacity + 1e-6
    return order[: int(fits.sum())]


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

    def search(self, scores: UnitTensors, costs: CostModel, budget: float) -> UnitTensors:
        capacity = budget * costs.macs() - costs.fixed
        if capacity < 0:
            raise BudgetError(f"budget {budget} is below the MACs no unit accounts for "
                              f"({costs.fixed / costs.macs():.3f} of the model); raise the budget")
        kinds = [k for k in costs.per_unit if k in scores]
        heads = ["heads"] if "heads" in kinds else []
        others = [k for k in kinds if k not in heads]
        hs, hc, hw = _flatten(scores, costs, heads)
        os_, oc, ow = _flatten(scores, costs, others)
        if heads:
            keep_h, keep_o = ptf_search(hs, hc, os_, oc, capacity)
        else:
            keep_h, keep_o = torch.zeros(0, dtype=torch.long), greedy_fill(os_, oc, capacity)
        masks = {k: [torch.zeros(t.numel()) for t in scores[k]] for k in kinds}
        for where, keep in ((hw, keep_h), (ow, keep_o)):
            for idx in keep.tolist():
                kind, layer, i = where[idx]
                masks[kind][layer][i] = 1.0
        return masks
