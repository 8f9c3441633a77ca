"""Degenerate pruning results: keep-masks that leave a model which no longer computes what it was for.

A search may legitimately remove many units, but three results are almost always a mistake (degenerate
scores, or a budget far below anything useful): every unit removed; every unit of one kind removed (e.g.
every attention head of a transformer: it no longer mixes tokens); or every unit of every kind of one
layer removed (every head and every neuron of a block: the block is gone). A layer whose units are of one
kind only may lose them all (a Mask2Former block's FFN neurons: its attention remains); CNN cost models
keep a channel per convolution themselves (``CostModel.min_keep``). The recipe refuses degenerate results
unless the user accepts them explicitly (``allow_degenerate``; the CLI's ``--allow-degenerate``).
"""
from __future__ import annotations

from .errors import BudgetError
from .units import CostModel, UnitTensors, kept_counts


def degenerate_reason(masks: UnitTensors, counts: dict[str, list[int]]) -> str | None:
    """Why ``masks`` (keep-masks; kinds missing from them are kept whole) are degenerate for a model with
    ``counts`` units, or None."""
    kept = {k: list(v) for k, v in counts.items()}
    kept.update({k: v for k, v in kept_counts(masks).items() if k in counts})
    having = {k: sum(v) for k, v in counts.items() if sum(v) > 0}
    if having and all(sum(kept[k]) == 0 for k in having):
        return f"it removes every unit ({', '.join(having)})"
    for kind, n in having.items():
        if sum(kept[kind]) == 0:
            return f"it removes all {n} {kind}"
    n_layers = max((len(v) for v in counts.values()), default=0)
    for layer in range(n_layers):
        kinds = [k for k in counts if layer < len(counts[k]) and counts[k][layer] > 0]
        if len(kinds) > 1 and all(kept[k][layer] == 0 for k in kinds):
            return f"it removes every unit of layer {layer} ({' and '.join(kinds)}: the whole block)"
    return None


def smallest_sound_fraction(costs: CostModel) -> float:
    """The MACs fraction of the smallest model that is not degenerate: one unit of every kind in every layer."""
    one_each = {k: [min(1, n) for n in ns] for k, ns in costs.counts.items()}
    return costs.macs(one_each) / costs.macs()


def check_not_degenerate(masks: UnitTensors, costs: CostModel, budget: float, allow: bool = False) -> None:
    """A BudgetError when ``masks`` are degenerate (unless ``allow``), naming the budget that avoids it."""
    why = degenerate_reason(masks, costs.counts)
    if why is None or allow:
        return
    floor = smallest_sound_fraction(costs)
    hint = (f"raise --budget to at least {floor:.4g} (one unit of every kind in every layer costs that share of "
            "the MACs)" if budget < floor else "check the scores (e.g. rescore, or another --scorer) or raise --budget")
    raise BudgetError(f"the pruning result at budget {budget:g} is degenerate: {why}; {hint}, or pass "
                      "--allow-degenerate (allow_degenerate=True in Python) to accept it")
