"""``optin compare`` on a tiny BERT and a tiny CSV: outputs, agreement with ``optin run``, resuming after an
interrupt, reused scores, bad input; and the statistics (``optin.stats``) on known inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import optin.compare
import optin.compare_report
import optin.errors
from conftest import make_batch, save_tiny_bert, write_reviews
from optin import registry, stats
from optin.cli import cli, spread_values
from optin.measure import evaluate, metric_of_examples, miou_of, per_example, timings
from optin_plugins.adapters.bert import BertAdapter

GRID = ["--scorers", "magnitude", "random", "--budgets", "0.9", "0.6", "--seeds", "0", "1"]
SIZES = ["--calib-size", "16", "--eval-size", "16"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    write_reviews(root / "data.csv")
    return {"root": root, "model": save_tiny_bert(root / "tiny-bert"), "data": root / "data.csv"}


def _quick_timings(runs, **kw):
    return timings(runs, warmup=0, repeats=3)


@pytest.fixture
def sandbox(cli_sandbox, monkeypatch):
    """The CLI sandbox (conftest), and the speed of each pruned model timed in 3 short rounds."""
    monkeypatch.setattr(optin.compare, "timings", _quick_timings)
    return cli_sandbox


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def compare_args(workspace, out, *extra):
    return ["compare", "--model", workspace["model"], "--data", workspace["data"], *GRID, *SIZES,
            "--output", out, "--quiet", *extra]


@pytest.fixture(scope="module")
def full_run(workspace, tmp_path_factory) -> Path:
    """One uninterrupted comparison (2 scorers x 2 budgets x 2 seeds), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("full") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTIN_CACHE", str(out.parent / "cache"))
        mp.setattr(optin.compare, "timings", _quick_timings)
        res = invoke(*compare_args(workspace, out))
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


def _cells(folder: Path) -> list[dict]:
    return [r for r in map(json.loads, (folder / "cells.jsonl").read_text().splitlines()) if r["kind"] == "cell"]


STABLE = ("key", "metric", "results", "macs_ratio", "params_after", "kept")


# --- the command -------------------------------------------------------------------------------------

def test_outputs_are_complete_and_consistent(full_run):
    result = json.loads((full_run / "compare.json").read_text())
    assert len(result["cells"]) == 8 and len(_cells(full_run)) == 8
    assert len(result["aggregates"]) == 4
    assert result["grid"]["reference"] == "magnitude" and result["metric"] == "accuracy"
    n = result["unpruned"]["examples"]
    assert n == len(result["unpruned"]["results"]["correct"]) > 10
    for cell in result["cells"]:
        correct = cell["results"]["correct"]
        assert len(correct) == n and set(correct) <= {0, 1}
        assert cell["metric"] == pytest.approx(sum(correct) / n)
        assert cell["macs_ratio"] <= cell["budget"] + 1e-9
        assert (cell["timings"] is not None) == (cell["seed"] == 0)  # speed measured for the first seed only
    for row in result["aggregates"]:
        m = row["metric"]
        cells = [c for c in result["cells"] if (c["scorer"], c["budget"]) == (row["scorer"], row["budget"])]
        assert sorted(m["per_seed"]) == sorted(c["metric"] for c in cells)
        assert m["mean"] == pytest.approx(np.mean(m["per_seed"]))
        assert m["ci"][0] - 1e-12 <= m["mean"] <= m["ci"][1] + 1e-12
        assert m["min"] <= m["mean"] <= m["max"]
        d = row["difference"]
        if row["scorer"] == "magnitude":  # the reference against itself: exactly 0, CI [0, 0]
            assert d["mean"] == 0.0 and d["ci"] == [0.0, 0.0] and not d["excludes_zero"]
        else:
            ref = next(r for r in result["aggregates"] if (r["scorer"], r["budget"]) == ("magnitude", row["budget"]))
            assert d["mean"] == pytest.approx(m["mean"] - ref["metric"]["mean"])
            assert d["ci"][0] <= d["mean"] + 1e-12 and d["mean"] - 1e-12 <= d["ci"][1]
        sp = row["speedup"]
        assert sp["rounds"] == 3 and sp["q1"] <= sp["median"] <= sp["q3"]
    assert (full_run / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (full_run / "compare.md").read_text()
    assert "| configuration | budget 0.9 | budget 0.6 |" in md
    row = next(r for r in result["aggregates"] if (r["scorer"], r["budget"]) == ("random", 0.6))
    assert optin.compare_report.fmt_ci(row["metric"]) in md
    assert optin.compare_report.fmt_ci(row["difference"], signed=True) in md
    assert sorted(p.name for p in (full_run / "scores").iterdir()) == [
        "magnitude-seed0.safetensors", "magnitude-seed1.safetensors", "random-seed0.safetensors",
        "random-seed1.safetensors"]


def test_a_cell_equals_what_optin_run_measures(full_run, workspace, sandbox):
    out = sandbox / "run"
    res = invoke("run", "--model", workspace["model"], "--data", workspace["data"], "--scorer", "random",
                 "--budget", "0.6", "--seed", "0", *SIZES, "--output", out, "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    cell = next(c for c in _cells(full_run) if (c["scorer"], c["budget"], c["seed"]) == ("random", 0.6, 0))
    assert cell["metric"] == pytest.approx(report["metric_after"], abs=1e-12)
    assert cell["macs_ratio"] == pytest.approx(report["macs_ratio"])
    assert cell["kept"] == report["kept"] and cell["params_after"] == report["params_after"]
    unpruned = json.loads((full_run / "compare.json").read_text())["unpruned"]
    assert unpruned["metric"] == pytest.approx(report["metric_before"], abs=1e-12)


def test_an_interrupted_comparison_resumes_without_redoing_finished_cells_or_scores(full_run, workspace, sandbox,
                                                                                    monkeypatch):
    out = sandbox / "out"
    real_search = optin.compare.search_stage
    searches, interrupt_at = [], [3]

    def interrupting(*args, **kw):
        searches.append(1)
        if len(searches) in interrupt_at:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the third cell
        return real_search(*args, **kw)

    monkeypatch.setattr(optin.compare, "search_stage", interrupting)
    res = invoke(*compare_args(workspace, out))
    assert res.exit_code != 0 and len(_cells(out)) == 2 and not (out / "compare.json").exists()

    interrupt_at.clear()
    scored = []
    for name in ("magnitude", "random"):
        cls = registry.get("scorer", name)
        monkeypatch.setattr(cls, "score", lambda self, *a, _real=cls.score, **k: scored.append(self.name) or
                            _real(self, *a, **k))
    searches.clear()
    res = invoke(*compare_args(workspace, out))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert len(searches) == 6  # 8 cells, 2 finished before the interrupt
    assert sorted(scored) == ["magnitude", "random"]  # seed 1 only: seed 0's scores were saved before the interrupt
    mine, full = _cells(out), _cells(full_run)
    assert [{k: c[k] for k in STABLE} for c in mine] == [{k: c[k] for k in STABLE} for c in full]
    a = json.loads((out / "compare.json").read_text())["aggregates"]
    b = json.loads((full_run / "compare.json").read_text())["aggregates"]
    assert [(r["metric"], r["difference"]) for r in a] == [(r["metric"], r["difference"]) for r in b]

    # a third run with one more budget: its cells use the saved scores, no scorer runs again
    scored.clear()
    searches.clear()
    res = invoke(*compare_args(workspace, out, "--budgets", "0.9", "0.6", "0.5"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert scored == [] and len(searches) == 4 and len(_cells(out)) == 12
    assert len(json.loads((out / "compare.json").read_text())["aggregates"]) == 6


def test_recovery_settings_reach_the_recipe(workspace, sandbox):
    out = sandbox / "recover"
    res = invoke("compare", "--model", workspace["model"], "--data", workspace["data"], "--scorers", "magnitude",
                 "--budgets", "0.6", "--recover", "none", "reconstruct", *SIZES, "--output", out, "--quiet",
                 "--no-speed", "--allocation", "scores")  # the same masks for both: only the recovery differs
    assert res.exit_code == 0, res.output + repr(res.exception)
    result = json.loads((out / "compare.json").read_text())
    steps = {c["recover"]: c["recover_steps"] for c in result["cells"]}
    assert steps == {"none": [], "reconstruct": ["reconstruct"]}
    assert [r["label"] for r in result["aggregates"]] == ["magnitude recover=none", "magnitude recover=reconstruct"]
    none, rec = (next(c for c in result["cells"] if c["recover"] == r) for r in ("none", "reconstruct"))
    assert none["kept"] == rec["kept"] and none["macs_ratio"] == rec["macs_ratio"]
    assert none["params_after"] == rec["params_after"] and none["recovery"]["layers"] == []
    assert rec["recovery"]["steps"] == ["reconstruct"] and rec["recovery"]["layers"]  # the recipe's stage ran


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text('{"kind": "settings", "a": 1}\n{"kind": "cell", "key": "x"}\n{"kind": "cell", "ke')
    journal = optin.compare.Journal(path)
    assert [r["kind"] for r in journal.records] == ["settings", "cell"]
    journal.append({"kind": "cell", "key": "y"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()[1:]] == ["x", "y"]


def test_other_settings_in_the_same_folder_are_refused(full_run, workspace, sandbox):
    res = invoke("compare", "--model", workspace["model"], "--data", workspace["data"], *GRID,
                 "--calib-size", "8", "--eval-size", "16", "--output", full_run, "--quiet")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "calib_size" in lines[0] and "--overwrite" in lines[0]


@pytest.mark.parametrize("args, words", [
    (["--scorers", "magnitude", "nope"], ["'nope'", "magnitude", "random"]),
    (["--scorers", "magnitude", "--budgets", "0.9", "1.5"], ["budget", "1.5"]),
    (["--scorers", "magnitude", "--reference", "random"], ["--reference", "'random'"]),
    (["--scorers", "magnitude", "--recover", "none", "bogus"], ["'bogus'"]),
    (["--scorers", "magnitude", "--set", "neuron_grup=8"], ["neuron_grup"]),
])
def test_bad_input_is_one_error_line(workspace, sandbox, args, words):
    out = sandbox / "bad"
    res = invoke("compare", "--model", workspace["model"], "--data", workspace["data"], *args, *SIZES,
                 "--output", out, "--quiet")
    assert res.exit_code == 2, res.output + repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    for w in words:
        assert w in lines[0]
    assert not (out / "cells.jsonl").exists()  # refused before any work


def test_options_take_several_values_in_a_row():
    names = {"--scorers", "--budgets"}
    assert spread_values(["--scorers", "a", "b", "--quiet", "--budgets=0.9", "0.6", "--model", "m"], names) == [
        "--scorers", "a", "--scorers", "b", "--quiet", "--budgets=0.9", "--budgets", "0.6", "--model", "m"]
    assert spread_values(["--budgets", "0.9", "--", "x"], names) == ["--budgets", "0.9", "--", "x"]


def test_without_matplotlib_the_plot_is_skipped_with_a_note(full_run, tmp_path, monkeypatch, capsys):
    import sys

    import optin.progress

    monkeypatch.setattr(optin.progress, "_quiet", False)  # (an earlier --quiet command set it)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    result = json.loads((full_run / "compare.json").read_text())
    assert optin.compare_report.plot(result, tmp_path / "compare.png") is False
    assert not (tmp_path / "compare.png").exists()
    assert "optin[plots]" in capsys.readouterr().err


# --- per-example results ------------------------------------------------------------------------------

def test_per_example_results_give_the_metric_evaluate_gives(adapter):
    batches = [make_batch(6, seed=s) for s in (1, 2)]
    other = BertAdapter(optin.compare.copy.deepcopy(adapter.model))
    with torch.no_grad():
        other.model.classifier.weight.mul_(-1)
    for metric in ("accuracy", "agreement"):
        results = per_example(other, batches, metric, adapter)
        assert results.shape == (12,)
        assert metric_of_examples(results) == pytest.approx(evaluate(other, batches, metric, adapter))


class _Seg:
    """A 1x1-convolution segmenter over 3 classes (the adapter methods per_example and evaluate use)."""

    output = "segmentation"

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = nn.Conv2d(2, 3, 1)

    def logits(self, batch):
        return self.model(batch["image"])


def test_per_example_confusions_give_the_miou_evaluate_gives():
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(3, 2, 5, 5, generator=g), "masks": torch.randint(0, 3, (3, 5, 5), generator=g)}
               for _ in range(2)]
    batches[0]["masks"][0, 0] = 255  # ignored pixels
    seg, ref = _Seg(0), _Seg(1)
    for metric in ("miou", "agreement"):
        results = per_example(seg, batches, metric, ref)
        assert results.shape == (6, 3, 3)
        assert metric_of_examples(results) == pytest.approx(evaluate(seg, batches, metric, ref))
        assert stats.metric(results.numpy()) == pytest.approx(metric_of_examples(results))
    encoded = optin.compare.encode(results)
    assert np.array_equal(optin.compare.decode(json.loads(json.dumps(encoded))), results.numpy())


# --- statistics -------------------------------------------------------------------------------------

def test_bootstrap_interval_of_a_constant_is_degenerate():
    counts = stats.resample_counts(50, 500, seed=0)
    assert counts.shape == (500, 50) and (counts.sum(1) == 50).all()
    for value in (0.0, 1.0):
        s = stats.summarize(np.full((2, 50), value), counts)
        assert s["mean"] == value and s["ci"] == [value, value]


def test_bootstrap_interval_of_a_proportion_has_the_normal_width():
    rng = np.random.default_rng(1)
    x = np.zeros(1000)
    x[rng.choice(1000, 900, replace=False)] = 1  # p = 0.9 exactly
    s = stats.summarize(x[None], stats.resample_counts(1000, 2000, seed=0))
    lo, hi = s["ci"]
    assert lo < 0.9 < hi
    expected = 2 * 1.96 * math.sqrt(0.9 * 0.1 / 1000)
    assert hi - lo == pytest.approx(expected, rel=0.15)


def test_paired_difference_on_the_same_examples():
    rng = np.random.default_rng(2)
    counts = stats.resample_counts(400, 1000, seed=0)
    a = (rng.random((3, 400)) < 0.8).astype(float)
    same = stats.paired_difference(a, a, counts)
    assert same == {"mean": 0.0, "ci": [0.0, 0.0], "excludes_zero": False}
    b = a.copy()
    b[:, :40] = 0  # b misses 40 examples a may get right: paired, the difference is clearly negative
    d = stats.paired_difference(b, a, counts)
    assert d["mean"] == pytest.approx(-a[:, :40].sum() / (3 * 400)) and d["excludes_zero"] and d["ci"][1] < 0


def test_batched_miou_matches_the_core_one():
    rng = np.random.default_rng(3)
    conf = rng.integers(0, 5, size=(7, 4, 4))
    conf[0] = 0  # no class present: 1.0
    conf[1, 2, :] = 0
    conf[1, :, 2] = 0  # class 2 absent from target and prediction
    got = stats.miou(conf)
    assert got == pytest.approx([miou_of(torch.as_tensor(c)) for c in conf])
    ones = np.ones((1, 7))  # one resample drawing every example once: the plain metric
    assert stats.metric(conf, ones)[0] == pytest.approx(stats.metric(conf))


def test_speedup_median_and_quartiles_of_per_round_ratios():
    s = stats.speedup([2.0, 2.0, 4.0, 3.0], [1.0, 2.0, 1.0, 1.0])
    assert s == {"median": 2.5, "q1": 1.75, "q3": 3.25, "rounds": 4}


# --- token reducers (vision) ---------------------------------------------------------------------------

VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)


@pytest.fixture
def vit_setup(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from optin.tasks import Task
    from optin_plugins.zoo.vit_fmnist import save_timm_folder

    torch.manual_seed(0)
    folder = save_timm_folder(VisionTransformer(**VIT).eval(), tmp_path / "vit", VIT, architecture="tiny")
    g = torch.Generator().manual_seed(0)
    data = {s: [{"image": torch.randn(1, 28, 28, generator=g), "label": i % 3} for i in range(24)]
            for s in ("train", "test")}
    task = Task("tiny-images", "random images", ["a", "b", "c"], lambda split: data[split], kind="image")
    return folder, task


def test_reducers_are_compared_with_and_without_tokens(vit_setup, tmp_path):
    folder, task = vit_setup
    cfg = optin.compare.CompareConfig(model=str(folder), task=task, scorers=["magnitude", "random"], budgets=[0.6],
                                      reducers=[None, "tome"], options={"schedule": "constant"}, calib_size=8,
                                      eval_size=12, batch_size=6, output=tmp_path / "out", speed=False)
    result = optin.compare.compare(cfg)
    assert len(result["cells"]) == 4
    for cell in result["cells"]:
        assert cell["macs_ratio"] <= 0.6 + 1e-9
        assert (sum(cell["token_removals"] or []) > 0) == (cell["reducer"] == "tome")
    assert {r["label"] for r in result["aggregates"]} == {"magnitude", "random", "magnitude reducer=tome",
                                                          "random reducer=tome"}
    for row in result["aggregates"]:  # paired against the reference scorer with the same reducer
        if row["scorer"] == "magnitude":
            assert row["difference"]["ci"] == [0.0, 0.0]


def test_a_reducer_whose_schedule_needs_token_scores_a_scorer_lacks_is_refused_before_any_work(vit_setup, tmp_path):
    folder, task = vit_setup
    cfg = optin.compare.CompareConfig(model=str(folder), task=task, scorers=["magnitude"], reducers=["tome"],
                                      output=tmp_path / "out")
    with pytest.raises(optin.errors.OptinError, match="per-token scores"):
        optin.compare.compare(cfg)
    assert not (tmp_path / "out").exists()
