"""The measured allocation (optin.measured): removal curves turned into per-unit scores, and the stage."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    check_old_compare_folders,
    make_batch,
    make_tiny_bert,
    save_tiny_bert,
    write_reviews,
)
from optin_plugins.adapters.bert import BertAdapter
from tiny_models import ADAPTERS, mmseg_unavailable, tiny

import optin
from optin import measured
from optin.cli import cli
from optin.units import CostModel


def test_removal_counts_are_distinct_and_end_with_the_whole_layer():
    assert measured.removal_counts(12) == [6, 9, 10, 11, 12]
    assert measured.removal_counts(4) == [2, 3, 4]
    assert measured.removal_counts(1) == [1]
    assert measured.removal_counts(0) == []


def test_divergence_is_zero_for_the_same_distribution_and_a_kl_otherwise():
    a = torch.tensor([[1.0, 2.0, 0.5]])
    assert measured.divergence(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)
    p, q = torch.softmax(a.double(), 1), torch.softmax(torch.tensor([[0.0, 0.0, 0.0]]).double(), 1)
    assert measured.divergence(a, torch.zeros(1, 3)) == pytest.approx(float((p * (p / q).log()).sum()))
    # batches weighted by their size
    assert measured.mean_divergence([a, a], [torch.zeros(1, 3), a], [3, 1]) == \
        pytest.approx(0.75 * measured.divergence(a, torch.zeros(1, 3)))


def test_marginal_scores_keep_the_order_inside_the_layer():
    g = torch.Generator().manual_seed(0)
    order = torch.rand(40, generator=g)
    removed = measured.removal_counts(40)
    losses = [0.5, 0.2, 3.0, 3.5, 9.0]  # not monotone: masking more may move the output less
    s = measured.marginal_scores(order, removed, losses)
    assert torch.equal(torch.argsort(s, stable=True), torch.argsort(order, stable=True))
    assert (s > 0).all() and s.dtype == torch.float64


def test_a_straight_curve_gives_every_unit_its_slope():
    """D(k) = 0.01 k: every unit is worth 0.01, and the units the curve removes add up to its value."""
    order = torch.arange(16.0)
    removed = measured.removal_counts(16)
    s = measured.marginal_scores(order, removed, [0.01 * k for k in removed])
    assert torch.allclose(s, torch.full((16,), 0.01, dtype=torch.float64), rtol=1e-5)
    for k in removed:
        assert float(s[:k].sum()) == pytest.approx(0.01 * k, rel=1e-5)


def test_a_steeper_layer_keeps_more_of_its_units_in_the_search():
    """Two layers the scorer rates alike; masking layer 1 moves the output ten times as much. On the measured
    scale the search keeps more of layer 1, where the scorer's own numbers would keep the same of each."""
    order = torch.linspace(0.1, 1.0, 32)
    removed = measured.removal_counts(32)
    curve = [0.001 * (k / 32) ** 2 for k in removed]
    scores = {"n": [measured.marginal_scores(order, removed, curve),
                    measured.marginal_scores(order, removed, [10 * c for c in curve])]}
    costs = CostModel(per_unit={"n": [1.0, 1.0]}, counts={"n": [32, 32]})
    masks = optin.registry.create("searcher", "ptf", {}).search(scores, costs, 0.5)
    kept = [int(m.sum()) for m in masks["n"]]
    assert kept[1] > kept[0]


@pytest.mark.parametrize("name", ADAPTERS)
def test_measured_scores_on_every_adapter(name):
    """On a tiny model of every adapter: one curve per layer and kind, divergences that grow from zero as
    units are masked (masking nothing moves nothing; masking a whole layer moves something), scores of
    the same shape that keep each layer's order, and the model left as it was."""
    if name == "mmseg-mask2former" and mmseg_unavailable():
        pytest.skip(mmseg_unavailable())
    t = tiny(name)
    ad = t.adapter
    g = torch.Generator().manual_seed(2)
    values = {k: [torch.rand(n, generator=g) + 0.01 for n in ns] for k, ns in ad.unit_counts().items()}
    before = {k: v.clone() for k, v in ad.model.state_dict().items()}
    with torch.no_grad():
        reference = [ad.logits(t.batch)]
    curves = measured.layer_curves(ad, values, [t.batch], reference)
    with torch.no_grad():
        assert torch.allclose(ad.logits(t.batch), reference[0])  # no mask left behind
    assert all(torch.equal(v, before[k]) for k, v in ad.model.state_dict().items())
    for kind, layers in values.items():
        assert len(curves[kind]) == len(layers)
        for t_, (removed, losses) in zip(layers, curves[kind]):
            assert removed == measured.removal_counts(t_.numel()) and len(losses) == len(removed)
            assert all(x >= -1e-9 for x in losses)
    assert any(c[1][-1] > 1e-9 for ls in curves.values() for c in ls)
    # the restarted forward (trace/run_from, R points at once) gives what masking the whole model gives
    trace = measured._traces(ad, [t.batch])[0]
    if trace is not None:
        for kind, layers in values.items():
            for layer, v in enumerate(layers):
                if not v.numel():  # a layer without units of this kind
                    continue
                keeps = (torch.rand(3, v.numel(), generator=g) > 0.5).float()
                fast = measured._masked_logits(ad, t.batch, trace, values, kind, layer, keeps)
                slow = measured._masked_logits(ad, t.batch, None, values, kind, layer, keeps)
                assert len(fast) == 3 and all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(fast, slow))
    got = measured.measured_scores(ad, values, [t.batch])
    for kind, layers in values.items():
        for v, s in zip(layers, got[kind]):
            assert s.shape == v.shape
            assert torch.equal(torch.argsort(s.flatten(), stable=True), torch.argsort(v.flatten(), stable=True))


def test_prune_with_the_measured_allocation_meets_the_budget():
    ad = BertAdapter(make_tiny_bert())
    batch = make_batch(batch_size=8)
    result = optin.prune(ad, [batch], scorer="magnitude", budget=0.6, allocation="measured")
    assert result.info["allocation"] == {"allocation": "measured", "alpha": "measured"}
    assert result.macs_after <= 0.6 * result.macs_before * (1 + 1e-9)


def test_run_takes_allocation_measured_and_reports_it(tmp_path, cli_sandbox):
    write_reviews(tmp_path / "data.csv")
    model = save_tiny_bert(tmp_path / "tiny-bert")
    out = cli_sandbox / "run"
    res = CliRunner().invoke(cli, ["run", "--model", str(model), "--data", str(tmp_path / "data.csv"), "--scorer",
                                   "magnitude", "--calib-size", "16", "--eval-size", "16", "--allocation", "measured",
                                   "--output", str(out), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["allocation"] == "measured" and report["macs_ratio"] <= 0.6 + 1e-9


def test_a_compare_folder_from_before_the_measured_candidate_resumes_with_evaluate_blends(tmp_path, cli_sandbox):
    """Folders whose ``evaluate`` tried the blends only resume with ``--allocation evaluate-blends`` and are
    refused, with that hint, by the new ``evaluate``."""
    write_reviews(tmp_path / "data.csv")
    model = save_tiny_bert(tmp_path / "tiny-bert")
    folder = cli_sandbox / "old"
    args = ["compare", "--model", str(model), "--data", str(tmp_path / "data.csv"), "--scorers", "magnitude",
            "--budgets", "0.6", "--calib-size", "16", "--eval-size", "16", "--output", str(folder), "--quiet",
            "--no-speed"]
    check_old_compare_folders(args, folder, "allocation_candidates", ["--allocation", "evaluate-blends"],
                              ["--budgets", "0.6", "0.9"])
    res = CliRunner().invoke(cli, args)
    assert "--allocation evaluate-blends resumes it" in res.output
    cells = [json.loads(line) for line in (folder / "cells.jsonl").read_text().splitlines()]
    assert [t["alpha"] for t in cells[-1]["allocation"]["trials"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
