"""Token schedules under a MACs budget (OPTIN A.9 and the schedules it is compared with).

The schedule is the number of tokens removed in each block (between attention and MLP), executed at
run time by any reducer; every example keeps the same count, so batching stays possible.

- ``trajectory`` (OPTIN): drop (block, token) pairs in ascending token-trajectory importance; a token
  dropped at block l is gone for all later blocks; stop once the MACs fit.
- ``constant``: ToMe's constant r per block, the smallest r that fits.
- ``decreasing``: ToMe's linearly decreasing r (r0 at the first block down to 0), the smallest r0 that fits.
- ``layers``: Zero-TPrune-style pruning at given blocks with given retention rates, scaled to fit.

With ``units=true`` (the paper's "expanded" configuration) heads and neurons are first pruned with the
PTF search to ``unit_budget`` (default: half of the requested reduction) and tokens remove the rest;
with ``units=false`` only tokens are reduced (the paper's third configuration).
"""
from __future__ import annotations

from typing import Callable

import torch

from optin.contracts import MacsOf, TokenSearcher
from optin.errors import BudgetError, OptinError
from optin.units import CostModel, UnitTensors

from .ptf import PTFSearcher

# Zero-TPrune's reference configuration, for DeiT-S (12 blocks): prune after blocks 1, 3, 6, 9, 11 keeping
# these fractions of the tokens (DESIGN.md 3.6).
REFERENCE_DEPTH = 12
REFERENCE_LAYERS = (1, 3, 6, 9, 11)
REFERENCE_RETENTION = (1.0, 0.9, 0.8, 0.7, 1.0)


def scaled_layers(layers: list[int] | tuple[int, ...], retention: list[float] | tuple[float, ...], depth: int,
                  reference_depth: int = REFERENCE_DEPTH) -> tuple[list[int], list[float]]:
    """A pruning-layer pattern defined for ``reference_depth`` blocks, moved to a model of ``depth`` blocks:
    block l goes to ``round(l * (depth - 1) / (reference_depth - 1))`` (first and last block stay first and
    last; exact for ``depth == reference_depth``), and retentions of layers that land on the same block
    multiply (the same fraction of tokens survives in all)."""
    if depth == reference_depth or reference_depth < 2:
        return list(layers), list(retention)
    merged: dict[int, float] = {}
    for layer, keep in zip(layers, retention):
        at = int(round(layer * (depth - 1) / (reference_depth - 1)))
        merged[at] = merged.get(at, 1.0) * float(keep)
    at = sorted(merged)
    return at, [merged[a] for a in at]


def smallest_fitting(candidates: int, schedule_of: Callable[[int], list[int]], macs_of: MacsOf,
                     target: float, units: bool = False) -> list[int]:
    """The schedule for the smallest integer strength in [0, candidates] whose MACs fit the target
    (MACs fall as strength grows)."""
    lo, hi = 0, candidates
    if macs_of(schedule_of(hi)) > target:
        raise BudgetError(f"even the strongest schedule keeps {macs_of(schedule_of(hi)):.4g} MACs, above the "
                          f"target {target:.4g}; raise the budget" + ("" if units else
                                                                     " or prune heads/neurons too (units=true)"))
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_of(schedule_of(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    return schedule_of(lo)


def constant_removals(n_layers: int, r: int) -> list[int]:
    return [r] * n_layers


def decreasing_removals(n_layers: int, r0: int) -> list[int]:
    if n_layers == 1:
        return [r0]
    return [int(round(r0 * (1 - i / (n_layers - 1)))) for i in range(n_layers)]


def trajectory_removals(importance: torch.Tensor, macs_of: MacsOf, target: float) -> list[int]:
    """Greedy OPTIN schedule from token importances (L, T): drop the least important (block, token)
    first; dropping token j at block l also drops it from every later block."""
    n_layers, n_tok = importance.shape
    drop_at = [n_layers] * n_tok
    removals = [0] * n_layers
    order = torch.argsort(importance.flatten(), stable=True).tolist()
    if macs_of(removals) <= target:
        return removals
    for flat in order:
        layer, j = divmod(flat, n_tok)
        if layer >= drop_at[j]:
            continue
        if drop_at[j] < n_layers:
            removals[drop_at[j]] -= 1
        drop_at[j] = layer
        removals[layer] += 1
        if macs_of(removals) <= target:
            return removals
    raise BudgetError(f"dropping every token keeps {macs_of(removals):.4g} MACs, above the target {target:.4g}")


def layer_removals(n_tokens: int, protected: int, layers: list[int], retention: list[float], strength: float,
                   n_layers: int) -> list[int]:
    """Zero-TPrune-style: at each pruning block keep ``max(0, 1 - strength*(1-retention))`` of the tokens
    (strength 1 = the configured retention rates)."""
    removals = [0] * n_layers
    n = n_tokens - protected
    for layer, keep in zip(layers, retention):
        if layer >= n_layers:
            continue
        kept = int(round(n * max(0.0, 1 - strength * (1 - keep))))
        removals[layer] = n - max(1, kept)
        n = max(1, kept)
    return removals


class TokenScheduleSearcher(TokenSearcher):
    """Heads/neurons by PTF (optional) plus a per-block token schedule that meets the MACs budget."""

    name = "token-schedule"

    def __init__(self, schedule: str = "trajectory", units: bool = True, unit_budget: float | None = None,
                 pruning_layers: list[int] | None = None, retention: list[float] | None = None) -> None:
        if schedule not in ("trajectory", "constant", "decreasing", "layers"):
            raise OptinError(f"unknown token schedule {schedule!r}; use trajectory, constant, decreasing or layers")
        if schedule != "layers" and (pruning_layers is not None or retention is not None):
            raise OptinError(f"token-schedule: pruning_layers and retention apply only to schedule=layers, not "
                             f"{schedule!r}; add --set schedule=layers, or drop them")
        if not units and unit_budget is not None:
            raise OptinError("token-schedule: unit_budget applies only when heads/neurons are pruned too (units=true); "
                             "drop it, or set units=true")
        self.schedule_kind = schedule
        self.units = bool(units)
        self.unit_budget = unit_budget
        self.pruning_layers = pruning_layers
        self.retention = retention

    def needs_token_scores(self) -> bool:
        return self.schedule_kind == "trajectory"

    def prunes_units(self) -> bool:
        return self.units

    def layer_pattern(self, n_layers: int) -> tuple[list[int], list[float]]:
        """Pruning layers and retentions for a model of ``n_layers`` blocks: the user's, or Zero-TPrune's
        reference pattern moved to this depth (``scaled_layers``)."""
        if self.pruning_layers is None:
            return scaled_layers(REFERENCE_LAYERS, self.retention or REFERENCE_RETENTION, n_layers)
        layers, retention = list(self.pruning_layers), list(self.retention or REFERENCE_RETENTION)
        if len(layers) != len(retention):
            raise OptinError(f"pruning_layers ({len(layers)} entries) and retention ({len(retention)}) must have "
                             "the same length")
        beyond = [l for l in layers if not 0 <= int(l) < n_layers]
        if beyond:
            raise OptinError(f"pruning_layers {beyond} are not blocks of this model (it has {n_layers}: 0..{n_layers - 1});"
                             " leave pruning_layers unset to scale Zero-TPrune's pattern to the model's depth")
        return layers, retention

    def unit_budget_for(self, budget: float) -> float:
        if not self.units:
            return 1.0
        return float(self.unit_budget) if self.unit_budget is not None else (1.0 + budget) / 2

    def search(self, scores: UnitTensors, costs: CostModel, budget: float) -> UnitTensors:
        """Head/neuron masks for the unit part of the budget (all ones when ``units=false``)."""
        ub = self.unit_budget_for(budget)
        if ub >= 1.0:
            return {k: [torch.ones(n) for n in ns] for k, ns in costs.counts.items()}
        return PTFSearcher().search(scores, costs, ub)

    def removals(self, n_tokens: int, protected: int, n_layers: int, macs_of: MacsOf, target: float,
                 token_importance: torch.Tensor | None = None) -> list[int]:
        """Tokens removed per block so that ``macs_of(removals) <= target``."""
        room = n_tokens - protected - 1
        if self.schedule_kind == "trajectory":
            if token_importance is None:
                raise OptinError("the trajectory token schedule needs token scores: use --scorer trajectory "
                                 "(with --searcher token-schedule it scores tokens too)")
            return trajectory_removals(token_importance, macs_of, target)
        if self.schedule_kind == "constant":
            return smallest_fitting(max(0, room // n_layers), lambda r: constant_removals(n_layers, r), macs_of, target,
                                    self.units)
        if self.schedule_kind == "decreasing":
            return smallest_fitting(max(0, 2 * room // n_layers), lambda r: decreasing_removals(n_layers, r),
                                    macs_of, target, self.units)
        # strength 1 is the configured retention; stronger (up to dropping everything at the most
        # aggressive layer) when the budget asks for more
        layers, retention = self.layer_pattern(n_layers)
        top = 1.0 / max(1e-6, max(1 - r for r in retention))
        steps = 1000
        return smallest_fitting(steps, lambda s: layer_removals(n_tokens, protected, layers, retention,
                                                                top * s / steps, n_layers),
                                macs_of, target, self.units)
