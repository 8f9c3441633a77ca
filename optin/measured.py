"""The measured allocation: each layer's scores rescaled by what removing its units costs the model's output.

A scorer orders the units inside each layer; how its numbers compare *across* layers is a separate claim,
and one it can get wrong (trajectory scores on m2f-mosaic keep half of the first FFNs and a fifth of the
last two, where keeping the late ones is worth several points: docs/benchmarks.md). Here that claim is
measured instead of trusted. For every layer of every priced kind, the ``k`` units the scorer ranks lowest
are masked, alone in the model, for a few ``k`` (half the layer, three quarters, ... all of it), and the
mean KL divergence of the predictive distributions from the unpruned model's is recorded: the layer's
removal curve ``D(k)``. A unit's score is then the curve's slope where the unit falls in that order,
``dD/dk`` in divergence per unit: scores in units of expected output change, comparable across kinds
and layers (a ``"global"`` scale), while each layer keeps the scorer's choice of *which* units go.

The slopes are made non-decreasing along the order (a unit the scorer ranks higher never looks cheaper to
remove) and interpolated between the curve's segments so that the order inside a layer is kept exactly.
The sum of the masked layers' divergences is only a first-order stand-in for masking them together, so
``--allocation evaluate`` judges this candidate on held-out examples like the blends, and keeps it only
when it is clearly closer to the unpruned model.

Cost: ``len(REMOVED)`` masked forwards per layer and kind on the examples given (60 on a 6-layer BERT), each
restarted at the layer where the adapter supports it (as for trajectory), so about half of a full forward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .contracts import Adapter, Batch, Trace
from .units import UnitTensors

REMOVED = (0.5, 0.75, 0.875, 0.9375, 1.0)  # fractions of a layer masked to draw its curve: denser near all
FLOOR = 1e-12  # the smallest slope: a layer whose masking moves nothing still orders its units


def removal_counts(n: int) -> list[int]:
    """How many of a layer's ``n`` units are masked for each point of its curve (distinct, increasing, > 0)."""
    return sorted({max(1, round(f * n)) for f in REMOVED}) if n else []


def marginal_scores(order: torch.Tensor, removed: list[int], losses: list[float]) -> torch.Tensor:
    """Per-unit scores of one layer from its removal curve (pure).

    ``order``: the scorer's values for the layer's units (higher = kept longer); ``removed[i]`` units, the
    lowest of ``order``, masked together gave divergence ``losses[i]`` (the curve starts at ``D(0) = 0``).
    Each segment's slope ``dD/dk`` is placed at its middle, made non-decreasing, and interpolated at every
    unit's position in the order, plus a vanishing share of that position, so that the result ranks the
    units exactly as ``order`` does. float64, the shape of ``order`` flattened.
    """
    n = order.numel()
    if not n:
        return torch.zeros(0, dtype=torch.float64)
    points = torch.tensor([0.0, *map(float, removed)], dtype=torch.float64)
    values = torch.tensor([0.0, *map(float, losses)], dtype=torch.float64)
    slopes = ((values[1:] - values[:-1]) / (points[1:] - points[:-1])).clamp_min(FLOOR)
    slopes = torch.cummax(slopes, 0).values
    middles = (points[1:] + points[:-1]) / 2
    position = torch.arange(n, dtype=torch.float64) + 0.5  # the i-th lowest unit sits at i + 1/2
    at = _interp(position, middles, slopes)
    out = torch.empty(n, dtype=torch.float64)
    out[torch.argsort(order.double().flatten(), stable=True)] = at * (1 + 1e-6 * position / n)
    return out


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp`` at ``x`` (constant beyond the ends), like numpy's ``interp``."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    lo, hi = xp[i - 1], xp[i]
    w = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return fp[i - 1] + w * (fp[i] - fp[i - 1])


def divergence(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || candidate) of the predictive distributions over dim 1 (classes; any further
    dims, e.g. pixels, are averaged too)."""
    ref = F.log_softmax(reference.double(), dim=1)
    got = F.log_softmax(logits.double(), dim=1)
    return float((ref.exp() * (ref - got)).sum(1).mean())


def mean_divergence(reference: list[torch.Tensor], got: list[torch.Tensor], sizes: list[int]) -> float:
    """Mean KL(reference || candidate) over examples, batches weighted by their size."""
    return sum(divergence(r, g) * s for r, g, s in zip(reference, got, sizes)) / max(1, sum(sizes))


@torch.no_grad()
def layer_curves(adapter: Adapter, order: UnitTensors, batches: list[Batch],
                 reference: list[torch.Tensor], advance: Callable[[int], None] = lambda n: None
                 ) -> dict[str, list[tuple[list[int], list[float]]]]:
    """Each layer's removal curve: ``(removed, losses)`` with the lowest ``removed[i]`` units of ``order``
    masked alone in the model, ``losses[i]`` the mean divergence from ``reference`` (the unpruned outputs
    on ``batches``). An adapter that can restart its forward at a layer (``trace``/``run_from``, as for
    trajectory scoring) runs each point from that layer on; any other masks the whole model once per point
    (``masked``)."""
    sizes = [adapter.batch_size(b) for b in batches]
    traces = _traces(adapter, batches)
    out: dict[str, list[tuple[list[int], list[float]]]] = {}
    for kind, layers in order.items():
        out[kind] = []
        for layer, values in enumerate(layers):
            removed = removal_counts(values.numel())
            ascending = torch.argsort(values.double().flatten(), stable=True)
            keeps = torch.ones(len(removed), values.numel())
            for i, k in enumerate(removed):
                keeps[i, ascending[:k]] = 0.0
            got = [_masked_logits(adapter, b, t, order, kind, layer, keeps) for b, t in zip(batches, traces)]
            losses = [mean_divergence(reference, [g[i] for g in got], sizes) for i in range(len(removed))]
            advance(len(removed))
            out[kind].append((removed, losses))
    return out


def _traces(adapter: Adapter, batches: list[Batch]) -> list[Trace | None]:
    """Each batch's trace, or ``None`` for every batch when the adapter cannot restart its forward."""
    try:
        return [adapter.trace(b) for b in batches]
    except NotImplementedError:
        return [None] * len(batches)


def _masked_logits(adapter: Adapter, batch: Batch, trace: Trace | None, order: UnitTensors, kind: str, layer: int,
                   keeps: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs on ``batch`` with each row of ``keeps`` (R, n) as ``kind``'s mask in ``layer``, one
    forward per row: running the rows as replicas of one forward took as long (a user's MiniLM, 67-token
    texts: 20 s either way) and held R times the activations."""
    out = []
    for keep in keeps:
        if trace is not None:
            _, logits = adapter.run_from(trace, kind, layer, keep[None], batch, select=lambda x: x[:0])
            out.append(logits)
            continue
        masks: dict[str, list[torch.Tensor | None]] = {kd: [None] * len(ls) for kd, ls in order.items()}
        masks[kind][layer] = keep
        with adapter.masked(masks):
            out.append(adapter.logits(batch))
    return out


def measured_scores(adapter: Adapter, values: UnitTensors, batches: list[Batch],
                    advance: Callable[[int], None] = lambda n: None) -> UnitTensors:
    """``values`` (the kinds the model prices) turned into measured scores on ``batches``: see the module
    docstring. A ``"global"``-scale UnitTensors over the same kinds and layers."""
    priced = priced_kinds(adapter, values)
    with torch.no_grad():
        reference = [adapter.logits(b) for b in batches]
    curves = layer_curves(adapter, priced, batches, reference, advance)
    return {kind: [marginal_scores(t, *curve).reshape(t.shape) for t, curve in zip(layers, curves[kind])]
            for kind, layers in priced.items()}


def priced_kinds(adapter: Adapter, values: UnitTensors) -> UnitTensors:
    """The kinds of ``values`` the model prices (``unit_counts``): the ones ``measured_scores`` measures."""
    return {k: v for k, v in values.items() if k in adapter.unit_counts()}


def forwards_needed(values: UnitTensors) -> int:
    """How many masked forwards (per batch list) ``measured_scores`` makes for ``priced_kinds`` values: for
    progress bars."""
    return sum(len(removal_counts(t.numel())) for ls in values.values() for t in ls)
