"""Scorers (trajectory against a naive reference, magnitude, fisher, random) and the PTF mask search."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import optin
from conftest import HEADS, HIDDEN, INTERMEDIATE, LAYERS, make_batch, make_tiny_bert
from optin_plugins.scorers import distances as losses
from optin.errors import BudgetError
from optin.recipe import check_budget
from optin.units import CostModel
from optin_plugins.adapters.bert import BertAdapter
from optin_plugins.searchers.ptf import PTFSearcher, greedy_fill, ptf_search

D = HIDDEN // HEADS
SCORERS = ["trajectory", "magnitude", "fisher", "random"]


def _counts(units):
    return {k: [int(t.numel()) for t in v] for k, v in units.items()}


# --- every scorer -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCORERS)
def test_one_score_per_unit(adapter, batch, name):
    options = {"neuron_group": 8} if name == "trajectory" else None
    scores = optin.score(adapter, [batch], scorer=name, options=options)
    assert _counts(scores.values) == adapter.unit_counts()
    for layers in scores.values.values():
        for t in layers:
            assert t.dim() == 1 and torch.isfinite(t).all()
    assert scores.scorer == name and scores.adapter == "bert"


def test_scoring_does_not_change_the_model(adapter, batch):
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    for name in SCORERS:
        optin.score(adapter, [batch], scorer=name, options={"neuron_group": 16} if name == "trajectory" else None)
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in adapter.model.parameters())  # fisher restores requires_grad


def test_trajectory_is_deterministic_for_a_seed(batch):
    opts = {"rows": 12, "neuron_group": 4}
    a = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=3).values
    b = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=3).values
    c = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=4).values
    for kind in a:
        for x, y in zip(a[kind], b[kind]):
            assert torch.equal(x, y)
    # with fewer sampled rows than tokens, the seed picks the sample
    assert any(not torch.equal(x, y) for kind in a for x, y in zip(a[kind], c[kind]))


def test_trajectory_neuron_group_gives_equal_scores_within_groups(adapter, batch):
    values = optin.score(adapter, [batch], "trajectory", {"neuron_group": 4}).values
    for layer in values["neurons"]:
        groups = layer.reshape(-1, 4)
        assert torch.equal(groups, groups[:, :1].expand_as(groups))
        assert groups[:, 0].unique().numel() > 1  # different groups differ
    for layer in values["heads"]:  # heads are never grouped
        assert layer.unique().numel() == HEADS


def test_trajectory_scores_are_positive_for_units_that_matter(adapter, batch):
    values = optin.score(adapter, [batch], "trajectory", {"neuron_group": 8}).values
    assert all((t > 0).all() for t in values["heads"])
    assert all((t >= 0).all() for t in values["neurons"])


def test_trajectory_rejects_bad_group():
    from optin_plugins.scorers.trajectory import TrajectoryScorer

    with pytest.raises(optin.OptinError):
        TrajectoryScorer(neuron_group=0)


def test_fisher_scores_are_non_negative(adapter, batch):
    values = optin.score(adapter, [batch], "fisher", {"micro_batch": 2}).values
    flat = torch.cat([t for v in values.values() for t in v])
    assert (flat >= 0).all()
    assert (flat > 0).any()


def test_fisher_needs_labels(adapter, batch):
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(optin.OptinError, match="labelled"):
        optin.score(adapter, [unlabelled], "fisher")


def test_fisher_equals_squared_mask_gradient(adapter, batch):
    """One micro-batch: the Fisher score is exactly (d CE / d mask)^2 at mask = 1."""
    values = optin.score(adapter, [batch], "fisher", {"micro_batch": 64}).values
    masks = {k: [torch.ones(n, requires_grad=True) for n in ns] for k, ns in adapter.unit_counts().items()}
    with adapter.masked(masks):
        loss = torch.nn.functional.cross_entropy(adapter.model(**{k: v for k, v in batch.items()
                                                                  if k != "labels"}).logits, batch["labels"])
    loss.backward()
    for kind in masks:
        for l in range(LAYERS):
            assert torch.allclose(values[kind][l], masks[kind][l].grad.pow(2), rtol=1e-5, atol=1e-12)


def test_magnitude_is_the_norm_of_owned_weights(adapter, batch):
    values = optin.score(adapter, [batch], "magnitude").values
    blk = adapter.layers[1]
    h = 2
    rows = slice(h * D, (h + 1) * D)
    owned = torch.cat([blk.attention.self.query.weight[rows].reshape(-1), blk.attention.self.key.weight[rows].reshape(-1),
                       blk.attention.self.value.weight[rows].reshape(-1),
                       blk.attention.output.dense.weight[:, rows].reshape(-1)])
    assert values["heads"][1][h].item() == pytest.approx(owned.norm().item(), rel=1e-5)
    j = 5
    owned = torch.cat([blk.intermediate.dense.weight[j], blk.output.dense.weight[:, j]])
    assert values["neurons"][1][j].item() == pytest.approx(owned.norm().item(), rel=1e-5)


def test_random_scores_are_seeded(adapter, batch):
    a = optin.score(adapter, [batch], "random", seed=1).values
    b = optin.score(adapter, [batch], "random", seed=1).values
    c = optin.score(adapter, [batch], "random", seed=2).values
    assert all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert not all(torch.equal(x, y) for k in a for x, y in zip(a[k], c[k]))


# --- trajectory against a naive reference (float64) ---------------------------------------------

def _capture_forward(adapter, batch, masks=None):
    """Full forward (optionally masked) returning FFN-output-dense outputs of every block and logits."""
    captured = {}
    handles = [adapter.layers[z].output.dense.register_forward_hook(
        lambda m, a, o, z=z: captured.__setitem__(z, o.detach())) for z in range(LAYERS)]
    try:
        with torch.no_grad():
            if masks is None:
                logits = adapter.logits(batch)
            else:
                with adapter.masked(masks):
                    logits = adapter.logits(batch)
    finally:
        for h in handles:
            h.remove()
    return [captured[z] for z in range(LAYERS)], logits


def naive_trajectory(adapter, batches, rows_k, seed, temperature):
    """Per unit: one full masked forward per batch; L_MD over later blocks on the fixed row sample + KD."""
    counts = adapter.unit_counts()
    md = {k: [torch.zeros(n, dtype=torch.float64) for n in ns] for k, ns in counts.items()}
    kd = {k: [torch.zeros(n, dtype=torch.float64) for n in ns] for k, ns in counts.items()}
    for b, batch in enumerate(batches):
        ref_emb, ref_logits = _capture_forward(adapter, batch)
        B, T = batch["input_ids"].shape
        rows = losses.sample_rows(batch["attention_mask"].bool(), B * T, rows_k, seed + b)
        ref_maps = [losses.relation_map(losses.select_rows(e, 1, rows))[0] for e in ref_emb]
        for kind, layer, j, masks in _each_unit_removed(counts):
            emb, logits = _capture_forward(adapter, batch, masks)
            targets = list(range(layer + 1, LAYERS)) or [layer]
            md[kind][layer][j] += sum(
                float(losses.manifold_distance(losses.relation_map(losses.select_rows(emb[z], 1, rows)),
                                               ref_maps[z])[0]) for z in targets)
            kd[kind][layer][j] += float(losses.kd_divergence(logits.unsqueeze(0), ref_logits, temperature)[0])
    return md, kd


def _each_unit_removed(counts):
    """``(kind, layer, j, masks)`` for every unit, ``masks`` removing that unit alone."""
    for kind, ns in counts.items():
        for layer, n in enumerate(ns):
            for j in range(n):
                keep = torch.ones(n)
                keep[j] = 0.0
                yield kind, layer, j, {kind: [keep if l == layer else None for l in range(len(ns))]}


@pytest.fixture(scope="module")
def double_setup():
    model = make_tiny_bert().double()
    batches = [make_batch(seed=1), make_batch(batch_size=3, seq_len=8, seed=2)]
    adapter = BertAdapter(model)
    md, kd = naive_trajectory(adapter, batches, rows_k=20, seed=5, temperature=4.0)
    return adapter, batches, md, kd


def _rel_close(got, expected, rtol):
    got, expected = got.double(), expected.double()
    return bool(((got - expected).abs() <= rtol * expected.abs().clamp_min(1e-30)).all())


@pytest.mark.parametrize("tokens_per_forward", [32768, 60])  # one chunk per layer, or several
def test_trajectory_matches_naive_reference(double_setup, tokens_per_forward):
    adapter, batches, md, kd = double_setup
    lam = 0.5
    scores = optin.score(adapter, batches, "trajectory",
                         {"rows": 20, "lambda_kd": lam, "temperature": 4.0, "tokens_per_forward": tokens_per_forward,
                          "estimator": "exact"},
                         seed=5)
    assert _counts(scores.values) == adapter.unit_counts()
    for kind in md:
        for l in range(LAYERS):
            assert _rel_close(scores.extras["md"][kind][l], md[kind][l], 1e-6), (kind, l)
            assert _rel_close(scores.extras["kd"][kind][l], kd[kind][l], 1e-6), (kind, l)
            assert _rel_close(scores.values[kind][l], md[kind][l] + lam * kd[kind][l], 1e-6), (kind, l)
            assert (md[kind][l] > 0).all()


def test_trajectory_auto_lambda_is_a_power_of_ten_scaling_kd(double_setup):
    adapter, batches, md, kd = double_setup
    scores = optin.score(adapter, batches, "trajectory", {"rows": 20, "lambda_contribution": 10.0,
                                                          "estimator": "exact"}, seed=5)
    md_all = torch.cat([t for v in md.values() for t in v])
    kd_all = torch.cat([t for v in kd.values() for t in v])
    lam = 10.0 ** round(math.log10(md_all.mean().item() / (10.0 * kd_all.mean().item())))
    for kind in md:
        for l in range(LAYERS):
            assert _rel_close(scores.values[kind][l], md[kind][l] + lam * kd[kind][l], 1e-6)
    ratio = (lam * kd_all.mean() / md_all.mean()).item()
    assert 0.1 / math.sqrt(10) <= ratio <= 0.1 * math.sqrt(10)  # KD is about 1/10 of MD


# --- losses ------------------------------------------------------------------------------------

def test_manifold_distance_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(5, 7, generator=g)
    fa = a / a.norm(dim=-1, keepdim=True)
    fb = b / b.norm(dim=-1, keepdim=True)
    expected = ((fa @ fa.transpose(1, 2) - fb @ fb.T) ** 2).sum(dim=(1, 2))
    got = losses.manifold_distance(losses.relation_map(a), losses.relation_map(b[None])[0])
    assert torch.allclose(got, expected, atol=1e-5)
    assert losses.manifold_distance(losses.relation_map(b[None]), losses.relation_map(b[None])[0]).item() == 0


def test_kd_divergence_formula():
    g = torch.Generator().manual_seed(0)
    z, zp = torch.randn(4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    T = 4.0
    p = torch.softmax(z.double() / T, -1)
    expected = torch.stack([(p * (p.log() - torch.log_softmax(zp[r].double() / T, -1))).sum() * T * T
                            for r in range(2)])
    got = losses.kd_divergence(zp, z, T)
    assert got.dtype == torch.float64  # single-unit KLs are below float32 resolution
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    p1 = torch.softmax(z.double(), -1)
    official = torch.stack([(p1 * (p1.log() - torch.log_softmax(zp[r].double(), -1))).sum() * T * T for r in range(2)])
    assert torch.allclose(losses.kd_divergence(zp, z, T, divide_by_t=False), official, rtol=1e-12, atol=0)


def test_kd_of_a_tiny_change_is_positive_and_second_order():
    """A logit change of 1e-4 gives a KL of ~1e-9 relative: float32 would return noise (or negatives);
    float64 gives the second-order value 1/2 d^T (diag(p) - p p^T) d / T^2 * T^2."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 5, generator=g)
    d = 1e-4 * torch.randn(8, 5, generator=g)
    moved = z + d
    got = losses.kd_divergence(moved.unsqueeze(0), z, 4.0)[0]
    d = moved.double() - z.double()  # the change float32 actually holds
    p = torch.softmax(z.double() / 4, -1)
    cov = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    second = 0.5 * torch.einsum("bi,bij,bj->", d, cov, d)
    assert got > 0
    assert abs(float(got) / float(second) - 1) < 1e-3


def test_sample_rows_skips_padding_and_is_fixed_by_seed():
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    assert losses.sample_rows(valid, 8, 100, 0).tolist() == [0, 1, 2, 4, 5]
    a = losses.sample_rows(valid, 8, 3, 0)
    assert a.numel() == 3 and set(a.tolist()) <= {0, 1, 2, 4, 5}
    assert torch.equal(a, losses.sample_rows(valid, 8, 3, 0))


# --- PTF mask search ------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
def test_ptf_meets_budget(adapter, batch, budget):
    scores = optin.score(adapter, [batch], "magnitude").values
    costs = adapter.cost_model(adapter.seq_len([batch]))
    masks = PTFSearcher().search(scores, costs, budget)
    assert _counts(masks) == adapter.unit_counts()
    got = costs.macs_of_masks(masks)
    assert got <= budget * costs.macs() * (1 + 1e-9)
    assert got >= (budget - 0.1) * costs.macs()  # and does not waste most of it
    assert all(((m == 0) | (m == 1)).all() for v in masks.values() for m in v)


def test_recipe_search_meets_budget_and_prunes(adapter, batch):
    result = optin.prune(adapter, [batch], scorer="random", budget=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert adapter.unit_counts() == result.info["kept"]


def test_ptf_keeps_highest_scored_units_when_costs_are_equal():
    g = torch.Generator().manual_seed(0)
    scores = {"heads": [torch.rand(4, generator=g) for _ in range(3)],
              "neurons": [torch.rand(6, generator=g) for _ in range(3)]}
    costs = CostModel(per_unit={"heads": [1.0] * 3, "neurons": [1.0] * 3},
                      counts={"heads": [4] * 3, "neurons": [6] * 3})
    total = costs.macs()
    for budget in (0.25, 0.5, 0.8):
        masks = PTFSearcher().search(scores, costs, budget)
        n_keep = int(budget * total + 1e-9)
        flat = torch.cat([t for k in ("heads", "neurons") for t in scores[k]])
        flat_mask = torch.cat([t for k in ("heads", "neurons") for t in masks[k]])
        top = set(torch.argsort(flat, descending=True)[:n_keep].tolist())
        assert set(torch.nonzero(flat_mask).flatten().tolist()) == top, budget


def test_ptf_neurons_only_is_greedy_fill():
    scores = {"neurons": [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.7, 0.2])]}
    costs = CostModel(per_unit={"neurons": [1.0, 1.0]}, counts={"neurons": [3, 2]})
    masks = PTFSearcher().search(scores, costs, 0.6)  # 3 of 5 units
    assert masks["neurons"][0].tolist() == [0, 1, 1] and masks["neurons"][1].tolist() == [1, 0]


def test_ptf_search_hand_made_examples():
    hs, hc = torch.tensor([10.0, 1.0]), torch.tensor([5.0, 5.0])
    os_, oc = torch.tensor([3.0, 3.0, 3.0]), torch.tensor([2.0, 2.0, 2.0])
    # capacity 6: three neurons (9) beat the best head alone (10 + nothing fits)? no: 10 > 9
    h, o = ptf_search(hs, hc, os_, oc, 6.0)
    assert h.tolist() == [0] and o.tolist() == []
    # capacity 7: best head + one neuron = 13
    h, o = ptf_search(hs, hc, os_, oc, 7.0)
    assert h.tolist() == [0] and len(o) == 1
    # capacity 4: no head fits, two neurons
    h, o = ptf_search(hs, hc, os_, oc, 4.0)
    assert h.tolist() == [] and sorted(o.tolist()) == [0, 1]
    # capacity 0: nothing
    h, o = ptf_search(hs, hc, os_, oc, 0.0)
    assert h.numel() == 0 and o.numel() == 0
    # everything fits
    h, o = ptf_search(hs, hc, os_, oc, 100.0)
    assert sorted(h.tolist()) == [0, 1] and sorted(o.tolist()) == [0, 1, 2]


def test_ptf_search_is_pure_and_maximises_prefix_importance():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        nh, no = 4, 7
        hs, hc = torch.rand(nh, generator=g), 1 + 3 * torch.rand(nh, generator=g)
        os_, oc = torch.rand(no, generator=g), 0.2 + torch.rand(no, generator=g)
        cap = float(torch.rand(1, generator=g)) * float(hc.sum() + oc.sum())
        inputs = [t.clone() for t in (hs, hc, os_, oc)]
        h, o = ptf_search(hs, hc, os_, oc, cap)
        h2, o2 = ptf_search(hs, hc, os_, oc, cap)
        assert torch.equal(h, h2) and torch.equal(o, o2)  # deterministic
        assert all(torch.equal(a, b) for a, b in zip(inputs, (hs, hc, os_, oc)))  # inputs untouched
        assert float(hc[h].sum() + oc[o].sum()) <= cap + 1e-6
        # brute force over "top-k heads + top-n others" (the PTF search space)
        h_order, o_order = torch.argsort(hs, descending=True), torch.argsort(os_, descending=True)
        best = max(float(hs[h_order[:k]].sum() + os_[o_order[:n]].sum())
                   for k, n in itertools.product(range(nh + 1), range(no + 1))
                   if float(hc[h_order[:k]].sum() + oc[o_order[:n]].sum()) <= cap + 1e-6)
        assert float(hs[h].sum() + os_[o].sum()) == pytest.approx(best, abs=1e-6), trial


def test_greedy_fill_takes_prefix_by_importance():
    idx = greedy_fill(torch.tensor([0.3, 0.9, 0.1, 0.5]), torch.tensor([1.0, 2.0, 1.0, 1.0]), 3.0)
    assert idx.tolist() == [1, 3]


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, 1.0000001, "abc", None])
def test_bad_budgets_raise(budget):
    with pytest.raises(BudgetError):
        check_budget(budget)


@pytest.mark.parametrize("budget", [1, 1.0, 0.01, "0.6"])
def test_good_budgets_pass(budget):
    assert check_budget(budget) == float(budget)


def test_recipe_search_checks_budget(adapter, batch):
    scores = optin.score(adapter, [batch], "random").values
    for bad in (0, 1.5):
        with pytest.raises(BudgetError):
            optin.search(adapter, scores, bad, seq_len=8.0)


# --- the notebook API on already pruned models ----------------------------------------------------

@pytest.mark.parametrize("name", SCORERS)
def test_scorers_on_a_pruned_model_with_empty_layers(batch, name):
    ad = BertAdapter(make_tiny_bert())
    masks = {k: [torch.ones(n) for n in ns] for k, ns in ad.unit_counts().items()}
    masks["heads"][1] = torch.zeros(HEADS)
    masks["neurons"][2] = torch.zeros(INTERMEDIATE)
    masks["neurons"][0][:8] = 0.0
    ad.prune(masks)
    scores = optin.score(ad, [batch], name, {"neuron_group": 8} if name == "trajectory" else None)
    assert _counts(scores.values) == {"heads": [HEADS, 0, HEADS], "neurons": [INTERMEDIATE - 8, INTERMEDIATE, 0]}
    result = optin.prune(ad, [batch], scores=scores, budget=0.5, allow_degenerate=True)  # may empty a kind
    assert result.macs_after <= 0.5 * result.macs_before


def test_prune_accepts_a_plain_model(batch):
    model = make_tiny_bert()
    result = optin.prune(model, [batch], scorer="magnitude", budget=0.6)
    assert isinstance(result.adapter, BertAdapter) and result.model is model
    assert result.macs_after <= 0.6 * result.macs_before
    assert result.adapter.unit_counts() == result.info["kept"]
    with pytest.raises(BudgetError):
        optin.prune(make_tiny_bert(), [batch], scorer="magnitude", budget=0)
