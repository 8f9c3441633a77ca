"""The allocation stage (``optin.allocation``): blends keep every layer's order of units and move only how
many each layer keeps; ``evaluate`` judges candidates on held-out calibration examples and keeps the
closest; the recipe, the Python API, ``optin compare`` and the CLI take it; bad values are one error line."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    check_old_compare_folders,
    make_batch,
    make_tiny_bert,
    one_error_line,
    save_tiny_bert,
    write_reviews,
)
from optin_plugins.adapters.bert import BertAdapter
from tiny_models import ADAPTERS, mmseg_unavailable, tiny

import optin
import optin.compare
from optin import allocation, measured
from optin.cli import cli
from optin.errors import OptinError
from optin.units import kept_counts


def _scores(counts: dict[str, list[int]], seed: int = 0, starve: int | None = None) -> dict:
    """Random positive scores; layer ``starve`` of every kind a thousand times smaller (a scorer that
    misjudges one layer's scale)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: [torch.rand(n, generator=g) + 0.01 for n in ns] for k, ns in counts.items()}
    if starve is not None:
        for k in out:
            out[k][starve] = out[k][starve] * 1e-3
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("allocation")
    write_reviews(root / "data.csv")
    return {"model": str(save_tiny_bert(root / "tiny-bert")), "data": str(root / "data.csv")}


# --- the pure functions --------------------------------------------------------------------------------
def test_quantiles_are_ranks_inside_each_layer():
    q = allocation.layer_quantiles({"n": [torch.tensor([3.0, 1.0, 2.0, 1.0]), torch.tensor([5.0])]})
    assert q["n"][0].tolist() == [1.0, 0.25, 0.75, 0.5]  # ties by position
    assert q["n"][1].tolist() == [1.0]


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_a_blend_keeps_the_order_inside_every_layer(alpha):
    g = torch.Generator().manual_seed(3)
    common = {"n": [torch.randn(40, generator=g).abs() * 10 ** k for k in range(-3, 3)]}
    common["n"][0][:5] = 0.0  # zero and negative scores tie below the positive ones, still in order
    common["n"][1][:5] = -1.0
    out = allocation.blend(common, allocation.layer_quantiles(common), alpha)
    for before, after in zip(common["n"], out["n"]):
        order = torch.argsort(before, stable=True)
        assert torch.all(after[order][1:] >= after[order][:-1])
    assert allocation.blend(common, allocation.layer_quantiles(common), 0.0) is common


def test_blend_one_is_the_quantiles_and_zero_the_scores():
    common = {"n": [torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)]}
    q = allocation.layer_quantiles(common)
    assert torch.allclose(allocation.blend(common, q, 1.0)["n"][0], q["n"][0])
    half = allocation.blend(common, q, 0.5)["n"][0]
    assert torch.allclose(half, (common["n"][0] * q["n"][0]).sqrt())


def test_moving_the_blend_gives_a_starved_layer_its_units_back_and_keeps_the_best_of_them():
    ad = BertAdapter(make_tiny_bert())
    values = _scores(ad.unit_counts(), starve=0)
    seq = 10.0
    m0, costs = optin.search(ad, values, 0.6, seq)
    m1, _ = optin.search(ad, values, 0.6, seq, allocation=1.0)
    k0, k1 = kept_counts(m0), kept_counts(m1)
    assert k1["neurons"][0] > k0["neurons"][0] and k1["heads"][0] >= k0["heads"][0]
    for masks in (m0, m1):
        assert costs.macs_of_masks(masks) <= 0.6 * costs.macs() * (1 + 1e-9)
        for kind in masks:  # which units: always a layer's best by the scores
            for mask, score in zip(masks[kind], values[kind]):
                kept = int(mask.sum())
                top = torch.argsort(score, descending=True)[:kept]
                assert mask[top].sum() == kept


def test_divergence_is_zero_for_equal_outputs_and_averages_pixels():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, generator=g)
    assert measured.divergence(a, a) == pytest.approx(0.0, abs=1e-12)
    assert measured.divergence(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # same distribution
    b = torch.randn(4, 5, generator=g)
    manual = float((a.double().softmax(1) * (a.double().log_softmax(1) - b.double().log_softmax(1))).sum(1).mean())
    assert measured.divergence(a, b) == pytest.approx(manual) and manual > 0
    pix_a, pix_b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    flat = measured.divergence(pix_a.movedim(1, -1).reshape(-1, 3), pix_b.movedim(1, -1).reshape(-1, 3))
    assert measured.divergence(pix_a, pix_b) == pytest.approx(flat)


def test_the_calibration_sample_is_split_into_disjoint_halves():
    batch = make_batch(batch_size=7)
    fit, check = allocation.split_for_trial([batch], lambda b: b["input_ids"].shape[0])
    assert fit[0]["input_ids"].shape[0] == 4 and check[0]["input_ids"].shape[0] == 3
    assert torch.equal(torch.cat([fit[0]["input_ids"], check[0]["input_ids"]]), batch["input_ids"])
    several = [make_batch(seed=s) for s in range(3)]
    assert allocation.split_for_trial(several, lambda b: 4) == (several[:1], several[1:])
    one = make_batch(batch_size=1)
    assert allocation.split_for_trial([one], lambda b: 1) == ([one], [one])


def test_choose_takes_the_smallest_divergence_unless_a_smaller_blend_is_within_the_margin():
    m = {"n": [torch.ones(2)]}
    trials = [allocation.Trial(0.0, m, 0.3), allocation.Trial(0.5, m, 0.1), allocation.Trial(1.0, m, 0.1),
              allocation.Trial(0.25, None, error="degenerate")]
    assert allocation.choose(trials).alpha == 0.5
    close = [allocation.Trial(0.0, m, 0.104), allocation.Trial(0.5, m, 0.100), allocation.Trial(1.0, m, 0.2)]
    assert allocation.choose(close, margin=0.05).alpha == 0.0  # 4% closer is within the noise: the scores' own
    assert allocation.choose(close, margin=0.0).alpha == 0.5
    # the measured allocation comes last in the order of preference: kept only when clearly closer
    assert allocation.choose([*close, allocation.Trial("measured", m, 0.09)]).alpha == "measured"
    assert allocation.choose([*close, allocation.Trial("measured", m, 0.0995)]).alpha == 0.0
    with pytest.raises(OptinError, match="blend 0.25: degenerate"):
        allocation.choose([trials[-1]])


@pytest.mark.parametrize("value", ["sometimes", 1.5, -0.1, True, "nan"])
def test_bad_allocations_are_refused(value):
    with pytest.raises(OptinError, match="--allocation"):
        allocation.parse_allocation(value)


def test_good_allocations_parse():
    assert allocation.parse_allocation(None) == allocation.DEFAULT_ALLOCATION
    assert allocation.parse_allocation(" Evaluate ") == "evaluate"
    assert allocation.parse_allocation("0.5") == 0.5 and allocation.parse_allocation(1) == 1.0


# --- the stage on models --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADAPTERS)
def test_evaluate_keeps_the_candidate_closest_to_the_unpruned_model_on_held_out_examples(name):
    """On a tiny model of every adapter (classifiers and segmenters, transformers and CNNs): every blend is tried, each candidate's divergence is what judging
    it again gives, the kept masks are the closest candidate's, and the pruned model meets the budget."""
    if name == "mmseg-mask2former" and mmseg_unavailable():
        pytest.skip(mmseg_unavailable())
    t = tiny(name)
    ad = t.adapter
    values = _scores(ad.unit_counts(), seed=1, starve=0)
    scores = optin.rankings.Scores(values=values, adapter=ad.name, fingerprint="x", scorer="test", options={},
                                   scale="global")
    seq = t.seq_len if t.seq_len is not None else ad.seq_len([t.batch])
    steps = ("reconstruct",)
    before = copy.deepcopy(ad.model.state_dict())
    masks, costs, info = optin.recipe.allocate(ad, scores, t.budget, seq, "ptf", None, True, "evaluate", [t.batch],
                                               steps)
    assert all(torch.equal(v, before[k]) for k, v in ad.model.state_dict().items())  # candidates ran on copies
    assert [r["alpha"] for r in info["trials"]] == list(allocation.CANDIDATES)  # the blends, then measured
    made = [r for r in info["trials"] if r["divergence"] is not None]
    least = min(r["divergence"] for r in made)
    best = next(r for r in made if r["divergence"] <= least * (1 + allocation.MARGIN))  # the first, in order
    assert info["alpha"] == best["alpha"] and kept_counts(masks) == best["kept"]
    assert costs.macs_of_masks(masks) <= t.budget * costs.macs() * (1 + 1e-9)
    fit, check = allocation.split_for_trial([t.batch], ad.batch_size)
    with torch.no_grad():
        reference = [ad.logits(b) for b in check]
    again = allocation.judge(ad, masks, fit, check, steps, True, reference)
    assert again == pytest.approx(best["divergence"], rel=1e-5, abs=1e-9)


def test_prune_with_evaluate_records_the_trials_and_meets_the_budget():
    ad = BertAdapter(make_tiny_bert())
    batch = make_batch(batch_size=8)
    values = _scores(ad.unit_counts(), starve=1)
    scores = optin.rankings.Scores(values=values, adapter=ad.name, fingerprint=optin.rankings.fingerprint(ad.model),
                                   scorer="test", options={}, scale="global")
    result = optin.prune(ad, [batch], scores=scores, budget=0.6, allocation="evaluate")
    info = result.info["allocation"]
    assert info["allocation"] == "evaluate" and info["alpha"] in allocation.CANDIDATES
    assert len(info["trials"]) == len(allocation.CANDIDATES) == 6
    assert result.macs_after <= 0.6 * result.macs_before * (1 + 1e-9)
    with pytest.raises(OptinError, match="allocation"):
        optin.prune(BertAdapter(make_tiny_bert()), [batch], scores=scores, allocation="often")
    with pytest.raises(OptinError, match="evaluate"):
        optin.search(ad, values, 0.6, 10.0, allocation="evaluate")


def test_run_and_compare_take_the_allocation(workspace, cli_sandbox):
    out = cli_sandbox / "run"
    res = CliRunner().invoke(cli, ["run", "--model", workspace["model"], "--data", workspace["data"], "--scorer",
                                   "magnitude", "--calib-size", "16", "--eval-size", "16", "--allocation", "evaluate",
                                   "--output", str(out), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["allocation"] == "evaluate" and len(report["allocation"]["trials"]) == 6
    assert report["macs_ratio"] <= 0.6 + 1e-9

    folder = cli_sandbox / "cmp"
    args = ["compare", "--model", workspace["model"], "--data", workspace["data"], "--scorers", "magnitude",
            "--budgets", "0.6", "--calib-size", "16", "--eval-size", "16", "--output", str(folder), "--quiet",
            "--no-speed"]
    res = CliRunner().invoke(cli, [*args, "--allocation", "0.5"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cells = json.loads((folder / "compare.json").read_text())["cells"]
    assert cells[0]["allocation"] == {"allocation": 0.5, "alpha": 0.5}
    res = CliRunner().invoke(cli, [*args, "--allocation", "scores"])  # another allocation in the same folder
    assert res.exit_code == 2 and "allocation" in res.output and "--overwrite" in res.output


def test_a_folder_from_before_the_setting_resumes_only_with_the_allocation_it_was_made_with(workspace, cli_sandbox):
    """Folders journalled before ``--allocation`` existed were made with the scores' own allocation."""
    folder = cli_sandbox / "old"
    args = ["compare", "--model", workspace["model"], "--data", workspace["data"], "--scorers", "magnitude",
            "--budgets", "0.6", "--calib-size", "16", "--eval-size", "16", "--output", str(folder), "--quiet",
            "--no-speed"]
    check_old_compare_folders(args, folder, "allocation", ["--allocation", "scores"], ["--budgets", "0.6", "0.9"])


@pytest.mark.parametrize("value", ["often", "1.5"])
def test_a_bad_allocation_on_the_command_line_is_one_error_line(value, cli_sandbox):
    one_error_line(CliRunner().invoke(cli, ["run", "--allocation", value, "--output", str(cli_sandbox / "x")]),
                   "--allocation")
