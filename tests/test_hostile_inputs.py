"""Hostile and careless inputs: every one gives exit code 2 and one ``Error:`` line naming the problem and the
fix, runs no code from a model folder, and never loses the outputs of another run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import optin
import optin.recipe
from conftest import NEGATIVE, POSITIVE, save_tiny_bert
from optin.cli import cli

SMALL = ("--calib-size", "8", "--eval-size", "8", "--quiet")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny 2-label BERT with its tokenizer and a labelled CSV."""
    root = tmp_path_factory.mktemp("hostile")
    model_dir = save_tiny_bert(root / "tiny-bert")
    rng = random.Random(0)
    rows = set()
    while len(rows) < 40:
        label = len(rows) % 2
        words = POSITIVE if label else NEGATIVE
        rows.add((f"the movie was {rng.choice(words)} and {rng.choice(words)} {rng.randint(0, 999)}",
                  "pos" if label else "neg"))
    data = root / "data.csv"
    data.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in sorted(rows)))
    return {"root": root, "model": model_dir, "data": data}


pytestmark = pytest.mark.usefixtures("cli_sandbox")  # every command runs from an empty folder (conftest)


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def one_error(res, *words: str) -> str:
    """Exit code 2 and exactly one ``Error:`` line (no traceback) that contains every one of ``words``."""
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 2, f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# --- plugin options, config files, data files (list 4 and 7) ------------------------------------

def test_option_value_of_the_wrong_type(ws, tmp_path):
    res = invoke("run", "--model", ws["model"], "--data", ws["data"], "--set", "temperature=abc",
                 "--output", tmp_path / "out", *SMALL)
    one_error(res, "temperature='abc'", "--set")


def test_fisher_micro_batch_zero(ws, tmp_path):
    res = invoke("run", "--model", ws["model"], "--data", ws["data"], "--scorer", "fisher", "--set",
                 "micro_batch=0", "--output", tmp_path / "out", *SMALL)
    one_error(res, "micro_batch", "positive")


def test_yaml_syntax_error_is_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("budget: [0.5\nscorer: x\n")
    res = invoke("run", "--config", cfg)
    one_error(res, "not valid YAML", "line 2")


def test_unparseable_option_value_is_one_line():
    one_error(invoke("run", "--set", "x=[1"), "option 'x'", "quote")


def test_jsonl_rows_that_are_lists(ws, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("[1, 2]\n[3, 4]\n")
    res = invoke("run", "--model", ws["model"], "--data", data, "--output", tmp_path / "out", *SMALL)
    one_error(res, "row 1 is a list", "JSON object")


# --- model folders that ask to run code (list 1), broken folders (list 4, 7) --------------------

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nfrom transformers import {base} as {cls}\n"


def _hostile(folder: Path, config: str, marker: Path) -> Path:
    """``folder`` with ``config`` naming a module beside it (the module would create ``marker``)."""
    if config == "tokenizer_config.json":
        (folder / "evil_tok.py").write_text(EVIL.format(marker=str(marker), base="BertTokenizerFast",
                                                        cls="EvilTokenizer"))
        cfg = json.loads((folder / config).read_text())
        cfg.update(tokenizer_class="EvilTokenizer",
                   auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]})
    else:
        (folder / "evil_model.py").write_text(EVIL.format(marker=str(marker), base="BertForSequenceClassification",
                                                          cls="EvilModel"))
        cfg = json.loads((folder / config).read_text()) if (folder / config).is_file() else {}
        cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForSequenceClassification":
                           "evil_model.EvilModel", "AutoImageProcessor": "evil_model.EvilModel"}
    (folder / config).write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("config", ["config.json", "tokenizer_config.json", "preprocessor_config.json"])
def test_model_folder_asking_for_remote_code_is_refused(ws, tmp_path, config):
    import shutil

    marker = tmp_path / "MARKER"
    folder = _hostile(Path(shutil.copytree(ws["model"], tmp_path / "evil")), config, marker)
    for command in (["run", "--data", ws["data"], "--output", tmp_path / "out", *SMALL],
                    ["finetune", "--data", ws["data"], "--output", tmp_path / "ft", "--epochs", "0.01"]):
        res = CliRunner().invoke(cli, [command[0], "--model", str(folder), *map(str, command[1:])], input="y\ny\n")
        one_error(res, "asks to run its own Python code", config, "auto_map")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()


def test_pruned_export_asking_for_remote_code_is_refused(ws, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    res = invoke("run", "--model", ws["model"], "--data", ws["data"], "--scorer", "magnitude", "--output", out, *SMALL)
    assert res.exit_code == 0, res.output
    marker = tmp_path / "MARKER"
    folder = _hostile(Path(shutil.copytree(out / "model", tmp_path / "evil")), "tokenizer_config.json", marker)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("y\n"))  # a prompt would read "y"
    with pytest.raises(optin.OptinError, match="asks to run its own Python code"):
        optin.load_pruned(folder)
    one_error(invoke("prune", "--model", folder, "--data", ws["data"], "--scores", out / "scores.safetensors",
                     "--output", tmp_path / "p", *SMALL), "auto_map")
    assert not marker.exists()


def test_truncated_weights(ws, tmp_path):
    import shutil

    folder = Path(shutil.copytree(ws["model"], tmp_path / "trunc"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = invoke("run", "--model", folder, "--data", ws["data"], "--output", tmp_path / "out", *SMALL)
    one_error(res, "cannot load model", "adapter 'bert'", "re-save")


def test_no_adapter_message_names_the_model_type_and_what_each_adapter_loads(ws, tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    line = one_error(invoke("run", "--model", folder, "--data", ws["data"], "--output", tmp_path / "out", *SMALL),
                     "model_type 'gpt2'", "GPT2LMHeadModel")
    assert "bert (HF folders" in line and "model_type vit, deit or dinov2" in line


# --- scores files (lists 2 and 4) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def scored(ws, tmp_path_factory) -> Path:
    """A valid scores file of the workspace model (magnitude scorer)."""
    out = tmp_path_factory.mktemp("scored") / "out"
    res = invoke("score", "--model", ws["model"], "--data", ws["data"], "--scorer", "magnitude", "--output", out,
                 "--calib-size", "8", "--quiet")
    assert res.exit_code == 0, res.output
    return out / "scores.safetensors"


def _variant(scored: Path, path: Path, tensors=None, meta=None, drop=()) -> Path:
    """A copy of ``scored`` with tensors and metadata changed (``None`` values delete a key)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(scored), framework="pt") as f:
        metadata = dict(f.metadata())
    data = load_file(str(scored))
    for k, v in (tensors or {}).items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    for k in drop:
        data.pop(k)
    for k, v in (meta or {}).items():
        if v is None:
            metadata.pop(k, None)
        else:
            metadata[k] = v
    save_file(data, str(path), metadata=metadata)
    return path


def _prune_with(ws, scores: Path, out: Path, *extra: str):
    return invoke("prune", "--model", ws["model"], "--data", ws["data"], "--scores", scores, "--output", out,
                  "--budget", "0.6", *extra, *SMALL)


def _all(scored: Path, kind: str, fill: float) -> dict:
    from safetensors.torch import load_file

    return {k: torch.full_like(v, fill) for k, v in load_file(str(scored)).items() if k.startswith(f"score/{kind}")}


@pytest.mark.parametrize("case, words", [
    ("nan", ["NaN or infinite"]),
    ("inf-heads", ["NaN or infinite", "heads"]),
    ("empty", ["holds no scores"]),
    ("bad-layer", ["prefix/kind.layer"]),
    ("no-slash", ["prefix/kind.layer"]),
    ("traversal", ["prefix/kind.layer"]),
    ("2d", ["1-D float tensor"]),
    ("no-adapter", ["lacks the metadata adapter"]),
    ("bad-options", ["options metadata", "JSON object"]),
    ("gap", ["not 0..", "neurons"]),
])
def test_damaged_scores_files_are_refused(ws, scored, tmp_path, case, words):
    from safetensors.torch import load_file

    first = load_file(str(scored))["score/heads.0"]
    variants = {
        "nan": dict(tensors={**_all(scored, "heads", float("nan")), **_all(scored, "neurons", float("nan"))}),
        "inf-heads": dict(tensors=_all(scored, "heads", float("inf"))),
        "empty": dict(drop=list(load_file(str(scored)))),
        "bad-layer": dict(tensors={"score/heads.x1": first}),
        "no-slash": dict(tensors={"heads.0": first}),
        "traversal": dict(tensors={"score/../../etc/passwd.0": first}),
        "2d": dict(tensors={"score/heads.0": first.reshape(1, -1).repeat(2, 1)}),
        "no-adapter": dict(meta={"adapter": None}),
        "bad-options": dict(meta={"options": "{not json"}),
        "gap": dict(tensors={"score/neurons.1": None}),
    }
    bad = _variant(scored, tmp_path / f"{case}.safetensors", **variants[case])
    one_error(_prune_with(ws, bad, tmp_path / "out"), *words)
    assert not (tmp_path / "out" / "report.json").exists()
    with pytest.raises(optin.OptinError):
        optin.Scores.load(bad)


def test_checkpoint_put_appends_and_a_cut_record_costs_only_itself(tmp_path):
    from optin.rankings import Checkpoint

    path = tmp_path / "partial"
    ck = Checkpoint(path, {"job": 1})
    ck.put("a", torch.zeros(1000, dtype=torch.float64))
    size = path.stat().st_size
    ck.put("b", torch.ones(10, dtype=torch.float64))
    grew = path.stat().st_size - size
    assert grew < 400  # the new record only, not the 8 kB already stored
    ck.put("c", torch.full((10,), 2.0, dtype=torch.float64))
    path.write_bytes(path.read_bytes()[:-7])  # killed while writing "c"
    again = Checkpoint(path, {"job": 1})
    assert sorted(again.data) == ["a", "b"] and again.get("a").dtype == torch.float64
    again.put("c", torch.full((10,), 3.0))
    assert torch.equal(Checkpoint(path, {"job": 1}).get("c"), torch.full((10,), 3.0))
    assert Checkpoint(path, {"job": 2}).resumed == 0


# --- pruned exports with hostile plans (lists 4 and 5) -------------------------------------------

@pytest.fixture(scope="module")
def export(ws, tmp_path_factory) -> Path:
    """A pruned export (OUTPUT/model) of the workspace model."""
    out = tmp_path_factory.mktemp("export") / "out"
    res = invoke("run", "--model", ws["model"], "--data", ws["data"], "--scorer", "magnitude", "--output", out,
                 "--budget", "0.7", *SMALL)
    assert res.exit_code == 0, res.output
    return out / "model"


def _plan_variant(export: Path, tmp_path: Path, change) -> Path:
    import shutil

    folder = Path(shutil.copytree(export, tmp_path / "plan-variant"))
    plan = json.loads((folder / "optin-plan.json").read_text())
    plan = change(plan)
    (folder / "optin-plan.json").write_text(json.dumps(plan))
    return folder


def _set(path: list, value):
    def change(plan):
        node = plan
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return plan
    return change


PLANS = {
    "short unit_counts": (_set(["unit_counts", "heads"], [4]), ["unit_counts['heads']"]),
    "negative unit_counts": (_set(["unit_counts", "heads"], [-1, 2, 2]), ["unit_counts['heads']", ">= 0"]),
    "string unit_counts": (_set(["unit_counts", "heads"], "4,4,4"), ["unit_counts['heads']"]),
    "list instead of mapping": (lambda plan: [plan], ["must be a JSON object"]),
    "unit_counts a list": (_set(["unit_counts"], [[4, 4, 4]]), ["'unit_counts' must be a mapping"]),
    "missing plan": (_set(["plan"], KeyError), ["'plan' must be a mapping", "missing"]),
    "class __class__": (_set(["plan", "model_class"], "__class__"), ["'__class__'", "not a transformers model class"]),
    "class AutoModel": (_set(["plan", "model_class"], "AutoModel"), ["'AutoModel'", "not a transformers model class"]),
    "unknown model_type": (_set(["plan", "config", "model_type"], "evil"), ["model_type 'evil'"]),
    "a million layers": (_set(["plan", "config", "num_hidden_layers"], 1_000_000), ["num_hidden_layers = 1000000"]),
    "huge vocabulary": (_set(["plan", "config", "vocab_size"], 10 ** 11), ["word_embeddings", "100000000000"]),
    "unknown adapter": (_set(["adapter"], "nope"), ["unknown adapter 'nope'"]),
}


@pytest.mark.parametrize("case", list(PLANS))
def test_hostile_plans_fail_fast_in_one_line(export, ws, tmp_path, case):
    import time

    change, words = PLANS[case]
    folder = _plan_variant(export, tmp_path, change)
    t0 = time.perf_counter()
    with pytest.raises(optin.OptinError) as info:
        optin.load_pruned(folder)
    assert time.perf_counter() - t0 < 1.0
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    one_error(invoke("run", "--model", folder, "--data", ws["data"], "--output", tmp_path / "out", *SMALL), *words)
    assert not (tmp_path / "out").exists()


def test_timm_folder_whose_weights_do_not_match_its_config(tmp_path, ws):
    from timm.models.vision_transformer import VisionTransformer

    from optin_plugins.adapters.timm_io import save_timm_folder

    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)
    folder = save_timm_folder(VisionTransformer(**args), tmp_path / "vit", args)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"]["embed_dim"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    one_error(invoke("run", "--model", folder, "--task", "fashion-mnist", "--output", tmp_path / "out", *SMALL),
              "does not match the model", "tensors of other shapes", "another config")


# --- output folders (list 3) -------------------------------------------------------------------------

def _run(ws, out: Path, *extra: str):
    return invoke("run", "--model", ws["model"], "--data", ws["data"], "--scorer", "magnitude", "--output", out,
                  *extra, *SMALL)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_previous_run_is_never_replaced_without_overwrite(ws, tmp_path):
    out = tmp_path / "out"
    assert _run(ws, out, "--budget", "0.7").exit_code == 0
    before = _snapshot(out)
    one_error(_run(ws, out, "--budget", "0.5"), "already holds the outputs of a previous run", "--overwrite")
    one_error(invoke("score", "--model", ws["model"], "--data", ws["data"], "--output", out, "--quiet"),
              "scores.safetensors", "--overwrite")
    assert _snapshot(out) == before
    res = _run(ws, out, "--budget", "0.5", "--overwrite")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["budget"] == 0.5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_an_interrupted_overwrite_leaves_the_previous_run_intact(ws, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _run(ws, out, "--budget", "0.7").exit_code == 0
    before = _snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(optin.recipe, "evaluate_stage", interrupted)  # after scoring and pruning
    res = _run(ws, out, "--budget", "0.5", "--overwrite")
    assert res.exit_code != 0
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(ws, tmp_path):
    from filelock import FileLock

    from optin.outputs import lock_path

    out = tmp_path / "out"
    with FileLock(str(lock_path(out)), timeout=0):  # another process's run holds the folder
        one_error(_run(ws, out), "in use by another optin run")
    assert not out.exists()
    assert _run(ws, out).exit_code == 0  # released: the folder is free again


def test_output_under_a_file_or_in_a_read_only_place(ws, tmp_path):
    import os

    (tmp_path / "file").write_text("x")
    one_error(_run(ws, tmp_path / "file" / "out"), "a part of its path is a file", "another --output")
    one_error(_run(ws, tmp_path / "file"), "is a file")
    if os.geteuid() == 0:  # root writes anywhere chmod allows: use a file system nobody can write
        read_only = Path("/proc/optin-test/out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        read_only = locked / "out"
    one_error(_run(ws, read_only), "--output")


def test_plan_and_report_record_how_the_scores_were_made(ws, tmp_path):
    scored = tmp_path / "scored"
    res = invoke("score", "--model", ws["model"], "--data", ws["data"], "--scorer", "random", "--seed", "3",
                 "--calib-size", "12", "--output", scored, "--quiet")
    assert res.exit_code == 0, res.output
    out = tmp_path / "pruned"
    res = invoke("prune", "--model", ws["model"], "--data", ws["data"], "--scores", scored / "scores.safetensors",
                 "--budget", "0.6", "--output", out, *SMALL)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_examples"] == 12 and report["scores_seed"] == 3
    assert report["scorer"] == "random" and report["options"] == report["scorer_options"]
    info = json.loads((out / "model" / "optin-plan.json").read_text())["info"]
    for key in ("seed", "scorer", "options", "scorer_options", "calibration_examples", "scores_seed", "budget"):
        assert info[key] == report[key], key


# --- degenerate results, unreachable budgets, options honoured on every path (lists 2 and 7) ----------

def test_a_budget_that_removes_every_unit_is_refused_with_the_floor(ws, tmp_path):
    line = one_error(_run(ws, tmp_path / "out", "--budget", "1e-6"), "degenerate", "removes every unit",
                     "raise --budget to at least", "--allow-degenerate")
    floor = float(line.split("at least ")[1].split(" ")[0])
    assert 0 < floor < 1
    assert not (tmp_path / "out").exists()
    res = _run(ws, tmp_path / "out", "--budget", "1e-6", "--allow-degenerate")  # said explicitly: accepted
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(map(sum, report["kept"].values())) == 0


def test_a_result_that_empties_a_kind_is_refused(ws, scored, tmp_path):
    """With the scores' own allocation a search that empties a kind is refused; the evaluated allocation
    (the default) drops that candidate, says so, and keeps a blend that keeps every kind."""
    from safetensors.torch import load_file

    tensors = load_file(str(scored))
    tiny = {k: torch.full_like(v, 1e-9) for k, v in tensors.items() if k.startswith("score/heads")}
    huge = {k: torch.full_like(v, 1e9) for k, v in tensors.items() if k.startswith("score/neurons")}
    bad = _variant(scored, tmp_path / "heads-worthless.safetensors", tensors={**tiny, **huge}, meta={"scale": "global"})
    one_error(_prune_with(ws, bad, tmp_path / "out", "--allocation", "scores"), "degenerate", "removes all 12 heads",
              "--allow-degenerate")
    res = _prune_with(ws, bad, tmp_path / "evaluated")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "evaluated" / "report.json").read_text())
    first = report["allocation"]["trials"][0]
    assert first["alpha"] == 0.0 and "removes all 12 heads" in first["error"]
    assert report["allocation"]["alpha"] > 0 and sum(report["kept"]["heads"]) > 0
    ad = optin.load_model(str(ws["model"]))
    batch = ad.collate([{"text": "the movie was good", "label": 0}])
    with pytest.raises(optin.OptinError, match="degenerate"):
        optin.prune(ad, [batch], scores=bad, budget=0.6, allocation="scores")
    assert optin.prune(ad, [batch], scores=bad, budget=0.6, allow_degenerate=True, allocation="scores"
                       ).adapter.unit_counts()["heads"] == [0, 0, 0]


def test_ptf_min_keep_is_honoured_on_the_transformer_path(ws, tmp_path):
    one_error(_run(ws, tmp_path / "out", "--set", "min_keep=100"), "min_keep=100", "above the budget 0.6",
              "lower min_keep or raise the budget")
    res = _run(ws, tmp_path / "kept", "--set", "min_keep=2", "--budget", "0.5")
    assert res.exit_code == 0, res.output
    kept = json.loads((tmp_path / "kept" / "report.json").read_text())["kept"]
    assert min(kept["heads"]) >= 2 and min(kept["neurons"]) >= 2
    one_error(_run(ws, tmp_path / "bad", "--set", "min_keep=-1"), "min_keep", "whole number >= 0")


def test_token_only_scores_without_a_reducer_are_refused(ws, scored, tmp_path):
    from safetensors.torch import load_file

    names = [k for k in load_file(str(scored)) if k.startswith("score/")]
    tokens_only = _variant(scored, tmp_path / "tokens.safetensors", drop=names,
                           tensors={"tokens/tokens.0": torch.rand(9), "tokens/tokens.1": torch.rand(9)})
    one_error(_prune_with(ws, tokens_only, tmp_path / "out"), "only token scores", "--reducer")


# --- the documented Zero-TPrune command on a model of another depth (list 6) ---------------------------

def test_zero_tprune_runs_as_documented_on_a_six_block_vit(tmp_path):
    pytest.importorskip("optin_plugins.tasks.images")
    from timm.models.vision_transformer import VisionTransformer

    from optin_plugins.adapters.timm_io import save_timm_folder
    from optin_plugins.tasks.images import fashion_mnist_folder

    try:
        fashion_mnist_folder()
    except optin.OptinError:
        pytest.skip("Fashion-MNIST is not installed")
    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=6, num_heads=2,
                mlp_ratio=2.0)
    torch.manual_seed(0)
    folder = save_timm_folder(VisionTransformer(**args).eval(), tmp_path / "vit6", args, mean=[0.286], std=[0.353])
    out = tmp_path / "out"
    res = invoke("run", "--model", folder, "--task", "fashion-mnist", "--scorer", "wpr", "--reducer", "prune",
                 "--output", out, "--calib-size", "8", "--eval-size", "16", "--batch-size", "16", "--quiet")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["searcher"] == "token-schedule" and report["macs_ratio"] <= 0.6
    removals = report["token_removals"]
    assert len(removals) == 6 and sum(removals) > 0
    assert {i for i, r in enumerate(removals) if r} <= {0, 1, 3, 4, 5}  # the reference pattern scaled to 6 blocks
    assert optin.load_pruned(out / "model").removals == removals
    line = one_error(invoke("run", "--model", folder, "--task", "fashion-mnist", "--scorer", "wpr", "--reducer",
                            "prune", "--output", tmp_path / "out2", "--budget", "0.05", "--calib-size", "8",
                            "--eval-size", "16", "--quiet"), "raise the budget")
    assert "units=true" not in line  # units already default to true: the hint must not suggest them


def test_the_docs_run_yaml_serves_score_too(ws, tmp_path):
    import yaml

    cfg = tmp_path / "run.yaml"  # docs/cli.md's example: budget and eval-size are flags of run/prune only
    cfg.write_text(yaml.safe_dump({"model": str(ws["model"]), "data": str(ws["data"]), "scorer": "trajectory",
                                   "budget": 0.5, "calib-size": 8, "eval-size": 8,
                                   "options": {"neuron_group": 8, "temperature": 4}}))
    res = invoke("score", "--config", cfg, "--output", tmp_path / "scored", "--quiet")
    assert res.exit_code == 0, res.output
    assert optin.Scores.load(tmp_path / "scored" / "scores.safetensors").options["temperature"] == 4
    cfg.write_text("budgett: 0.5\n")
    one_error(invoke("score", "--config", cfg), "unknown key 'budgett'", "budget")


def test_a_text_data_file_given_to_an_image_model(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from optin_plugins.adapters.timm_io import save_timm_folder

    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=2, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2)
    folder = save_timm_folder(VisionTransformer(**args).eval(), tmp_path / "vit", args)
    data = tmp_path / "images.csv"
    data.write_text("text,label\n" + "".join(f"/photos/{i}.png,{'cat' if i % 2 else 'dog'}\n" for i in range(10)))
    one_error(invoke("run", "--model", folder, "--data", data, "--output", tmp_path / "out", *SMALL),
              "task 'images' is text", "takes images", "DIR/<class>/<image>", "columns image,label")


# --- first-time builds of a named model at once (list 7) ---------------------------------------------

def test_two_first_builds_of_a_named_model_build_it_once(optin_cache, monkeypatch):
    import threading
    import time

    from optin_plugins.zoo import minilm
    from optin_plugins.zoo.cache import build_once

    calls = []

    def slow_build(name, target):
        calls.append(name)
        time.sleep(0.3)  # the second builder arrives while this one works
        tmp = minilm.staging(target)
        tmp.mkdir(parents=True)
        (tmp / "weights").write_text(name)
        (tmp / minilm.MARKER).write_text("{}")
        return minilm.publish(tmp, target, minilm.MARKER)

    monkeypatch.setattr(minilm, "_build_into", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(minilm.build("minilm-sms"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["minilm-sms"] and len(set(got)) == 1 and (Path(got[0]) / "weights").read_text() == "minilm-sms"

    def build(tmp):
        calls.append("other")
        time.sleep(0.3)
        tmp.mkdir(parents=True)
        return {"seconds": 0.0}

    threads = [threading.Thread(target=lambda: build_once("other", build)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls.count("other") == 1


def test_token_schedule_options_that_its_schedule_would_ignore_are_refused(ws, tmp_path):
    from optin.registry import create

    with pytest.raises(optin.OptinError, match="only to schedule=layers"):
        create("searcher", "token-schedule", {"schedule": "constant", "pruning_layers": [0, 1]})
    with pytest.raises(optin.OptinError, match="unit_budget applies only"):
        create("searcher", "token-schedule", {"units": False, "unit_budget": 0.8})
    assert create("searcher", "token-schedule", {"schedule": "layers", "pruning_layers": [0, 1],
                                                 "retention": [0.9, 0.8]}).pruning_layers == [0, 1]
