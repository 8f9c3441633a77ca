"""Every built-in plugin passes ``optin.testing``, the conformance kit plugin authors call in their tests;
a scorer written against the public contract alone runs on all nine adapters; the kit catches broken plugins."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import optin
from optin import registry
from optin.contracts import Scorer
from optin.scales import to_common_scale
from optin.testing import (check_adapter, check_reducer, check_scorer, check_searcher, check_token_scorer,
                           random_masks)
from tiny_models import ADAPTERS, make_vit, mmseg_unavailable, tiny

SCORERS = ["trajectory", "magnitude", "fisher", "random"]


def _adapters() -> list:
    why = mmseg_unavailable()
    return [pytest.param(n, marks=pytest.mark.skipif(why is not None, reason=f"mmseg-mask2former unavailable: {why}"))
            if n == "mmseg-mask2former" else n for n in ADAPTERS]


# --- built-in plugins --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", _adapters())
def test_adapter_conforms(name):
    t = tiny(name)
    result = check_adapter(t.adapter, t.batch, count_macs=t.count_macs, seq_len=t.seq_len)
    assert result["trajectory"]  # every built-in adapter restarts forwards for the trajectory scorer
    assert result["pruned_counts"] != result["counts"]


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("name", _adapters())
def test_scorer_conforms(name, scorer):
    t = tiny(name)
    options = {"trajectory": t.options, "fisher": {"micro_batch": 2}}.get(scorer)
    scores = check_scorer(scorer, t.adapter, [t.batch], options)
    assert set(scores) == set(t.adapter.unit_counts())


def test_wpr_conforms_as_a_token_scorer():
    importances = check_token_scorer("wpr", {"similarity_tokens": 3}, n_layers=12)
    assert len(importances) == 12


@pytest.mark.parametrize("name", ["bert", "vit", "swin", "vgg", "mobilenetv2"])
def test_ptf_conforms(name):
    t = tiny(name)
    scores = optin.score(t.adapter, [t.batch], "magnitude")
    costs = t.adapter.cost_model(t.seq_len or t.adapter.seq_len([t.batch]))
    options = {k: v for k, v in t.adapter.search_defaults.items() if k in registry.option_names(registry.get(
        "searcher", "ptf"))}
    masks = check_searcher("ptf", to_common_scale(scores.values, scores.scale, costs), costs, options=options)
    assert costs.macs_of_masks(masks[0.3]) < costs.macs_of_masks(masks[0.9])


@pytest.mark.parametrize("units", [True, False])
def test_token_schedule_conforms(units):
    ad = make_vit()
    costs = ad.cost_model()
    scores = optin.score(ad, [tiny("vit").batch], "random").values
    masks = check_searcher("token-schedule", scores, costs, options={"units": units})
    assert (costs.macs_of_masks(masks[0.6]) < costs.macs()) == units


@pytest.mark.parametrize("name,merging", [("tome", True), ("random", False), ("prune", False)])
def test_reducers_conform(name, merging):
    shapes = check_reducer(name, merging=merging)
    assert {r for _, r, _ in shapes} >= {0, 1, 2}


# --- a new scorer, public contract methods only -------------------------------------------------------

class MeanAbsActivation(Scorer):
    """Mean |activation| of each unit over the valid calibration positions, read through ``adapter.probe``."""

    name = "activation-norm"
    scale = "kind"  # activations of heads and of neurons are not on one scale

    def score(self, adapter, batches, ctx):
        counts = adapter.unit_counts()
        total = {k: [torch.zeros(n, dtype=torch.float64) for n in ns] for k, ns in counts.items()}
        seen = {k: [0] * len(ns) for k, ns in counts.items()}

        def observe(kind, layer, x):  # x: (valid positions, units, unit size)
            total[kind][layer] += x.detach().abs().sum(dim=(0, 2)).double()
            seen[kind][layer] += x.shape[0] * x.shape[2]

        with torch.no_grad():
            for batch in batches:
                adapter.probe(batch, observe)
        return {k: [(t / max(n, 1)).float() for t, n in zip(total[k], seen[k])] for k in counts}


@pytest.mark.parametrize("name", _adapters())
def test_a_scorer_written_against_the_contract_runs_on_every_adapter(name, monkeypatch):
    monkeypatch.setitem(registry._local["scorer"], "activation-norm", MeanAbsActivation)  # undone after the test
    t = tiny(name)
    scores = optin.score(t.adapter, [t.batch], "activation-norm")
    assert scores.scale == "kind" and scores.scorer == "activation-norm"
    checked = check_scorer(MeanAbsActivation(), t.adapter, [t.batch])
    for kind, layers in checked.items():
        assert all(torch.equal(a, b) for a, b in zip(layers, scores.values[kind]))
        assert any((s > 0).any() for s in layers)
    reference = copy.deepcopy(t.adapter)
    result = optin.prune(t.adapter, [t.batch], scores=scores, budget=t.budget, recover="none")  # removal alone
    assert result.macs_after <= t.budget * result.macs_before * (1 + 1e-9)
    assert t.adapter.unit_counts() == result.info["kept"] != reference.unit_counts()
    with torch.no_grad(), reference.masked(result.masks):
        expected = reference.logits(t.batch)
    with torch.no_grad():
        assert torch.allclose(t.adapter.logits(t.batch), expected, atol=1e-4)


def test_activation_scores_are_the_mean_absolute_activation():
    """On BERT, a neuron's score is the mean |input of the FFN output projection| over the non-padding tokens."""
    t = tiny("bert")
    seen = {}
    hook = t.adapter.layers[1].output.dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        t.adapter.logits(t.batch)
    hook.remove()
    valid = t.batch["attention_mask"].bool()
    expected = seen["x"][valid].abs().mean(0)
    got = MeanAbsActivation().score(t.adapter, [t.batch], None)["neurons"][1]
    assert torch.allclose(got, expected, rtol=1e-5)


# --- the kit fails on broken plugins ------------------------------------------------------------------

class _Fixed(Scorer):
    """Returns what it is given (to feed the kit wrong scores)."""

    def __init__(self, make):
        self.make = make

    def score(self, adapter, batches, ctx):
        return self.make(adapter)


def _ones(adapter):
    return {k: [torch.ones(n) for n in ns] for k, ns in adapter.unit_counts().items()}


def _freeze(adapter):
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    return _ones(adapter)


@pytest.mark.parametrize("make,message", [
    (lambda ad: {"heads": [torch.ones(2)] * 3}, "2 values for 4 units"),
    (lambda ad: {"heads": [torch.full((4,), float("nan"))] * 3}, "NaN"),
    (lambda ad: {"channels": [torch.ones(4)]}, "does not have"),
    (lambda ad: {"heads": [torch.ones(4, dtype=torch.long)] * 3}, "float"),
    (lambda ad, calls=itertools.count(): {"heads": [torch.full((4,), float(next(calls)))] * 3}, "not deterministic"),
    (_freeze, "requires_grad"),
])
def test_check_scorer_names_what_is_wrong(make, message):
    with pytest.raises(AssertionError, match=message):
        check_scorer(_Fixed(make), tiny("bert").adapter, [tiny("bert").batch])


def test_check_scorer_refuses_an_unknown_scale_and_extras_named_score():
    t = tiny("bert")
    odd = _Fixed(_ones)
    odd.scale = "loss"
    with pytest.raises(AssertionError, match="scale must be one of global, kind, layer"):
        check_scorer(odd, t.adapter, [t.batch])
    clash = _Fixed(_ones)
    clash.extras = {"score": _ones(t.adapter)}
    with pytest.raises(AssertionError, match="without the key 'score'"):
        check_scorer(clash, t.adapter, [t.batch])


def test_check_adapter_catches_masking_that_does_not_match_removal():
    from optin_plugins.adapters.bert import BertAdapter

    class Forgetful(BertAdapter):
        def prune(self, masks):  # removes the heads but forgets the neurons
            super().prune({"heads": masks["heads"]})

    t = tiny("bert")
    with pytest.raises(AssertionError, match="after prune"):
        check_adapter(Forgetful(t.adapter.model), t.batch)


def test_check_searcher_catches_overspending_and_fractional_masks():
    from optin.contracts import Searcher
    from optin.units import CostModel

    costs = CostModel(per_unit={"neurons": [1.0, 1.0]}, counts={"neurons": [4, 4]})
    scores = {"neurons": [torch.rand(4), torch.rand(4)]}

    class KeepsAll(Searcher):
        def search(self, scores, costs, budget):
            return {"neurons": [torch.ones(4), torch.ones(4)]}

    class Halves(Searcher):
        def search(self, scores, costs, budget):
            return {"neurons": [torch.full((4,), 0.5), torch.zeros(4)]}

    with pytest.raises(AssertionError, match="above unit_budget_for"):
        check_searcher(KeepsAll(), scores, costs)
    with pytest.raises(AssertionError, match="not exactly 0/1"):
        check_searcher(Halves(), scores, costs)


def test_check_reducer_catches_moved_protected_tokens_and_wrong_counts():
    from optin.contracts import Reducer

    class DropsFirst(Reducer):  # removes the class token too
        def reduce(self, x, sizes, r, *, metric=None, importance=None, protected=1):
            return x[:, r:], sizes[:, r:]

    class DropsOneTooMany(Reducer):
        def reduce(self, x, sizes, r, *, metric=None, importance=None, protected=1):
            keep = x.shape[1] - r - (1 if r else 0)
            return x[:, :keep], sizes[:, :keep]

    with pytest.raises(AssertionError, match="protected tokens must come first"):
        check_reducer(DropsFirst())
    with pytest.raises(AssertionError, match="removed 2 tokens; expected 1"):
        check_reducer(DropsOneTooMany())


def test_check_token_scorer_catches_a_wrong_shape():
    from optin.contracts import TokenScorer

    class PerHead(TokenScorer):
        def token_importance(self, attn, layer, n_layers):
            return attn.sum(-2)  # (B, H, N): the heads were not combined

    with pytest.raises(AssertionError, match=r"float \(B, N\)"):
        check_token_scorer(PerHead())


def test_random_masks_respect_min_keep_and_empty_one_layer():
    masks = random_masks({"heads": [4, 4], "channels": [3, 5]}, min_keep={"channels": 1})
    assert masks["heads"][0].sum() == 0 and 0 < masks["heads"][1].sum() < 4
    assert all(1 <= m.sum() < m.numel() for m in masks["channels"])
