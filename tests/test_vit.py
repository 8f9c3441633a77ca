"""timm VisionTransformer adapter, token reducers on a schedule, token trajectory and token schedules."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from optin.errors import BudgetError, OptinError
from optin.recipe import _token_importance, reduce_tokens, score, search
from optin.registry import create
from optin_plugins.searchers.token_schedule import trajectory_removals
from tiny_models import make_vit


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(6, 1, 28, 28, generator=g), "labels": torch.randint(0, 5, (6,), generator=g)}


def logits(ad, batch):
    with torch.no_grad():
        return ad.logits(batch)


def test_units_and_tokens(vit):
    assert vit.unit_counts() == {"heads": [4] * 4, "neurons": [64] * 4}
    assert vit.n_tokens == 50 and vit.protected == 1 and vit.token_units() == 49
    assert make_vit(distilled=True).protected == 2


@pytest.mark.parametrize("fused", [True, False])
def test_analytic_macs_match_flop_counter(vit, images, fused):
    for b in vit.blocks:
        b.attn.fused_attn = fused
    with FlopCounterMode(display=False) as fc:
        logits(vit, {"pixel_values": images["pixel_values"][:1]})
    if fused:  # FlopCounterMode misses SDPA on CPU: add the two attention matmuls by hand
        n, d = vit.n_tokens, vit.head_dim
        missing = sum(2 * n * n * d * h for h in vit.unit_counts()["heads"])
        assert fc.get_total_flops() / 2 + missing == pytest.approx(vit.cost_model().macs())
    else:
        assert fc.get_total_flops() / 2 == pytest.approx(vit.cost_model().macs())


@pytest.mark.parametrize("distilled", [False, True])
def test_physically_pruned_vit_equals_masked(images, distilled):
    ad = make_vit(distilled)
    scores = score(ad, [images], "trajectory")
    masks, costs = search(ad, scores, 0.6, ad.seq_len([images]))
    assert costs.macs_of_masks(masks) <= 0.6 * costs.macs()
    with torch.no_grad(), ad.masked(masks):
        expected = ad.logits(images)
    before = sum(p.numel() for p in ad.model.parameters())
    ad.prune(masks)
    assert sum(p.numel() for p in ad.model.parameters()) < before
    assert torch.allclose(logits(ad, images), expected, atol=1e-4)
    assert ad.cost_model().macs() == pytest.approx(costs.macs_of_masks(masks))


def test_all_heads_removed_in_a_block(vit, images):
    masks = {"heads": [torch.zeros(4), torch.ones(4), torch.ones(4), torch.ones(4)]}
    with torch.no_grad(), vit.masked(masks):
        expected = vit.logits(images)
    vit.prune(masks)
    assert torch.allclose(logits(vit, images), expected, atol=1e-5)
    assert vit.unit_counts()["heads"] == [0, 4, 4, 4]


@pytest.mark.parametrize("kind", ["heads", "neurons", "tokens"])
def test_run_from_matches_a_full_forward(vit, images, kind):
    tr = vit.trace(images)
    n = {"heads": 4, "neurons": 64, "tokens": 49}[kind]
    masks = torch.ones(2, n)
    emb, lg = vit.run_from(tr, kind, 1, masks, images)
    assert torch.allclose(lg.reshape(2, 6, -1)[1], tr.logits, atol=1e-5)  # all-ones masks = unmasked model
    assert torch.allclose(emb[3].reshape(2, 6, 50, -1)[0], tr.embeddings[3], atol=1e-5)
    if kind != "tokens":
        masks[1, 0] = 0
        emb, lg = vit.run_from(tr, kind, 1, masks, images)
        with torch.no_grad(), vit.masked({kind: [None, masks[1], None, None]}):
            ref = vit.logits(images)
        assert torch.allclose(lg.reshape(2, 6, -1)[1], ref, atol=1e-5)


def test_zero_schedule_leaves_outputs_unchanged(vit, images):
    ref = logits(vit, images)
    for name in ("tome", "random"):
        vit.install_reducer(create("reducer", name), [0, 0, 0, 0])
        assert torch.allclose(logits(vit, images), ref, atol=1e-5)
        vit.remove_reducer()


@pytest.mark.parametrize("name", ["tome", "random", "prune"])
def test_reducers_keep_exactly_the_scheduled_counts(vit, images, name):
    removals = [10, 30, 5, 0]  # 30 > one bipartite merge can remove: the block repeats the merge
    vit.install_reducer(create("reducer", name), removals, create("scorer", "wpr") if name == "prune" else None)
    seen = []
    hooks = [b.mlp.fc1.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1])) for b in vit.blocks]
    out = logits(vit, images)
    for h in hooks:
        h.remove()
    assert seen == vit.token_counts()[1] == [40, 10, 5, 5]
    assert out.shape == (6, 5)


def test_prune_reducer_without_token_scorer_is_a_clear_error(vit):
    with pytest.raises(OptinError, match="token scorer"):
        reduce_tokens(vit, "prune", 0.6, vit.cost_model().macs(), options={"schedule": "constant", "units": False})


@pytest.mark.parametrize("schedule", ["trajectory", "constant", "decreasing", "layers"])
def test_searched_schedule_is_non_increasing_and_meets_budget(vit, images, schedule):
    scores = score(vit, [images], "trajectory", {"tokens": True, "kinds": []})
    base = vit.cost_model().macs()
    removals = reduce_tokens(vit, "tome", 0.6, base, token_importance=_token_importance(scores),
                             options={"schedule": schedule, "units": False,
                                      **({"pruning_layers": [0, 1, 2], "retention": [0.8, 0.7, 0.6]}
                                         if schedule == "layers" else {})})
    counts = vit.token_counts(removals)[1]
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert vit.cost_model(removals=removals).macs() <= 0.6 * base
    assert logits(vit, images).shape == (6, 5)


def test_trajectory_schedule_drops_least_important_first():
    imp = torch.tensor([[5.0, 1.0, 9.0], [0.5, 8.0, 9.0]])
    # each removal at block 0 saves 2 units, at block 1 saves 1 unit; start at 6
    macs_of = lambda rem: 6 - 2 * rem[0] - rem[1]  # noqa: E731
    assert trajectory_removals(imp, macs_of, 5) == [0, 1]  # (1, 0) is the least important pair
    assert trajectory_removals(imp, macs_of, 3) == [1, 1]
    with pytest.raises(BudgetError):
        trajectory_removals(imp, macs_of, -100)


def test_expanded_configuration_prunes_units_and_tokens(vit, images):
    ad = copy.deepcopy(vit)
    scores = score(ad, [images], "trajectory", {"tokens": True})
    plan = create("searcher", "token-schedule", {"units": True})
    costs = ad.cost_model()
    masks = plan.search(scores.values, costs, 0.5)
    assert costs.macs_of_masks(masks) <= plan.unit_budget_for(0.5) * costs.macs()
    ad.prune(masks)
    removals = reduce_tokens(ad, "tome", 0.5, costs.macs(), token_importance=_token_importance(scores))
    assert ad.cost_model(removals=removals).macs() <= 0.5 * costs.macs()
    assert sum(removals) > 0
