"""The ``optin`` command line: listing, input errors (exit code 2, one line) and end-to-end runs on a tiny BERT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import optin
from conftest import save_tiny_bert, write_reviews
from optin.cli import cli
from optin_plugins.adapters.bert import BertAdapter

REPORT_KEYS = ["model", "adapter", "scorer", "searcher", "budget", "macs_before", "macs_after", "params_before",
               "params_after", "metric", "metric_before", "metric_after", "throughput_before", "throughput_after",
               "seconds_scoring"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny 2-label BERT with its tokenizer, a labelled CSV and a folder no adapter handles."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_bert(root / "tiny-bert")

    data = root / "data.csv"
    write_reviews(data, 60)

    gpt2 = root / "gpt2-like"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))

    other_dir = save_tiny_bert(root / "other-bert", seed=1)  # same shapes, other weights
    return {"root": root, "model": model_dir, "data": data, "gpt2": gpt2, "other": other_dir}


pytestmark = pytest.mark.usefixtures("cli_sandbox")  # every command runs from an empty folder (conftest)


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def error_lines(result) -> list[str]:
    return [line for line in result.output.strip().splitlines() if line.strip()]


# --- listing ------------------------------------------------------------------------------------

def test_list_json_contains_builtins():
    res = invoke("list", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    got = {(p["kind"], p["name"]) for p in data["plugins"]}
    assert {("adapter", "bert"), ("scorer", "trajectory"), ("scorer", "magnitude"), ("scorer", "fisher"),
            ("scorer", "random"), ("searcher", "ptf")} <= got
    assert {("adapter", a) for a in ("mask2former", "mmseg-mask2former", "swin", "hf-swin", "vgg", "mobilenetv2")} <= got
    # every built-in works here, except optional front ends that say why they cannot (mmseg without mmcv)
    for p in data["plugins"]:
        if p["origin"] == "optin" and not p["available"]:
            assert (p["kind"], p["name"]) == ("adapter", "mmseg-mask2former") and "mmcv" in (p["error"] or ""), p
    assert {"trec", "sms-spam", "movie-sentiment", "fmnist-mosaic", "photos"} <= set(data["tasks"])
    assert "minilm-trec" in data["models"]


def test_list_table():
    res = invoke("list")
    assert res.exit_code == 0, res.output
    for name in ("trajectory", "magnitude", "fisher", "random", "ptf", "bert"):
        assert name in res.output


# --- input errors: exit code 2 and one line -----------------------------------------------------

def test_unknown_scorer(tmp_path):
    res = invoke("run", "--scorer", "nope", "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2, res.output
    lines = error_lines(res)
    assert len(lines) == 1, lines
    assert "'nope'" in lines[0]
    for name in ("trajectory", "magnitude", "fisher", "random"):
        assert name in lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_bad_budget(budget, tmp_path):
    res = invoke("run", "--budget", budget, "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2, res.output
    assert len(error_lines(res)) == 1
    assert "budget" in res.output and budget in res.output


def test_unknown_plugin_option(workspace, tmp_path):
    res = invoke("run", "--model", workspace["model"], "--data", workspace["data"], "--scorer", "magnitude",
                 "--set", "neuron_grup=8", "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2, res.output
    assert "neuron_grup" in res.output and len(error_lines(res)) == 1


def test_missing_model_path(workspace, tmp_path):
    res = invoke("run", "--model", "./does/not/exist", "--data", workspace["data"], "--scorer", "magnitude",
                 "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2, res.output
    assert "does not exist" in res.output
    assert len(error_lines(res)) == 1


def test_model_folder_no_adapter_handles(workspace, tmp_path):
    res = invoke("run", "--model", workspace["gpt2"], "--data", workspace["data"], "--scorer", "magnitude",
                 "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2, res.output
    assert "no adapter" in res.output
    assert "bert" in res.output  # names the installed adapters
    assert len(error_lines(res)) == 1


def test_missing_data_file(workspace, tmp_path):
    res = invoke("run", "--model", workspace["model"], "--data", tmp_path / "nope.csv", "--scorer", "magnitude",
                 "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2, res.output
    assert "does not exist" in res.output


def test_prune_with_scores_of_another_model(workspace, tmp_path):
    other = BertAdapter.load(str(workspace["other"]))
    scores_path = tmp_path / "other-scores.safetensors"
    optin.score(other, [], "magnitude").save(scores_path)
    res = invoke("prune", "--model", workspace["model"], "--data", workspace["data"], "--scores", scores_path,
                 "--budget", "0.5", "--output", tmp_path / "out", "--calib-size", "16", "--eval-size", "16", "--quiet")
    assert res.exit_code == 2, res.output
    assert "rescore" in res.output
    assert not (tmp_path / "out" / "report.json").exists()


def test_prune_with_corrupt_scores(workspace, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 20)
    res = invoke("prune", "--model", workspace["model"], "--data", workspace["data"], "--scores", bad,
                 "--output", tmp_path / "out", "--calib-size", "16", "--eval-size", "16", "--quiet")
    assert res.exit_code == 2, res.output
    assert "corrupt" in res.output


@pytest.mark.parametrize("flag", ["--calib-size", "--eval-size", "--batch-size"])
def test_non_positive_sizes_are_input_errors(workspace, tmp_path, flag):
    # Regression: sizes of 0 used to crash deep inside the recipe with a traceback and exit code 1.
    res = invoke("run", "--model", workspace["model"], "--data", workspace["data"], "--scorer", "magnitude",
                 "--output", tmp_path / "out", "--quiet", "--calib-size", "8", "--eval-size", "8", flag, "0")
    assert res.exit_code == 2, f"exit {res.exit_code}: {res.exception!r}"
    assert len(error_lines(res)) == 1


def test_config_unknown_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("budgett: 0.5\n")
    res = invoke("run", "--config", cfg, "--quiet")
    assert res.exit_code == 2, res.output
    assert "budgett" in res.output and "budget" in res.output


def test_command_line_flag_beats_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("budget: 0.5\n")
    res = invoke("run", "--config", cfg, "--budget", "0", "--output", tmp_path / "out", "--quiet")
    assert res.exit_code == 2 and "budget" in res.output  # the flag's 0, not the file's 0.5


# --- end to end ---------------------------------------------------------------------------------

def _check_export(report: dict, out: Path, workspace: dict, batch_texts: list[str]) -> None:
    """The exported model equals the original model with the removed units masked."""
    pruned = optin.load_pruned(out / "model")
    assert pruned.unit_counts() == report["kept"]
    assert not [p for p in (out / "model").rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    original = BertAdapter.load(str(workspace["model"]))
    masks = {}
    for kind, per_layer in pruned.kept_index.items():
        full = original.unit_counts()[kind]
        masks[kind] = [torch.zeros(n).index_fill_(0, torch.tensor(idx, dtype=torch.long), 1.0) if idx
                       else torch.zeros(n) for n, idx in zip(full, per_layer)]
    batch = pruned.collate([{"text": t, "label": 0} for t in batch_texts])
    with torch.no_grad():
        with original.masked(masks):
            expected = original.logits(batch)
        got = pruned.logits(batch)
    assert torch.allclose(got, expected, atol=1e-4)


TEXTS = ["the movie was very good and fun", "the plot was so awful and boring", "bad"]


def test_run_end_to_end(workspace, tmp_path):
    out = tmp_path / "out"
    res = invoke("run", "--model", workspace["model"], "--data", workspace["data"], "--scorer", "magnitude",
                 "--budget", "0.6", "--output", out, "--calib-size", "16", "--eval-size", "32", "--quiet",
                 "--recover", "none")  # removal alone: the export equals the original with the units masked
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in report, key
    assert report["adapter"] == "bert" and report["scorer"] == "magnitude" and report["searcher"] == "ptf"
    assert report["budget"] == 0.6 and report["model"] == str(workspace["model"])
    assert report["macs_after"] <= 0.6 * report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert report["max_abs_diff_vs_masked"] <= 1e-4
    assert report["metric"] == "accuracy" and 0 <= report["metric_after"] <= 1
    assert report["throughput_before"] > 0 and report["throughput_after"] > 0
    assert report["seconds_scoring"] >= 0
    assert report["calibration_examples"] == 16
    assert (out / "scores.safetensors").is_file()
    assert not (out / "scores.partial.safetensors").exists()
    _check_export(report, out, workspace, TEXTS)
    # the export can itself be the --model of another command
    pruned = optin.load_model(str(out / "model"))
    assert pruned.unit_counts() == report["kept"]


def test_score_then_prune_without_rescoring(workspace, tmp_path):
    scored = tmp_path / "scored"
    res = invoke("score", "--model", workspace["model"], "--data", workspace["data"], "--scorer", "magnitude",
                 "--output", scored, "--calib-size", "16", "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    scores_file = scored / "scores.safetensors"
    assert scores_file.is_file()
    assert not (scored / "report.json").exists()

    out = tmp_path / "pruned"
    res = invoke("prune", "--model", workspace["model"], "--data", workspace["data"], "--scores", scores_file,
                 "--budget", "0.5", "--output", out, "--calib-size", "16", "--eval-size", "32", "--quiet",
                 "--recover", "none")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["seconds_scoring"] == 0
    assert report["scorer"] == "magnitude"
    assert report["budget"] == 0.5
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    assert not (out / "scores.safetensors").exists()  # nothing was rescored
    _check_export(report, out, workspace, TEXTS)


def test_default_recipe_reconstructs(workspace, tmp_path):
    """By default the layers reading pruned units are refit (--recover reconstruct): the export is the
    recovered masked model (checked in the run), no longer the original with the units masked."""
    out = tmp_path / "out"
    res = invoke("run", "--model", workspace["model"], "--data", workspace["data"], "--scorer", "magnitude",
                 "--budget", "0.6", "--output", out, "--calib-size", "16", "--eval-size", "32", "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["recover"] == ["reconstruct"]
    layers = report["recovery"]["layers"]
    assert layers and all(r.get("error_after", r["error_before"]) <= r["error_before"] + 1e-9 for r in layers)
    assert report["max_abs_diff_vs_masked"] <= 1e-4  # pruned == recovered masked
    with pytest.raises(AssertionError):
        _check_export(report, out, workspace, TEXTS)  # the kept weights were refit


@pytest.mark.parametrize("options_in", ["config", "command line"])
def test_config_file_is_honoured(workspace, tmp_path, options_in):
    """Flags from a --config file, with the plugin options in its `options:` key or given with --set.
    Regression: optin/cli.py `_load_config` used to pass only the command's parameter names to
    `optin.config.read_config`, which rejected the documented `options:` key ("unknown key 'options'")."""
    out = tmp_path / "cfg-out"
    cfg = tmp_path / "run.yaml"
    config = {"budget": 0.5, "scorer": "trajectory", "calib-size": 16, "eval-size": 32}
    extra = ["--set", "neuron_group=8"] if options_in == "command line" else []
    if not extra:
        config["options"] = {"neuron_group": 8}
    cfg.write_text(yaml.safe_dump(config))
    res = invoke("run", "--config", cfg, "--model", workspace["model"], "--data", workspace["data"], *extra,
                 "--output", out, "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["budget"] == 0.5
    assert report["scorer"] == "trajectory"
    assert report["options"] == {"neuron_group": 8}
    assert report["calibration_examples"] == 16
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    scores = optin.Scores.load(out / "scores.safetensors")
    assert scores.options["neuron_group"] == 8
    for layer in scores.values["neurons"]:  # the option reached the scorer
        groups = layer.reshape(-1, 8)
        assert torch.equal(groups, groups[:, :1].expand_as(groups))


def test_finetune_on_an_unlabelled_task_is_refused_in_one_line(tmp_path):
    pytest.importorskip("skimage", reason="the photos task needs scikit-image")
    res = invoke("finetune", "--model", str(tmp_path), "--task", "photos", "--output", str(tmp_path / "out"))
    assert res.exit_code == 2
    lines = error_lines(res)
    assert len(lines) == 1 and "task 'photos' is unlabelled" in lines[0] and "needs a labelled task" in lines[0]
