"""Conformance checks for plugin authors: call them from your plugin's tests.

Each check runs a plugin against what its contract in ``optin.contracts`` promises, raises an
``AssertionError`` that says what was wrong, and returns what it computed, so a test can go on to
check the plugin's own properties::

    from optin.testing import check_adapter, check_scorer

    def test_my_scorer_conforms(tiny_adapter, batch):
        scores = check_scorer(MyScorer(alpha=0.5), tiny_adapter, [batch])
        assert (scores["heads"][0] >= 0).all()  # and what your method promises on top

- ``check_adapter``: units, unit sites, ``probe``, masking == removal, the cost model, export and
  reload, and ``run_from`` == masking where the adapter supports trajectory scoring.
- ``check_scorer``: one finite float score per unit, the model left as it was, a known ``scale``,
  JSON-able ``describe()``, well formed ``extras``, the same scores for the same seed.
- ``check_token_scorer``: run-time token scorers (``TokenScorer``) such as ``wpr``.
- ``check_searcher``: exact 0/1 masks of the right shapes within every budget, deterministic.
- ``check_reducer``: the token counts, protected tokens, shapes and sizes a reducer must keep.

Plugins given by name are created through the registry (``options`` as on the command line). Every
check is meant for tiny models (a few layers, a few examples) and takes well under a second on them.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
from typing import Any, Callable, Iterator, Sequence

import torch

from . import registry
from .contracts import SCALES, Adapter, Batch, Reducer, Scorer, ScoreContext, Searcher, TokenScorer
from .errors import OptinError
from .units import CostModel, UnitTensors, kept_counts

__all__ = ["check_adapter", "check_reducer", "check_scorer", "check_searcher", "check_token_scorer",
           "flop_macs", "random_masks"]

MacsCounter = Callable[[Adapter], float]


# --- small helpers -------------------------------------------------------------------------------------

def _fail(message: str) -> None:
    raise AssertionError(message)


def _plugin(kind: str, plugin: Any, options: dict | None) -> Any:
    """An instance of ``plugin`` (an instance, a class, or a registered name with ``options``)."""
    if isinstance(plugin, str):
        return registry.create(kind, plugin, options)
    if isinstance(plugin, type):
        return plugin(**(options or {}))
    return plugin


def _label(plugin: Any) -> str:
    return getattr(plugin, "name", "") or type(plugin).__name__


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _close(what: str, got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    if got.shape != expected.shape:
        _fail(f"{what}: shape {tuple(got.shape)} differs from {tuple(expected.shape)}")
    if not torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol):
        _fail(f"{what}: values differ by up to {_max_diff(got, expected):.3g} "
              f"(tolerance {atol:g} + {rtol:g} x |value|)")


def _finite(what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        _fail(f"{what} has NaN or infinite values")


def _json(what: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        _fail(f"{what} is not JSON-able ({exc}): {value!r}")


class _Untouched:
    """Snapshot of a model's parameters, buffers and ``requires_grad`` flags, to check nothing changed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grads = {k: p.requires_grad for k, p in model.named_parameters()}

    def check(self, who: str) -> None:
        for k, p in self.model.named_parameters():
            if p.requires_grad != self.grads.get(k):
                _fail(f"{who} left requires_grad={p.requires_grad} on parameter {k} (was {self.grads.get(k)}); "
                      "restore it in a `finally`")
        now = self.model.state_dict()
        if set(now) != set(self.state):
            _fail(f"{who} changed the model's parameters/buffers: {sorted(set(now) ^ set(self.state))[:5]}")
        for k, v in self.state.items():
            if not torch.equal(now[k], v):
                _fail(f"{who} changed the model's {k} (by up to {_max_diff(now[k], v):.3g})")


def random_masks(counts: dict[str, list[int]], seed: int = 0, keep: float = 0.6,
                 min_keep: dict[str, int] | None = None, empty_layer: bool = True) -> UnitTensors:
    """Seeded random 0/1 keep-masks for ``counts``; each layer keeps at least ``min_keep[kind]`` units and,
    with ``empty_layer``, the first layer with units of each kind that may lose them all loses them all."""
    g = torch.Generator().manual_seed(seed)
    min_keep = min_keep or {}
    masks: UnitTensors = {}
    for kind, ns in counts.items():
        floor = int(min_keep.get(kind, 0))
        layers = []
        for n in ns:
            m = (torch.rand(n, generator=g) < keep).float()
            if n and int(m.sum()) < min(floor, n):
                m[torch.randperm(n, generator=g)[:min(floor, n)]] = 1.0
            if n > 1 and int(m.sum()) == n:
                m[int(torch.randint(0, n, (1,), generator=g))] = 0.0  # every layer loses something
            layers.append(m)
        if empty_layer and floor == 0:
            first = next((i for i, n in enumerate(ns) if n), None)
            if first is not None:
                layers[first] = torch.zeros(ns[first])
        masks[kind] = layers
    return masks


def flop_macs(adapter: Adapter, batch: Batch) -> float:
    """What ``torch.utils.flop_counter.FlopCounterMode`` counts for ``adapter.logits`` on the first example
    of ``batch``, in MACs (FLOPs / 2). Fused attention kernels (SDPA) are not counted on CPU: build the
    model with eager/unfused attention to compare with a cost model."""
    from torch.utils.flop_counter import FlopCounterMode

    one = {k: v[:1] if torch.is_tensor(v) and v.dim() else v for k, v in batch.items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.logits(one)
    return counter.get_total_flops() / 2


@torch.no_grad()
def _logits(adapter: Adapter, batch: Batch) -> torch.Tensor:
    return adapter.logits(batch)


def _one_layer(counts: dict[str, list[int]], kind: str, layer: int, mask: torch.Tensor) -> UnitTensors:
    return {kind: [mask if i == layer else None for i in range(len(counts[kind]))]}


# --- adapters ----------------------------------------------------------------------------------------

def _check_counts(adapter: Adapter) -> dict[str, list[int]]:
    counts = adapter.unit_counts()
    if not isinstance(counts, dict) or not counts:
        _fail(f"unit_counts() must be a non-empty dict {{kind: [units per layer]}}, got {counts!r}")
    for kind, ns in counts.items():
        if not isinstance(kind, str) or not isinstance(ns, list) or not ns:
            _fail(f"unit_counts()[{kind!r}] must be a non-empty list of unit counts per layer, got {ns!r}")
        if not all(isinstance(n, int) and n >= 0 for n in ns):
            _fail(f"unit_counts()[{kind!r}] must hold non-negative ints, got {ns!r}")
    if adapter.unit_counts() != counts:
        _fail("unit_counts() changed between two calls")
    return counts


def _check_sites(adapter: Adapter, counts: dict[str, list[int]]) -> None:
    from .contracts import UnitSite

    for kind, ns in counts.items():
        for layer, n in enumerate(ns):
            site = adapter.unit_site(kind, layer)
            if site is None and n:
                _fail(f"unit_site({kind!r}, {layer}) is None but the layer has {n} {kind}")
            if site is not None and not isinstance(site, UnitSite):
                _fail(f"unit_site({kind!r}, {layer}) must be an optin.contracts.UnitSite or None, got {site!r}")
    try:
        adapter.unit_site("no-such-kind", 0)
    except OptinError:
        pass
    else:
        _fail("unit_site('no-such-kind', 0) must raise OptinError naming the adapter's kinds")


def _check_probe(adapter: Adapter, batch: Batch, counts: dict[str, list[int]], plain: torch.Tensor,
                 rtol: float, atol: float) -> dict[tuple[str, int], tuple[int, ...]]:
    seen: dict[tuple[str, int], tuple[int, ...]] = {}

    def observe(kind: str, layer: int, x: torch.Tensor) -> None:
        if (kind, layer) in seen:
            _fail(f"probe showed {kind} of layer {layer} twice in one forward")
        seen[(kind, layer)] = tuple(x.shape)

    with torch.no_grad():
        logits = adapter.probe(batch, observe)
    _close("probe()'s logits vs logits()", logits, plain, rtol, atol)
    valid = adapter.valid_tokens(batch)
    b = adapter.batch_size(batch)
    if valid is not None and (valid.dim() != 2 or valid.shape[0] != b or valid.dtype != torch.bool):
        _fail(f"valid_tokens() must be a (B, T) bool tensor with B = {b}, got {valid.dtype} {tuple(valid.shape)}")
    for kind, ns in counts.items():
        for layer, n in enumerate(ns):
            site = adapter.unit_site(kind, layer)
            if site is None:
                continue
            shape = seen.get((kind, layer))
            if shape is None:
                _fail(f"probe did not show the {kind} of layer {layer} (its unit_site's module never ran)")
            if len(shape) != 3 or shape[1:] != (n, site.unit_size):
                _fail(f"probe showed {kind} of layer {layer} as {shape}; expected (N, {n}, {site.unit_size})")
            if valid is not None and shape[0] != int(valid.sum()):
                _fail(f"probe showed {shape[0]} positions for {kind} of layer {layer}; the batch has "
                      f"{int(valid.sum())} valid (non-padding) tokens")
            if valid is None and (shape[0] < b or shape[0] % b):
                _fail(f"probe showed {shape[0]} positions for {kind} of layer {layer}: not a multiple of the "
                      f"batch size {b}")
    return seen


def _check_costs(costs: CostModel, counts: dict[str, list[int]], who: str) -> None:
    if costs.counts != counts:
        _fail(f"{who}: the cost model's counts {costs.counts} differ from unit_counts() {counts}")
    for kind, ns in counts.items():
        per = costs.per_unit.get(kind)
        if per is None or len(per) != len(ns):
            _fail(f"{who}: the cost model needs per_unit[{kind!r}] with one cost per layer ({len(ns)})")
        if any(not math.isfinite(c) or c < 0 for c in per):
            _fail(f"{who}: per_unit[{kind!r}] must be finite and non-negative, got {per}")
    if not costs.macs() > 0:
        _fail(f"{who}: the unpruned model costs {costs.macs()} MACs; a cost model counts at least the units")


def _macs_match(what: str, analytic: float, counted: float, rtol: float) -> None:
    if not math.isclose(analytic, counted, rel_tol=rtol):
        _fail(f"{what}: the cost model says {analytic:.6g} MACs, FlopCounterMode counts {counted:.6g} "
              f"({(analytic - counted) / counted:+.3%})")


def _check_trajectory(adapter: Adapter, batch: Batch, counts: dict[str, list[int]], plain: torch.Tensor,
                      seed: int, rtol: float, atol: float) -> bool:
    try:
        trace = adapter.trace(batch)
    except NotImplementedError:
        return False
    _close("trace().logits vs logits()", trace.logits, plain, rtol, atol)
    b = adapter.batch_size(batch)
    g = torch.Generator().manual_seed(seed + 1)
    for kind, ns in counts.items():
        layers = [i for i, n in enumerate(ns) if n]
        if not layers:
            continue
        layer = layers[len(layers) // 2]
        n = ns[layer]
        masks = torch.ones(2, n)
        masks[0] = (torch.rand(n, generator=g) < 0.5).float()
        masks[0, int(torch.randint(0, n, (1,), generator=g))] = 0.0
        embeddings, logits = adapter.run_from(trace, kind, layer, masks, batch)
        if not isinstance(embeddings, dict) or layer not in embeddings or any(z < layer for z in embeddings):
            _fail(f"run_from({kind!r}, layer {layer}) must return {{z: embedding}} for the blocks z >= {layer}, "
                  f"got keys {sorted(embeddings) if isinstance(embeddings, dict) else embeddings!r}")
        if logits.shape[0] != 2 * b:
            _fail(f"run_from with 2 masks must return logits for 2 x {b} examples, got {tuple(logits.shape)}")
        per_replica = logits.reshape(2, b, *logits.shape[1:])
        for r in range(2):
            with torch.no_grad(), adapter.masked(_one_layer(counts, kind, layer, masks[r])):
                expected = adapter.logits(batch)
            _close(f"run_from({kind!r}, layer {layer}) replica {r} vs masked()", per_replica[r], expected, rtol, atol)
    return True


def check_adapter(adapter: Adapter, batch: Batch, *, count_macs: MacsCounter | None = None,
                  seq_len: float | None = None, seed: int = 0, rtol: float = 1e-5, atol: float = 1e-5,
                  macs_rtol: float = 1e-6, masks: UnitTensors | None = None, empty_layer: bool = True
                  ) -> dict[str, Any]:
    """Check an adapter (wrapping a tiny model in eval mode) on one batch of a few examples.

    Checks: ``unit_counts`` consistent (with the cost model, ``probe`` and removal); ``unit_site`` for every
    kind and layer (None only where a layer has no units; an unknown kind raises OptinError); ``probe``
    shows ``(N, n_units, unit_size)`` per kind and layer with N the valid positions; ``masked`` with ones
    == the plain logits; ``masked`` with random 0/1 masks == a deep copy ``prune``d with them (which then
    reports the kept counts and the MACs ``macs_of_masks`` predicted); ``plan()`` JSON-able and
    ``optin.save_pruned`` -> ``optin.load_pruned`` reproducing the pruned logits; no NaN; where ``trace``
    is supported, ``run_from`` with 2 masks for one layer == ``masked`` with each. The model is left as it
    was (values and ``requires_grad``).

    ``count_macs(adapter)`` (e.g. ``lambda ad: flop_macs(ad, batch)``) measures the MACs the cost model
    must predict, before and after pruning; ``seq_len`` is passed to ``cost_model`` (default
    ``adapter.seq_len([batch])``). ``masks`` are the keep-masks to compare masking and removal with (default:
    ``random_masks``, which empty one layer per kind unless ``empty_layer=False`` or the cost model's
    ``min_keep`` forbids it). Returns ``counts``, ``macs``, ``masks``, ``pruned_counts``, the ``pruned`` copy
    and the ``reloaded`` one, the ``probe`` shapes and ``trajectory`` (whether ``run_from`` was checked).
    """
    untouched = _Untouched(adapter.model)
    counts = _check_counts(adapter)
    _check_sites(adapter, counts)
    plain = _logits(adapter, batch)
    _finite("logits()", plain)
    if plain.shape[0] != adapter.batch_size(batch):
        _fail(f"logits() has {plain.shape[0]} rows for a batch of {adapter.batch_size(batch)} examples")
    probed = _check_probe(adapter, batch, counts, plain, rtol, atol)

    ones = {k: [torch.ones(n) for n in ns] for k, ns in counts.items()}
    with torch.no_grad(), adapter.masked(ones):
        _close("masked() with masks of ones vs logits()", adapter.logits(batch), plain, rtol, atol)

    if seq_len is None:
        seq_len = adapter.seq_len([batch])
    costs = adapter.cost_model(seq_len)
    _check_costs(costs, counts, "cost_model")
    if count_macs is not None:
        _macs_match("unpruned", costs.macs(), count_macs(adapter), macs_rtol)

    masks_given = masks
    if masks is None:
        masks = random_masks(counts, seed, min_keep=costs.min_keep, empty_layer=empty_layer)
    with torch.no_grad(), adapter.masked(masks):
        expected = adapter.logits(batch)
    _finite("masked() logits", expected)
    if torch.allclose(expected, plain, rtol=0, atol=1e-6) and masks_given is None:
        _fail("masking units did not change the logits: masked() does not reach the model")
    pruned = copy.deepcopy(adapter)
    pruned.prune(masks)
    got = _logits(pruned, batch)
    _close("logits after prune() vs masked() with the same masks", got, expected, rtol, atol)
    if pruned.unit_counts() != kept_counts(masks):
        _fail(f"after prune() unit_counts() is {pruned.unit_counts()}, expected the kept counts {kept_counts(masks)}")
    removes = any((m == 0).any() for layers in masks.values() for m in layers if m is not None)
    n_params = sum(p.numel() for p in adapter.model.parameters())
    if removes and sum(p.numel() for p in pruned.model.parameters()) >= n_params:
        _fail("prune() removed units but not a single parameter")
    after = pruned.cost_model(seq_len)
    _check_costs(after, pruned.unit_counts(), "cost_model after prune()")
    if not math.isclose(after.macs(), costs.macs_of_masks(masks), rel_tol=macs_rtol):
        _fail(f"after prune() the cost model says {after.macs():.6g} MACs; before, macs_of_masks predicted "
              f"{costs.macs_of_masks(masks):.6g}")
    if count_macs is not None:
        _macs_match("pruned", after.macs(), count_macs(pruned), macs_rtol)

    _json("plan()", pruned.plan())
    from .export import load_pruned, save_pruned

    with tempfile.TemporaryDirectory() as tmp:
        save_pruned(pruned, tmp)
        again = load_pruned(tmp)
    if type(again) is not type(pruned) or again.unit_counts() != pruned.unit_counts():
        _fail(f"load_pruned gave {type(again).__name__} with {again.unit_counts()}, expected "
              f"{type(pruned).__name__} with {pruned.unit_counts()}")
    _close("logits after save_pruned -> load_pruned", _logits(again, batch), got, 0.0, 1e-6)

    trajectory = _check_trajectory(adapter, batch, counts, plain, seed, rtol, atol)
    untouched.check(f"adapter {adapter.name!r}")
    return {"counts": counts, "macs": costs.macs(), "masks": masks, "pruned_counts": pruned.unit_counts(),
            "pruned": pruned, "reloaded": again, "probe": probed, "trajectory": trajectory}


# --- scorers -----------------------------------------------------------------------------------------

def _check_units(what: str, units: Any, counts: dict[str, list[int]], only_known: bool = True) -> None:
    if not isinstance(units, dict):
        _fail(f"{what} must be a dict {{kind: [1-D tensor per layer]}}, got {type(units).__name__}")
    for kind, layers in units.items():
        if kind not in counts:
            if only_known:
                _fail(f"{what} has kind {kind!r}, which the adapter does not have (kinds: {', '.join(counts)})")
            if not isinstance(layers, list) or not all(torch.is_tensor(t) and t.dim() == 1 for t in layers):
                _fail(f"{what}[{kind!r}] must be a list of 1-D tensors")
            continue
        if not isinstance(layers, list) or len(layers) != len(counts[kind]):
            _fail(f"{what}[{kind!r}] must hold one tensor per layer ({len(counts[kind])})")
        for layer, t in enumerate(layers):
            if not torch.is_tensor(t) or t.dim() != 1 or not t.is_floating_point():
                _fail(f"{what}[{kind!r}][{layer}] must be a 1-D float tensor, got "
                      f"{t.dtype if torch.is_tensor(t) else type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
            if t.numel() != counts[kind][layer]:
                _fail(f"{what}[{kind!r}][{layer}] has {t.numel()} values for {counts[kind][layer]} units")
            _finite(f"{what}[{kind!r}][{layer}]", t)


def _run_scorer(scorer: Scorer, adapter: Adapter, batches: list[Batch], seed: int) -> UnitTensors:
    torch.manual_seed(seed)  # what the core does before scoring
    adapter.model.eval()
    return scorer.score(adapter, batches, ScoreContext(seed=seed))


def check_scorer(scorer: Scorer | str, adapter: Adapter, batches: list[Batch], options: dict | None = None, *,
                 seed: int = 0, deterministic: bool = True) -> UnitTensors:
    """Check a scorer (an instance, or a registered name with ``options``) on ``adapter`` and ``batches``.

    Checks: for every kind it returns (at least one), one finite 1-D float tensor per layer with exactly
    ``adapter.unit_counts()[kind][layer]`` values; the model's parameters, buffers and ``requires_grad``
    unchanged; ``scale`` one of ``optin.contracts.SCALES``; ``describe()`` a JSON-able dict; ``extras`` a dict
    of UnitTensors without the key ``"score"``; with ``deterministic``, the same scores from a second run
    with the same seed. Returns the scores.
    """
    impl = _plugin("scorer", scorer, options)
    who = f"scorer {_label(impl)!r}"
    if getattr(impl, "scale", None) not in SCALES:
        _fail(f"{who}: scale must be one of {', '.join(SCALES)}, got {getattr(impl, 'scale', None)!r}")
    described = impl.describe()
    if not isinstance(described, dict):
        _fail(f"{who}: describe() must return a dict of the options that change the scores")
    _json(f"{who}: describe()", described)
    if impl.needs_labels and any("labels" not in b and "masks" not in b for b in batches):
        _fail(f"{who} needs labels (needs_labels = True): give check_scorer labelled batches")
    counts = adapter.unit_counts()
    untouched = _Untouched(adapter.model)
    scores = _run_scorer(impl, adapter, batches, seed)
    untouched.check(who)
    _check_units(f"{who}: the scores", scores, counts)
    if not scores:
        _fail(f"{who} returned no scores at all")
    extras = getattr(impl, "extras", None) or {}
    if not isinstance(extras, dict) or "score" in extras:
        _fail(f"{who}: extras must be a dict of UnitTensors without the key 'score', got {sorted(extras)!r}")
    for key, units in extras.items():
        _check_units(f"{who}: extras[{key!r}]", units, counts, only_known=False)
    if deterministic:
        again = _run_scorer(_plugin("scorer", scorer, options) if isinstance(scorer, str) else impl,
                            adapter, batches, seed)
        for kind, layers in scores.items():
            for layer, t in enumerate(layers):
                if not torch.equal(again.get(kind, [None] * (layer + 1))[layer], t):
                    _fail(f"{who} is not deterministic: {kind} of layer {layer} differ between two runs with seed "
                          f"{seed} (pass deterministic=False if that is by design)")
    return scores


def check_token_scorer(scorer: TokenScorer | str, options: dict | None = None, *, n_layers: int = 4,
                       shape: tuple[int, int, int] = (2, 3, 9), seed: int = 0) -> list[torch.Tensor]:
    """Check a run-time token scorer (``TokenScorer``, e.g. ``wpr``) on random attention probabilities
    ``shape`` = (B, H, N) in every block of an ``n_layers``-block model.

    Checks: ``token_importance`` returns finite float (B, N) importances, deterministically, without
    changing the attention; ``method_options()`` (and ``describe()``) JSON-able dicts; a token scorer that
    is also a ``Scorer`` declares a known ``scale`` and refuses unit scoring with NotImplementedError (the
    recipe reports it as a one-line error). Returns the importances per block.
    """
    impl = _plugin("scorer", scorer, options)
    who = f"token scorer {_label(impl)!r}"
    if not isinstance(impl, TokenScorer):
        _fail(f"{who} is not an optin.contracts.TokenScorer")
    opts = impl.method_options()
    if not isinstance(opts, dict):
        _fail(f"{who}: method_options() must return a dict")
    _json(f"{who}: method_options()", opts)
    if isinstance(impl, Scorer):
        if impl.scale not in SCALES:
            _fail(f"{who}: scale must be one of {', '.join(SCALES)}, got {impl.scale!r}")
        _json(f"{who}: describe()", impl.describe())
        try:
            impl.score(None, [], ScoreContext(seed=seed))  # type: ignore[arg-type]
        except NotImplementedError:
            pass
        else:
            _fail(f"{who} ranks tokens at run time: its score() must raise NotImplementedError")
    b, h, n = shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(n_layers):
        attn = torch.randn(b, h, n, n, generator=g).softmax(-1)
        before = attn.clone()
        imp = impl.token_importance(attn, layer, n_layers)
        if not torch.is_tensor(imp) or tuple(imp.shape) != (b, n) or not imp.is_floating_point():
            _fail(f"{who}: token_importance must return float (B, N) = {(b, n)} importances, got "
                  f"{tuple(getattr(imp, 'shape', ()))}")
        _finite(f"{who}: token_importance of block {layer}", imp)
        if not torch.equal(attn, before):
            _fail(f"{who}: token_importance changed the attention probabilities in place")
        if not torch.equal(impl.token_importance(attn, layer, n_layers), imp):
            _fail(f"{who}: token_importance is not deterministic (block {layer})")
        out.append(imp)
    return out


# --- searchers ---------------------------------------------------------------------------------------

def check_searcher(searcher: Searcher | str, scores: UnitTensors, costs: CostModel,
                   budgets: Sequence[float] = (0.9, 0.6, 0.3), options: dict | None = None
                   ) -> dict[float, UnitTensors]:
    """Check a searcher (an instance, or a registered name with ``options``) on ``scores`` (on a common scale)
    and ``costs``, at each budget and at 1.0.

    Checks: masks exactly 0/1, one per layer with the cost model's counts, for kinds the cost model has;
    ``costs.macs_of_masks(masks) <= unit_budget_for(budget) * costs.macs()`` (relative tolerance 1e-9);
    at budget 1.0 everything is kept (when the unit budget is 1.0); the same masks from a second call;
    the scores left unchanged. Returns the masks per budget.
    """
    impl = _plugin("searcher", searcher, options)
    who = f"searcher {_label(impl)!r}"
    saved = {k: [t.clone() for t in v] for k, v in scores.items()}
    out: dict[float, UnitTensors] = {}
    for budget in [*budgets, 1.0]:
        masks = impl.search(scores, costs, budget)
        _check_units(f"{who} (budget {budget}): the masks", masks, costs.counts)
        for kind, layers in masks.items():
            for layer, m in enumerate(layers):
                if not ((m == 0) | (m == 1)).all():
                    _fail(f"{who} (budget {budget}): the mask of {kind} layer {layer} is not exactly 0/1: {m.tolist()}")
        limit = impl.unit_budget_for(budget)
        got = costs.macs_of_masks(masks)
        if got > limit * costs.macs() * (1 + 1e-9):
            _fail(f"{who}: masks for budget {budget} keep {got / costs.macs():.6f} of the MACs, above "
                  f"unit_budget_for({budget}) = {limit}")
        if budget == 1.0 and limit >= 1.0 and kept_counts(masks) != {k: costs.counts[k] for k in masks}:
            _fail(f"{who}: at budget 1.0 everything fits, but the masks remove units: {kept_counts(masks)}")
        again = impl.search(scores, costs, budget)
        if set(again) != set(masks) or any(not torch.equal(a, m) for k in masks for a, m in zip(again[k], masks[k])):
            _fail(f"{who} is not deterministic: two searches at budget {budget} gave different masks")
        out[budget] = masks
    for kind, layers in saved.items():
        if any(not torch.equal(a, b) for a, b in zip(scores[kind], layers)):
            _fail(f"{who} changed the scores of {kind} in place")
    return out


# --- reducers ----------------------------------------------------------------------------------------

def _is_dropped(x: torch.Tensor, sizes: torch.Tensor, out: torch.Tensor, out_sizes: torch.Tensor) -> bool:
    """True when every output token is one of the input tokens, with its size (a token dropper)."""
    for b in range(x.shape[0]):
        for j in range(out.shape[1]):
            same = (x[b] == out[b, j]).all(-1) & (sizes[b] == out_sizes[b, j])
            if not same.any():
                return False
    return True


def _reductions(n: int, protected: int, rs: Sequence[int] | None) -> Iterator[int]:
    yield from (rs if rs is not None else sorted({0, 1, 2, (n - protected) // 2, n - protected - 1}))


def check_reducer(reducer: Reducer | str, options: dict | None = None, *, shape: tuple[int, int, int] = (2, 13, 6),
                  protected: Sequence[int] = (1, 2), rs: Sequence[int] | None = None, merging: bool | None = None,
                  seed: int = 0) -> list[tuple[int, int, tuple[int, ...]]]:
    """Check a token reducer (an instance, or a registered name with ``options``) on random tokens ``shape`` =
    (B, N, D) with sizes of ones, for each number of ``protected`` tokens and each ``r`` in ``rs`` (default
    0, 1, 2, half and all but one of the unprotected tokens).

    Checks: r = 0 returns ``x`` unchanged; otherwise N - r tokens, exactly when r is at most half of the
    unprotected tokens and at least one fewer when r is larger (a bipartite merge removes at most half; the
    adapter calls the reducer again for the rest); the protected tokens first and unchanged; the batch
    shape kept; no NaN; sizes non-negative; merging reducers (``merging=True``) keep each example's total
    size, droppers (``merging=False``) return input tokens with their sizes (None: one of the two).
    ``importance`` is given when the reducer ``needs_importance``. Returns (protected, r, output shape).
    """
    impl = _plugin("reducer", reducer, options)
    who = f"reducer {_label(impl)!r}"
    b, n, d = shape
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[int, int, tuple[int, ...]]] = []
    for p in protected:
        for r in _reductions(n, p, rs):
            x = torch.randn(b, n, d, generator=g)
            sizes = torch.ones(b, n)
            extra = {"metric": torch.randn(b, n, 4, generator=g)}
            if impl.needs_importance:
                extra["importance"] = torch.rand(b, n, generator=g)
            y, s = impl.reduce(x.clone(), sizes.clone(), r, protected=p, **extra)
            what = f"{who} (r={r}, protected={p}, N={n})"
            if r == 0:
                if not (torch.equal(y, x) and torch.equal(s, sizes)):
                    _fail(f"{what}: r = 0 must return x and sizes unchanged")
                out.append((p, r, tuple(y.shape)))
                continue
            if y.dim() != 3 or y.shape[0] != b or y.shape[2] != d or tuple(s.shape) != tuple(y.shape[:2]):
                _fail(f"{what}: returned x' {tuple(y.shape)} and sizes' {tuple(s.shape)}; expected (B, N', D) = "
                      f"({b}, N', {d}) and (B, N')")
            removed = n - y.shape[1]
            if removed > r or removed < 1 or (r <= (n - p) // 2 and removed != r):
                _fail(f"{what}: removed {removed} tokens; expected {r}" +
                      ("" if r <= (n - p) // 2 else f" (at least 1 when r is above half the {n - p} unprotected)"))
            _finite(f"{what}: x'", y)
            _finite(f"{what}: sizes'", s)
            if not torch.equal(y[:, :p], x[:, :p]) or not torch.equal(s[:, :p], sizes[:, :p]):
                _fail(f"{what}: the {p} protected tokens must come first, unchanged, with their sizes")
            if (s < 0).any():
                _fail(f"{what}: sizes' has negative values")
            kept_total = torch.allclose(s.sum(1), sizes.sum(1))
            dropped = _is_dropped(x, sizes, y, s)
            if merging is True and not kept_total:
                _fail(f"{what}: a merging reducer keeps each example's total size {n}, got {s.sum(1).tolist()}")
            if merging is False and not dropped:
                _fail(f"{what}: a dropping reducer returns input tokens with their sizes")
            if merging is None and not (kept_total or dropped):
                _fail(f"{what}: sizes' neither keep each example's total (merging) nor follow the kept tokens "
                      "(dropping)")
            out.append((p, r, tuple(y.shape)))
    return out
