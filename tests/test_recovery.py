"""Recovery after the search (PTF rearrangement and mask tuning, least-squares reconstruction): the pure
algorithms on known inputs, and on every adapter the recovered model, physically pruned, equals the
recovered masked model and reproduces the unpruned layers' outputs better than before."""
from __future__ import annotations

import copy

import pytest
import torch

import optin
from optin import recovery
from optin.errors import OptinError
from tiny_models import ADAPTERS, mmseg_unavailable, tiny


# --- the algorithms ---------------------------------------------------------------------------------
def _damage(g: torch.Tensor, removed: torch.Tensor) -> float:
    return float(g[:, removed].sum(1).pow(2).sum())


def test_rearrangement_keeps_the_count_and_lowers_the_damage():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(12, 30, generator=g)
    removed = torch.zeros(30, dtype=torch.bool)
    removed[:10] = True
    out = recovery.rearranged(grads, removed)
    assert int(out.sum()) == 10
    assert _damage(grads, out) < _damage(grads, removed)
    # a local optimum: no single swap lowers the damage further
    for i in torch.nonzero(out).flatten():
        for j in torch.nonzero(~out).flatten():
            swapped = out.clone()
            swapped[i], swapped[j] = False, True
            assert _damage(grads, swapped) >= _damage(grads, out) - 1e-9


def test_rearrangement_finds_units_that_cancel():
    """Two units whose gradients cancel do no damage together: removing both beats removing a small one."""
    grads = torch.zeros(4, 3, dtype=torch.float64)
    grads[:, 0] = torch.tensor([1.0, -2.0, 1.5, 0.5])
    grads[:, 1] = -grads[:, 0]
    grads[:, 2] = 0.3
    start = torch.tensor([True, False, True])
    assert recovery.rearranged(grads, start).tolist() == [True, True, False]


def test_ridge_fit_is_least_squares_and_shrinks_to_the_old_weights():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w_true, b_true = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    y = x @ w_true.T + b_true
    x1 = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    w0 = torch.zeros(3, 6, dtype=torch.float64)
    fit = recovery.ridge_fit(x1.T @ x1, x1.T @ y, w0, 1e-12)
    assert torch.allclose(fit[:, :5], w_true, atol=1e-8) and torch.allclose(fit[:, 5], b_true, atol=1e-8)
    heavy = recovery.ridge_fit(x1.T @ x1, x1.T @ y, torch.cat([w_true * 0.5, b_true[:, None]], 1), 1e12)
    assert torch.allclose(heavy[:, :5], w_true * 0.5, atol=1e-6)  # the bias is never pulled towards w0


def test_tuned_scales_recover_planted_scales():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64)  # 4 units of size 2
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    planted = torch.tensor([0.5, 1.0, 2.0, 0.0], dtype=torch.float64)
    target = (x * planted.repeat_interleave(2)) @ w.T
    gram = x.T @ x
    cross_w = ((x.T @ target) * w.T).sum(1)
    s = recovery.tuned_scales(gram, cross_w, w, unit_size=2, damping=1e-10)
    assert torch.allclose(s, planted, atol=1e-6)


def test_steps_parse_and_bad_steps_are_refused():
    assert recovery.parse_steps("none") == ()
    assert recovery.parse_steps("ptf") == ("rearrange", "tune")
    assert recovery.parse_steps("reconstruct,rearrange") == ("rearrange", "reconstruct")
    with pytest.raises(OptinError, match="unknown recovery step 'retrain'"):
        recovery.parse_steps("retrain")
    with pytest.raises(OptinError, match="pick one"):
        recovery.parse_steps("tune,reconstruct")
    assert recovery.parse_steps("auto") == ("reconstruct",)


def test_auto_reconstructs_only_where_the_adapter_names_its_readers(monkeypatch):
    """The default `auto` reconstructs on adapters that name the layers reading their units and runs no
    recovery (with a note naming the kind) on one that does not; an explicit step is still refused there."""
    t = tiny("bert")
    assert recovery.steps_for("auto", t.adapter) == (("reconstruct",), None)
    monkeypatch.setattr(type(t.adapter), "unit_reader", lambda self, kind, layer: None)
    steps, note = recovery.steps_for("auto", t.adapter)
    assert steps == () and "heads, neurons" in note
    assert recovery.steps_for("reconstruct", t.adapter) == (("reconstruct",), None)
    reference = copy.deepcopy(t.adapter)
    result = optin.prune(t.adapter, [t.batch], scorer="magnitude", budget=0.6)  # the default: auto
    assert result.info["recovery"]["steps"] == []
    with torch.no_grad(), reference.masked(result.masks):
        assert torch.allclose(t.adapter.logits(t.batch), reference.logits(t.batch), atol=1e-5)  # weights untouched
    with pytest.raises(OptinError, match="unit_reader"):
        optin.prune(copy.deepcopy(reference), [t.batch], scorer="magnitude", budget=0.6, recover="reconstruct")


# --- on every adapter -----------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", ["reconstruct", "ptf"])
@pytest.mark.parametrize("name", ADAPTERS)
def test_recovered_model_pruned_equals_recovered_masked(name, steps):
    if name == "mmseg-mask2former" and mmseg_unavailable():
        pytest.skip(mmseg_unavailable())
    t = tiny(name)
    ad = t.adapter
    torch.manual_seed(0)
    scores = optin.score(ad, [t.batch], "random", seed=3)
    seq_len = t.seq_len or ad.seq_len([t.batch])
    masks, _ = optin.search(ad, scores, t.budget, seq_len, allow_degenerate=True)
    original = copy.deepcopy(ad)
    new_masks, info = recovery.recover(ad, original, masks, [t.batch], recovery.parse_steps(steps), micro_batch=2)
    assert [int(m.sum()) for ms in new_masks.values() for m in ms] == \
        [int(m.sum()) for ms in masks.values() for m in ms]  # rearrangement keeps every layer's count
    assert info["layers"], "no reading layer was recovered"
    for rec in info["layers"]:
        assert rec["error_after"] <= rec["error_before"] + 1e-9, rec  # on the calibration rows
    with torch.no_grad(), ad.masked(new_masks):
        expected = ad.logits(t.batch)
    ad.prune(new_masks)
    with torch.no_grad():
        got = ad.logits(t.batch)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())


class _Stop(Exception):
    pass


def _seen(adapter, batch, module, output: bool) -> torch.Tensor:
    """What ``module`` reads (or writes) on ``batch``, the forward stopped right after it."""
    seen = {}

    def grab(m, args, out=None):
        seen["x"] = out if output else args[0]
        raise _Stop

    hook = module.register_forward_hook(grab) if output else module.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            adapter.logits(batch)
    except _Stop:
        pass
    finally:
        hook.remove()
    return seen["x"]


@pytest.mark.parametrize("name", ["bert", "vit", "vgg"])
def test_one_pass_equals_layer_by_layer(name, monkeypatch):
    """The sample runs once, by micro-batches (length-trimmed for text) that all stop at each reading layer
    while it is refit; the result equals refitting the layers one after the other, each from forwards of
    every micro-batch up to it through the layers refit before it (the ridge judged on the odd examples)."""
    monkeypatch.setattr(recovery, "PASS", 2)  # several micro-batches
    t = tiny(name)
    scores = optin.score(t.adapter, [t.batch], "random", seed=3)
    seq_len = t.seq_len or t.adapter.seq_len([t.batch])
    masks, _ = optin.search(t.adapter, scores, 0.6, seq_len, allow_degenerate=True)
    one, layered = copy.deepcopy(t.adapter), copy.deepcopy(t.adapter)
    info = recovery.recover(one, copy.deepcopy(t.adapter), masks, [t.batch], ("reconstruct",))[1]
    micro = layered.split(t.batch, 2)
    assert len(micro) > 1
    names = {id(m): n for n, m in layered.model.named_modules()}
    originals = dict(t.adapter.model.named_modules())
    with layered.masked(masks):
        todo = recovery.readers(layered, masks, t.batch)
        for r in todo:
            halves, seen = [None, None], 0
            for mb in micro:
                valid = layered.valid_tokens(mb)
                x = recovery.design_rows(r.module, _seen(layered, mb, r.module, False), valid)[:, r.columns()]
                y = recovery.output_rows(r.module, _seen(t.adapter, mb, originals[names[id(r.module)]], True), valid)
                half = (seen + recovery.row_examples(x.shape[0], layered.batch_size(mb), valid)) % 2
                halves = recovery._accumulate(halves, x.double(), y.double(), half)
                seen += layered.batch_size(mb)
            recovery._solve(r, halves, "reconstruct")
    assert len(info["layers"]) == len(todo)
    for (pname, a), (_, b) in zip(one.model.named_parameters(), layered.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), pname


def test_text_splits_into_trimmed_groups_of_similar_length():
    """``Adapter.split`` on padded text: groups sorted by length, each trimmed to its longest text, every
    example once, and the same logits as the whole padded batch."""
    t = tiny("bert")
    batch = t.batch
    parts = t.adapter.split(batch, 2)
    lengths = batch["attention_mask"].sum(1)
    assert sorted(int(l) for p in parts for l in p["attention_mask"].sum(1)) == sorted(lengths.tolist())
    assert all(p["input_ids"].shape[1] == int(p["attention_mask"].sum(1).max()) for p in parts)  # trimmed
    assert max(p["input_ids"].shape[1] for p in parts) == batch["input_ids"].shape[1]
    assert min(p["input_ids"].shape[1] for p in parts) < batch["input_ids"].shape[1]
    with torch.no_grad():
        whole = t.adapter.logits(batch)
        pieces = torch.cat([t.adapter.logits(p) for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    order = torch.argsort(lengths, stable=True)
    assert torch.equal(labels, batch["labels"][order])
    assert torch.allclose(pieces, whole[order], atol=1e-5)


@pytest.mark.parametrize("start", range(6))
def test_downhill_finds_the_minimum_of_one_valley_with_few_evaluations(start):
    values = [5.0, 3.0, 2.0, 2.5, 4.0, 9.0]
    calls = []
    got = recovery.downhill(lambda i: calls.append(i) or values[i], len(values), start)
    assert got == 2 and len(set(calls)) == len(calls)  # each index once
    assert len(calls) <= abs(start - 2) + 3  # the walk, the neighbour past the minimum, one wrong way


def test_downhill_stops_at_the_first_valley_it_meets():
    values = [1.0, 3.0, 2.0, 4.0]  # two valleys: the walk stays in the one it starts in or falls into
    assert recovery.downhill(lambda i: values[i], 4, 2) == 2
    assert recovery.downhill(lambda i: values[i], 4, 1) == 2  # the lower neighbour is to the right
    assert recovery.downhill(lambda i: values[i], 4, 0) == 0


def test_the_ridge_residual_without_the_gram_equals_the_one_with_it():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(50, 6, generator=g, dtype=torch.float64), torch.ones(50, 1, dtype=torch.float64)], 1)
    y = torch.randn(50, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(3, 7, generator=g, dtype=torch.float64)
    gram, cross, ysq = x.T @ x, x.T @ y, float(y.pow(2).sum())
    for lam in (0.0, 0.1, 10.0):
        w = recovery.ridge_fit(gram, cross, w0, lam)
        direct = float((x @ w.T - y).pow(2).sum())
        assert recovery.ridge_residual(cross, ysq, w, w0, lam) == pytest.approx(direct, rel=1e-9)
        assert recovery._residual(gram, cross, ysq, w) == pytest.approx(direct, rel=1e-9)


def test_rows_know_their_example():
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert recovery.row_examples(6, 3, valid).tolist() == [0, 0, 0, 1, 2, 2]  # real tokens only
    assert recovery.row_examples(6, 3, None).tolist() == [0, 0, 1, 1, 2, 2]  # a convolution's positions
    assert recovery.row_examples(5, 3, None).tolist() == [0, 1, 2, 3, 4]  # no pattern: each row its own


def test_a_forward_that_skips_or_repeats_a_reading_layer_is_one_clear_error():
    """Recovery needs each reading layer once per forward, in one order; an adapter whose forward ends early or
    reaches another reading layer first gets an OptinError saying so (not a hang or a wrong fit)."""
    from optin.lockstep import Lockstep

    t = tiny("bert")
    x = torch.zeros(2, 3)
    assert recovery._reached((1, x), 1, t.adapter) is x
    with pytest.raises(OptinError, match="ended where reading layer 2 .* was due.*once per forward"):
        recovery._reached(Lockstep.FINISHED, 2, t.adapter)
    with pytest.raises(OptinError, match="reached reading layer 0 where reading layer 1"):
        recovery._reached((0, x), 1, t.adapter)
