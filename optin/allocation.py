"""How many units each layer keeps: the scores' own allocation, or one chosen by trying candidates.

A searcher keeps the units with the highest scores under the budget, so the scores decide two things at
once: *which* units of a layer go (their order inside the layer) and *how many* of each layer go (how the
layers' scores compare). A scorer can be right about the first and wrong about the second: trajectory
scores on a CNN rank channels well inside a layer but rate the first convolutions so low that the search
strips them (docs/benchmarks.md, vgg-fmnist), while scores that carry no information across layers
(quantiles inside a layer) leave the allocation to the cost model alone.

``candidate_scores`` blends the two geometrically, per unit::

    s_alpha = s^(1 - alpha) * q^alpha

with ``s`` the scores on the common scale (``optin.scales``) and ``q`` each unit's quantile inside its layer
on the same scale (the ``"layer"`` rescaling: a layer's average unit is worth its average cost). Inside a
layer both are in the same order, so every blend keeps the scorer's choice of *which* units go; ``alpha``
moves only the allocation, from the scorer's (0) to the cost model's (1).

``--allocation evaluate`` searches at every alpha of ``BLENDS``, applies each candidate (with the run's
recovery, removal and recalibration) to a copy of the model fitted on one half of the calibration
examples, and keeps the candidate whose outputs stay closest to the unpruned model's on the other half
(mean KL divergence of the predictive distributions): a search over allocations judged on held-out data,
not on the scores' promise. After the blends it tries the *measured* allocation (``optin.measured``: each
layer's scores rescaled by what masking its lowest units costs the output, on the fitting half), which can
reach allocations no blend does (trajectory on m2f-mosaic keeps too little of the last layers, and the
cost model's allocation keeps even less). A candidate later in ``CANDIDATES`` than another is kept only
when it is clearly closer (by more than ``MARGIN``), since a few dozen held-out examples measure the
divergence with noise.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .contracts import Adapter, Batch
from .errors import OptinError
from .gradients import micro_batches
from .measured import mean_divergence
from .recovery import recover
from .scales import to_common_scale
from .units import CostModel, UnitTensors, kept_counts

BLENDS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the alphas ``evaluate`` tries
MEASURED = "measured"
CANDIDATES: tuple[float | str, ...] = (*BLENDS, MEASURED)  # what ``evaluate`` tries, in order of preference
EVALUATE_BLENDS = "evaluate-blends"  # ``evaluate`` without the measured candidate (as before 2026-11-30's change)
# How much closer (relative divergence) a later candidate must be to be kept over an earlier one. Chosen on
# 2026-11-30 after the four models of docs/benchmarks.md: without it, m2f-mosaic lost 3.8 points at 0.7.
MARGIN = 0.05
NAMES = ("scores", "evaluate", EVALUATE_BLENDS, MEASURED)
# The blends helped on vgg-fmnist and vit-fmnist and tied on minilm-trec; the measured candidate helped on
# m2f-mosaic and tied on those three (docs/benchmarks.md).
DEFAULT_ALLOCATION = "evaluate"


def parse_allocation(value: str | float | None) -> str | float:
    """``"scores"`` (alpha 0), ``"evaluate"``, ``"evaluate-blends"``, ``"measured"``, or a fixed alpha in [0, 1]
    (given as a number or its text)."""
    if value is None:
        return DEFAULT_ALLOCATION
    if isinstance(value, str) and value.strip().lower() in NAMES:
        return value.strip().lower()
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = math.nan
    if isinstance(value, bool) or not 0.0 <= alpha <= 1.0:
        raise OptinError(f"--allocation must be 'scores', 'evaluate', 'evaluate-blends', 'measured' or a blend in "
                         f"[0, 1] (0: the scores' own allocation of units to layers, 1: the cost model's), got {value!r}")
    return alpha


def candidates_for(how: str | float) -> tuple[float | str, ...] | None:
    """The candidates an allocation setting tries (``None`` for a fixed one): what a comparison folder records."""
    return CANDIDATES if how == "evaluate" else BLENDS if how == EVALUATE_BLENDS else None


def layer_quantiles(values: UnitTensors) -> UnitTensors:
    """Each unit's quantile inside its layer, ``(rank + 1) / n`` (ties by position), in float64."""
    out: UnitTensors = {}
    for kind, layers in values.items():
        out[kind] = []
        for t in layers:
            rank = torch.empty(t.numel(), dtype=torch.float64)
            rank[torch.argsort(t.double().flatten(), stable=True)] = torch.arange(t.numel(), dtype=torch.float64)
            out[kind].append((rank + 1) / max(1, t.numel()))
    return out


def blend(common: UnitTensors, quantiles: UnitTensors, alpha: float) -> UnitTensors:
    """``common^(1 - alpha) * quantiles^alpha`` per unit (pure). Scores at or below 0 count as the smallest
    positive score of their kind (a blend needs logarithms); alpha 0 returns ``common`` unchanged."""
    if alpha == 0.0:
        return common
    out: UnitTensors = {}
    for kind, layers in common.items():
        every = torch.cat([t.double().flatten() for t in layers]) if layers else torch.zeros(0, dtype=torch.float64)
        positive = every[every > 0]
        floor = float(positive.min()) if positive.numel() else 1.0
        out[kind] = [(t.double().clamp_min(floor).log() * (1 - alpha) + q.log() * alpha).exp().to(t.dtype)
                     if t.numel() else t for t, q in zip(layers, quantiles[kind])]
    return out


def candidate_scores(values: UnitTensors, scale: str, costs: CostModel, alpha: float) -> UnitTensors:
    """The scores a searcher sees for blend ``alpha``: on the common scale, moved toward the cost model's
    allocation (see the module docstring); alpha 0 is the scores' own common scale."""
    common = to_common_scale(values, scale, costs)
    if alpha == 0.0:
        return common
    priced = {k: v for k, v in values.items() if k in costs.counts}
    quantiles = to_common_scale(layer_quantiles(priced), "layer", costs)
    return {**common, **blend({k: common[k] for k in priced}, quantiles, alpha)}


def split_for_trial(batches: list[Batch], size_of: Callable[[Batch], int]) -> tuple[list[Batch], list[Batch]]:
    """Calibration batches cut into a half to fit recovery on and a half to judge candidates on (the
    same batches for both when there is a single example)."""
    if len(batches) > 1:
        half = len(batches) // 2
        return batches[:half], batches[half:]
    n = size_of(batches[0])
    if n < 2:
        return batches, batches
    fit, check = micro_batches(batches[0], (n + 1) // 2)[:2]
    return [fit], [check]


@dataclass
class Trial:
    alpha: float | str  # a blend, or ``MEASURED``
    masks: UnitTensors | None
    divergence: float = math.inf
    error: str | None = None

    def record(self) -> dict:
        out = {"alpha": self.alpha, "divergence": self.divergence if math.isfinite(self.divergence) else None}
        if self.masks is not None:
            out["kept"] = kept_counts(self.masks)
        if self.error:
            out["error"] = self.error
        return out


def judge(original: Adapter, masks: UnitTensors, fit: list[Batch], check: list[Batch], steps: tuple[str, ...],
          recalibrate: bool, reference: list[torch.Tensor]) -> float:
    """Held-out divergence of one candidate: on a copy of ``original``, recover from ``fit``, remove,
    recalibrate, and compare its outputs on ``check`` with ``reference`` (the unpruned outputs there)."""
    ad = copy.deepcopy(original)
    if steps:
        masks, _ = recover(ad, original, masks, fit, steps)
    ad.prune(masks)
    if recalibrate:
        ad.recalibrate(fit)
    with torch.no_grad():
        got = [ad.logits(b) for b in check]
    return mean_divergence(reference, got, [original.batch_size(b) for b in check])


def choose(trials: list[Trial], margin: float = MARGIN) -> Trial:
    """The first trial (in the order given: ``CANDIDATES``' order of preference) whose held-out divergence is
    within ``margin`` (relative) of the smallest: a candidate further from the scores' own allocation must be
    clearly closer to the unpruned model, not closer by the noise of a few dozen held-out examples. An
    OptinError naming every failure when no candidate could be made."""
    made = [t for t in trials if t.masks is not None and math.isfinite(t.divergence)]
    if not made:
        raise OptinError("no candidate allocation could be made: " + "; ".join(
            f"{label(t.alpha)}: {t.error}" for t in trials))
    best = min(t.divergence for t in made)
    return next(t for t in made if t.divergence <= best * (1 + margin))


def label(candidate: float | str) -> str:
    """How a candidate is named in messages: ``blend 0.25`` or ``measured``."""
    return candidate if isinstance(candidate, str) else f"blend {candidate:g}"
