"""Token reducers (tome, random, prune) and the Zero-TPrune WPR token scorer, on small hand-made tensors."""
import math

import pytest
import torch

from optin import registry
from optin.contracts import ScoreContext
from optin.errors import OptinError
from optin_plugins.reducers.prune import PruneReducer, similarity_prune_index
from optin_plugins.reducers.random import RandomReducer
from optin_plugins.reducers.tome import (ToMeReducer, bipartite_soft_matching, constant_schedule,
                                         counts_from_removals, decreasing_schedule, max_merge, tome_merge)
from optin_plugins.scorers.wpr import (WPRScorer, combine_heads, head_variance, iterations_for_layer,
                                       weighted_pagerank)


def _tokens(B=3, N=11, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.ones(B, N)


# --- ToMe ------------------------------------------------------------------------------------------

def test_tome_keeps_class_token_first_and_unchanged():
    x, sizes = _tokens()
    out, s = ToMeReducer().reduce(x, sizes, 3)
    assert out.shape == (3, 8, 6) and s.shape == (3, 8)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(s[:, 0], sizes[:, 0])


def test_tome_two_protected_tokens_stay_first():
    x, sizes = _tokens(N=12)
    x[:, 1] = x[:, 2]  # a distillation token identical to an A token must still not receive it
    out, s = ToMeReducer().reduce(x, sizes, 4, protected=2)
    assert torch.equal(out[:, :2], x[:, :2]) and torch.equal(s[:, :2], torch.ones(3, 2))
    src, dst = bipartite_soft_matching(x, 4, protected=2)
    assert (src >= 2).all() and (dst >= 2).all() and (src % 2 == 0).all() and (dst % 2 == 1).all()


def test_tome_sizes_add_up_over_several_merges():
    x, sizes = _tokens(B=2, N=17)
    red = ToMeReducer()
    for r in (4, 3, 3, 2):
        x, sizes = red.reduce(x, sizes, r)
        assert torch.allclose(sizes.sum(dim=1), torch.full((2,), 17.0))
    assert x.shape[1] == 17 - 12
    assert torch.equal(sizes[:, 0], torch.ones(2))


def test_tome_merge_is_a_size_weighted_average_preserving_the_weighted_sum():
    x, _ = _tokens(B=2, N=9)
    sizes = torch.tensor([[1.0, 2, 3, 1, 4, 1, 2, 5, 1]] * 2)
    out, s = tome_merge(x, sizes, x, 3)
    # the size-weighted sum of all tokens is what merging preserves
    assert torch.allclose((out * s.unsqueeze(-1)).sum(1), (x * sizes.unsqueeze(-1)).sum(1), atol=1e-5)
    assert torch.allclose(s.sum(1), sizes.sum(1))


def test_tome_r_zero_leaves_x_unchanged():
    x, sizes = _tokens()
    out, s = ToMeReducer().reduce(x, sizes, 0)
    assert torch.equal(out, x) and torch.equal(s, sizes)


def test_tome_merging_two_identical_tokens_gives_that_token_with_size_two():
    # tokens 2 (A) and 3 (B) are identical; the others are mutually orthogonal
    x = torch.eye(6).unsqueeze(0).clone()
    x[0, 3] = x[0, 2]
    out, s = ToMeReducer().reduce(x, torch.ones(1, 6), 1)
    assert out.shape == (1, 5, 6)
    assert torch.equal(s, torch.tensor([[1.0, 1, 2, 1, 1]]))
    assert torch.allclose(out[0, 2], x[0, 2])
    assert torch.equal(out[0, [0, 1, 3, 4]], x[0, [0, 1, 4, 5]])


def test_tome_several_a_tokens_may_merge_into_one_b_token():
    # A tokens 2 and 4 are both closest to B token 3
    x = torch.eye(8).unsqueeze(0).clone()
    x[0, 2] = x[0, 3] + 0.01 * x[0, 6]
    x[0, 4] = x[0, 3] + 0.02 * x[0, 6]
    sizes = torch.tensor([[1.0, 1, 1, 2, 3, 1, 1, 1]])
    out, s = tome_merge(x, sizes, x, 2)
    assert s.tolist() == [[1.0, 1, 6, 1, 1, 1]]
    expected = (x[0, 2] * 1 + x[0, 3] * 2 + x[0, 4] * 3) / 6
    assert torch.allclose(out[0, 2], expected)


def test_tome_removes_exactly_r_for_every_example_and_clips_to_max_merge():
    x, sizes = _tokens(B=4, N=13)
    out, s = ToMeReducer().reduce(x, sizes, 5, metric=torch.randn(4, 13, 3))
    assert out.shape == (4, 8, 6) and s.shape == (4, 8)
    assert max_merge(13, 1) == 6 and max_merge(12, 2) == 5 and max_merge(2, 1) == 0
    out, s = ToMeReducer().reduce(x, sizes, 100)
    assert out.shape[1] == 13 - 6 and torch.allclose(s.sum(1), torch.full((4,), 13.0))


def test_tome_schedules():
    assert constant_schedule(4, 8) == [8, 8, 8, 8]
    dec = decreasing_schedule(5, 8)
    assert dec == [8, 6, 4, 2, 0]
    assert all(isinstance(v, int) for v in dec) and dec == sorted(dec, reverse=True)
    assert counts_from_removals(10, [3, 3, 3, 3], 1) == [7, 4, 2, 2]
    counts = counts_from_removals(10, [5, 5, 5], 1, bipartite=True)
    assert counts == [6, 4, 3]
    x, sizes = _tokens(B=2, N=10)
    for r, n in zip([5, 5, 5], counts):  # what ToMe actually removes
        x, sizes = ToMeReducer().reduce(x, sizes, r)
        assert x.shape[1] == n


# --- random / prune --------------------------------------------------------------------------------

@pytest.mark.parametrize("reducer", [RandomReducer(seed=1), PruneReducer(), PruneReducer(similarity_tokens=2)])
def test_droppers_keep_n_minus_r_with_protected_first(reducer):
    x, _ = _tokens(B=3, N=10)
    sizes = torch.arange(1.0, 11).expand(3, 10).clone()
    imp = torch.rand(3, 10, generator=torch.Generator().manual_seed(3))
    out, s = reducer.reduce(x, sizes, 4, importance=imp, protected=2)
    assert out.shape == (3, 6, 6) and s.shape == (3, 6)
    assert torch.equal(out[:, :2], x[:, :2])
    # survivors are original tokens, in their original order, with their sizes
    pos = s.long() - 1
    assert (pos[:, 1:] > pos[:, :-1]).all()
    assert torch.equal(out, x.gather(1, pos.unsqueeze(-1).expand(-1, -1, 6)))


def test_random_reducer_is_seeded():
    x, sizes = _tokens(B=2, N=20)
    a, _ = RandomReducer(seed=5).reduce(x, sizes, 7)
    b, _ = RandomReducer(seed=5).reduce(x, sizes, 7)
    c, _ = RandomReducer(seed=6).reduce(x, sizes, 7)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_prune_removes_the_least_important():
    x = torch.arange(6.0).view(1, 6, 1).repeat(2, 1, 1)
    imp = torch.tensor([[0.0, 5, 1, 4, 2, 3], [9.0, 1, 2, 3, 4, 5]])
    out, s = PruneReducer().reduce(x, torch.ones(2, 6), 2, importance=imp)
    assert out[..., 0].tolist() == [[0, 1, 3, 5], [0, 3, 4, 5]]
    assert torch.equal(s, torch.ones(2, 4))


def test_prune_without_importance_is_a_clear_error():
    x, sizes = _tokens()
    with pytest.raises(OptinError, match="needs a token scorer, e.g. --scorer wpr"):
        PruneReducer().reduce(x, sizes, 2)
    assert PruneReducer.needs_importance and not ToMeReducer.needs_importance


def test_s_stage_removes_the_near_duplicate_of_an_important_token():
    # token 1 is the most important; token 4 is a near-copy of it but is not the least important
    x = torch.eye(6).unsqueeze(0).clone()
    x[0, 4] = x[0, 1] + 0.05 * x[0, 5]
    imp = torch.tensor([[10.0, 9, 3, 8, 2.5, 1]])
    out, _ = PruneReducer(similarity_tokens=1).reduce(x, torch.ones(1, 6), 1, importance=imp)
    assert torch.equal(out, x[:, [0, 1, 2, 3, 5]])
    out, _ = PruneReducer().reduce(x, torch.ones(1, 6), 1, importance=imp)  # I-stage only drops token 5
    assert torch.equal(out, x[:, [0, 1, 2, 3, 4]])
    # S-stage then I-stage: 2 removals = the duplicate, then the least important of the rest
    out, _ = PruneReducer(similarity_tokens=1).reduce(x, torch.ones(1, 6), 2, importance=imp)
    assert torch.equal(out, x[:, [0, 1, 2, 3]])
    assert similarity_prune_index(imp[:, 1:], x[:, 1:], 1).tolist() == [[3]]


# --- WPR -------------------------------------------------------------------------------------------

def _attends_to(target: int, n: int = 4, weight: float = 0.7) -> torch.Tensor:
    a = torch.full((n, n), (1 - weight) / (n - 1))
    a[:, target] = weight
    return a


def test_wpr_ranks_the_token_everyone_attends_to_first():
    attn = _attends_to(2).view(1, 1, 4, 4)
    s = weighted_pagerank(attn, 30)
    assert s.shape == (1, 1, 4)
    assert s[0, 0].argmax().item() == 2
    assert torch.allclose(s.sum(-1), torch.ones(1, 1))
    imp = WPRScorer().token_importance(attn.expand(2, 3, 4, 4), layer=0, n_layers=12)
    assert imp.shape == (2, 4) and (imp.argmax(dim=1) == 2).all()


def test_wpr_direction_is_attention_received():
    # node 0 attends only to 1, everyone else attends only to 3: token 3 receives the most
    a = torch.zeros(4, 4)
    a[0, 1] = 1
    a[1:, 3] = 1
    s = weighted_pagerank(a.view(1, 1, 4, 4), 1, cls_boost=False)
    assert torch.allclose(s[0, 0], torch.tensor([0.0, 0.25, 0.0, 0.75]))


def test_wpr_class_token_init_boost():
    n = 9
    eye = torch.eye(n).view(1, 1, n, n)  # identity attention: zero iterations = one = the start vector
    s = weighted_pagerank(eye, 1)[0, 0]
    assert torch.allclose(s[0] / s[1], torch.tensor(math.sqrt(n)))
    assert torch.allclose(s.sum(), torch.tensor(1.0))
    flat = weighted_pagerank(eye, 1, cls_boost=False)[0, 0]
    assert torch.allclose(flat, torch.full((n,), 1 / n))


def test_iterations_for_layer():
    got = [iterations_for_layer(layer, 12) for layer in range(12)]
    assert got == [30, 30, 30, 5, 5, 5, 5, 5, 5, 1, 1, 1]


def test_combine_heads_skips_a_head_with_out_of_range_variance():
    n = 10
    good = torch.full((n,), 1.0 / n)
    good[:5] += 0.03
    good[5:] -= 0.03  # (s*N) variance 0.09
    peaked = torch.zeros(n)
    peaked[3] = 1.0  # (s*N) variance 9: outside [0.01, 0.7]
    scores = torch.stack([good, peaked]).unsqueeze(0)  # (1, 2, n)
    assert torch.allclose(head_variance(scores), torch.tensor([[0.09, 9.0]]))
    assert torch.allclose(combine_heads(scores), good.unsqueeze(0))
    # with both heads out of range, all heads are used (root-mean-square)
    rms = scores.square().mean(dim=1).sqrt()
    assert torch.allclose(combine_heads(scores, low=20.0, high=30.0), rms)
    assert torch.allclose(combine_heads(scores, low=0.0, high=100.0), rms)


def test_wpr_schedule_matches_retention():
    sc = WPRScorer()
    rem = sc.schedule(197, 12)
    assert len(rem) == 12
    assert [i for i, r in enumerate(rem) if r] == [3, 6, 9]
    assert rem[3] == 196 - round(0.9 * 196)
    assert rem[6] == 176 - round(0.8 * 176)
    assert rem[9] == 141 - round(0.7 * 141)
    custom = WPRScorer(pruning_layers=[0, 2], retention=[0.5, 0.5]).schedule(11, 4)
    assert custom == [5, 0, 2, 0]
    with pytest.raises(OptinError):
        WPRScorer(pruning_layers=[1, 2], retention=[0.5])
    with pytest.raises(OptinError):
        WPRScorer(retention=[1.0, 0.9, 0.8, 0.7, 1.5])


def test_wpr_does_not_score_units():
    sc = WPRScorer()
    with pytest.raises(NotImplementedError, match="ranks tokens at run time"):
        sc.score(None, [], ScoreContext())
    assert sc.describe() == {"pruning_layers": None, "retention": None,  # the reference pattern, scaled to depth
                             "similarity_tokens": 10, "var_low": 0.01, "var_high": 0.7}


def test_wpr_default_pattern_is_scaled_to_the_depth_like_the_token_schedule():
    from optin_plugins.searchers.token_schedule import TokenScheduleSearcher

    for depth in (4, 6, 12, 24):
        assert WPRScorer().layer_pattern(depth) == TokenScheduleSearcher(schedule="layers").layer_pattern(depth)
    assert WPRScorer().layer_pattern(12) == ([1, 3, 6, 9, 11], [1.0, 0.9, 0.8, 0.7, 1.0])
    layers, _ = WPRScorer().layer_pattern(6)
    assert layers == [0, 1, 3, 4, 5] and max(layers) < 6
    rem = WPRScorer().schedule(17, 6)  # a 6-block model: every pruning block exists
    assert len(rem) == 6 and [i for i, r in enumerate(rem) if r] == [1, 3, 4]
    assert WPRScorer(pruning_layers=[0, 2], retention=[0.5, 0.5]).describe()["pruning_layers"] == [0, 2]


def test_reducers_and_wpr_are_registered():
    assert {"tome", "random", "prune"} <= set(registry.names("reducer"))
    assert "wpr" in registry.names("scorer")
    assert registry.create("reducer", "prune", {"similarity_tokens": 3}).similarity_tokens == 3
    assert registry.create("scorer", "wpr", {"similarity_tokens": 3}).similarity_tokens == 3
