"""Shippable exports: ``optin export --format onnx`` (checked with onnxruntime against PyTorch, refused and
deleted when it does not match or does not trace), ``--format hf`` (a plain Hugging Face folder that
transformers loads without optin, where every layer keeps the same sizes), and ``optin bench --onnx``."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import optin
from conftest import NEGATIVE, POSITIVE, make_batch, save_tiny_bert
from optin.cli import cli
from optin.deploy import export_onnx, onnx_missing
from optin.errors import OptinError
from optin.registry import create
from tiny_models import ADAPTERS, encoder_adapter, images, make_hf_vit, make_vit, mmseg_unavailable, tiny

needs_onnx = pytest.mark.skipif(onnx_missing() is not None, reason=f"ONNX export unavailable: {onnx_missing()}")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def _csv(path: Path) -> Path:
    rng = random.Random(0)
    rows = [f"the movie was {rng.choice(POSITIVE if i % 2 else NEGATIVE)},{'pos' if i % 2 else 'neg'}\n"
            for i in range(40)]
    path.write_text("text,label\n" + "".join(rows))
    return path


def _ort_logits(path: str, batch: dict) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, feeds)[0])


# --- ONNX ------------------------------------------------------------------------------------------------

@needs_onnx
def test_onnx_matches_pytorch_on_other_batches(tmp_path):
    """A CNN's graph gives PyTorch's logits on a batch of another size than the one it was traced with (text:
    other batch sizes and lengths, in the command-line test below)."""
    t = tiny("vgg")
    result = export_onnx(t.adapter, t.batch, tmp_path / "model.onnx")
    assert result.exporter == "dynamo" and result.dynamic and result.max_abs_diff <= 1e-4
    other = {"pixel_values": torch.randn(3, *t.batch["pixel_values"].shape[1:])}
    with torch.no_grad():
        expected = t.adapter.logits(other)
    assert torch.allclose(_ort_logits(result.path, other), expected, atol=1e-4)


ALL_EXPORTS = pytest.mark.skipif(os.environ.get("OPTIN_TEST_ALL_EXPORTS") != "1",
                                 reason="exports of every adapter take about a minute: set OPTIN_TEST_ALL_EXPORTS=1")


@needs_onnx
@pytest.mark.parametrize("reducer", ["tome", pytest.param("prune", marks=ALL_EXPORTS)])
def test_token_reduced_vits_export(reducer, tmp_path):
    """ToMe and Zero-TPrune's pruning trace into one graph with the schedule in it (fixed shapes for ToMe)."""
    ad = make_hf_vit("vit")
    ad.install_reducer(create("reducer", reducer), [10, 5, 5], create("scorer", "wpr") if reducer == "prune" else None)
    batch = images(n=4, channels=1, size=28)
    result = export_onnx(ad, batch, tmp_path / "model.onnx")
    with torch.no_grad():
        expected = ad.logits(batch)
    assert torch.allclose(_ort_logits(result.path, batch), expected, atol=1e-4)


@needs_onnx
def test_a_model_that_does_not_export_is_refused_and_nothing_is_left(tmp_path):
    """The random reducer draws from a generator at run time: no exporter traces it; one message names each
    exporter's failure and no file stays behind."""
    ad = make_vit()
    ad.install_reducer(create("reducer", "random"), [5, 5, 0, 0])
    with pytest.raises(OptinError, match="does not export to ONNX") as err:
        export_onnx(ad, images(n=4, channels=1, size=28), tmp_path / "model.onnx")
    assert "dynamo" in str(err.value) and "TorchScript" in str(err.value)
    assert not list(tmp_path.iterdir())


@needs_onnx
def test_outputs_beyond_the_tolerance_are_refused(tmp_path, monkeypatch):
    import optin.deploy as deploy

    real = deploy._attempts
    monkeypatch.setattr(deploy, "_attempts", lambda inputs, external: real(inputs, external)[:1])
    t = tiny("vgg")
    with pytest.raises(OptinError, match="differ from PyTorch's by"):
        export_onnx(t.adapter, t.batch, tmp_path / "model.onnx", tolerance=0.0)
    assert not (tmp_path / "model.onnx").exists()


@ALL_EXPORTS
@needs_onnx
@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_exports_to_onnx(name, tmp_path):
    if name == "mmseg-mask2former" and mmseg_unavailable():
        pytest.skip(f"mmseg-mask2former unavailable: {mmseg_unavailable()}")
    t = tiny(name)
    result = export_onnx(t.adapter, t.batch, tmp_path / "model.onnx")
    with torch.no_grad():
        expected = t.adapter.logits(t.batch)
    assert torch.allclose(_ort_logits(result.path, t.batch), expected, atol=1e-4)


@pytest.fixture(scope="module")
def pruned_bert(tmp_path_factory) -> dict:
    """A tiny BERT folder, a CSV, and that BERT pruned by `optin run` (its plan records the CSV, not a task)."""
    root = tmp_path_factory.mktemp("export")
    model, data = save_tiny_bert(root / "bert"), _csv(root / "data.csv")
    res = invoke("run", "--model", model, "--data", data, "--scorer", "magnitude", "--budget", "0.6", "--output",
                 root / "out", "--calib-size", "8", "--eval-size", "8", "--quiet")
    assert res.exit_code == 0, res.output
    return {"model": model, "data": data, "pruned": root / "out" / "model"}


@needs_onnx
def test_optin_export_onnx_through_the_cli(pruned_bert, tmp_path, cli_sandbox):
    out = tmp_path / "bert.onnx"
    res = invoke("export", "--model", pruned_bert["pruned"], "--format", "onnx", "--output", out,
                 "--data", pruned_bert["data"], "--batch-size", "4")
    assert res.exit_code == 0, res.output
    assert "dynamo exporter" in res.output and out.is_file()
    pruned = optin.load_model(str(pruned_bert["pruned"]))
    batch = pruned.collate([{"text": "the movie was very good and the plot was great fun"}, {"text": "bad"}])
    assert batch["input_ids"].shape[1] > 6  # longer than the sample sentences the graph was traced with
    with torch.no_grad():
        expected = pruned.logits(batch)
    assert torch.allclose(_ort_logits(str(out), batch), expected, atol=1e-4)
    again = invoke("export", "--model", pruned_bert["pruned"], "--output", out, "--data", pruned_bert["data"])
    assert "exists" in one_line(again) and "--overwrite" in one_line(again)
    no_data = invoke("export", "--model", pruned_bert["pruned"], "--output", tmp_path / "x.onnx", "--overwrite")
    assert "--task NAME or --data FILE" in one_line(no_data)
    for fmt, where, says in (("onnx", tmp_path, "is a folder"),
                             ("hf", pruned_bert["pruned"].parent, "would replace the model being exported")):
        res = invoke("export", "--model", pruned_bert["pruned"], "--format", fmt, "--output", where, "--overwrite",
                     "--data", pruned_bert["data"])
        assert says in one_line(res)
    assert (pruned_bert["pruned"] / "optin-plan.json").is_file()


def test_onnx_without_its_packages_is_one_line(pruned_bert, tmp_path, cli_sandbox, monkeypatch):
    import optin.deploy as deploy

    monkeypatch.setattr(deploy, "onnx_missing", lambda: "onnxruntime is not installed: pip install 'optin[onnx]'")
    for args in (["export", "--model", pruned_bert["pruned"], "--output", tmp_path / "m.onnx"],
                 ["bench", "--model", pruned_bert["model"], "--compare", pruned_bert["pruned"], "--data",
                  pruned_bert["data"], "--onnx"]):
        assert "pip install 'optin[onnx]'" in one_line(invoke(*args))


@needs_onnx
def test_bench_compares_pytorch_and_onnxruntime(pruned_bert, cli_sandbox, monkeypatch):
    from optin.measure import throughput

    monkeypatch.setattr("optin.measure.throughput",
                        lambda runs, examples, **kw: throughput(runs, examples, warmup=0, repeats=1))
    args = ["bench", "--model", pruned_bert["model"], "--compare", pruned_bert["pruned"], "--data",
            pruned_bert["data"], "--batch-size", "4", "--onnx", "--json"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert {(r["model"], r["runtime"]) for r in rows} == {(str(m), rt) for m in (pruned_bert["model"],
                                                                                  pruned_bert["pruned"])
                                                          for rt in ("pytorch", "onnxruntime")}
    assert all(r["examples_per_s"] > 0 for r in rows)
    cached = [Path(m) / "model.onnx" for m in (pruned_bert["model"], pruned_bert["pruned"])]
    assert all(p.is_file() for p in cached)  # cached next to each model
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert invoke(*args).exit_code == 0
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # the second bench reuses them
    assert "float32" in one_line(invoke(*args, "--dtype", "bfloat16"))


# --- plain Hugging Face folders ------------------------------------------------------------------------

LOAD_WITHOUT_OPTIN = r"""
import sys
sys.modules["optin"] = sys.modules["optin_plugins"] = None  # importing optin now fails
import torch, transformers
from safetensors.torch import load_file, save_file
for folder in sys.argv[1:]:
    config = transformers.AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()
    transformers.AutoModel.from_pretrained(folder)
    with torch.no_grad():
        logits = model(**load_file(folder + "/inputs.safetensors")).logits
    save_file({"logits": logits.contiguous()}, folder + "/logits.safetensors")
"""


def _uniform(ad, heads: int, neurons: int):
    counts = ad.unit_counts()
    ad.prune({"heads": [(torch.arange(n) < heads).float() for n in counts["heads"]],
              "neurons": [(torch.arange(n) >= n - neurons).float() for n in counts["neurons"]]})
    return ad


# (model, heads kept, neurons kept, inputs the HF model takes): BERT derives its head size from the hidden size,
# so only its neurons are pruned; ViT and DINOv2 state it (head_dim), so their heads are pruned too.
HF_CASES = {"bert": (4, 40, ("input_ids", "attention_mask", "token_type_ids")),
            "distilbert": (4, 40, ("input_ids", "attention_mask")),
            "deberta-v2": (4, 40, ("input_ids", "attention_mask", "token_type_ids")),
            "vit": (3, 48, ("pixel_values",)), "dinov2": (3, 32, ("pixel_values",))}


@pytest.fixture(scope="module")
def hf_exports(tmp_path_factory) -> dict:
    """Each case pruned to the same sizes in every layer, saved by optin, exported with `optin export --format hf`,
    then loaded by transformers in one subprocess that cannot import optin: {case: (its logits, optin's)}."""
    from safetensors.torch import load_file, save_file

    from conftest import make_tiny_bert, make_tokenizer
    from optin_plugins.adapters.bert import BertAdapter

    root = tmp_path_factory.mktemp("hf")
    data = _csv(root / "d.csv")
    expected, folders = {}, []
    for case, (heads, neurons, keys) in HF_CASES.items():
        vision = case in ("vit", "dinov2")
        ad = make_hf_vit(case, num_labels=10) if vision else \
            BertAdapter(make_tiny_bert()) if case == "bert" else encoder_adapter(case)
        if not vision:
            ad.processor = make_tokenizer(root / "tokenizer")
        _uniform(ad, heads, neurons)
        optin.save_pruned(ad, root / case)
        res = invoke("export", "--model", root / case, "--format", "hf", "--output", root / f"{case}-hf",
                     *(["--task", "fashion-mnist"] if vision else ["--data", data]))
        assert res.exit_code == 0, res.output
        batch = images(n=3, channels=1, size=28) if vision else make_batch()
        with torch.no_grad():
            expected[case] = ad.logits(batch)
        save_file({k: batch[k].contiguous() for k in keys}, str(root / f"{case}-hf" / "inputs.safetensors"))
        folders.append(str(root / f"{case}-hf"))
    env = {**os.environ, "PYTHONPATH": "", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_OPTIN, *folders], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {case: (load_file(str(root / f"{case}-hf" / "logits.safetensors"))["logits"], expected[case],
                   json.loads((root / f"{case}-hf" / "config.json").read_text())) for case in HF_CASES}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_folder_loads_without_optin_with_the_same_logits(case, hf_exports):
    got, expected, config = hf_exports[case]
    assert torch.allclose(got, expected, atol=1e-5)
    heads, neurons, _ = HF_CASES[case]
    assert config[{"distilbert": "n_heads"}.get(case, "num_attention_heads")] == heads
    if case == "dinov2":
        assert config["mlp_ratio"] == 1 and config["head_dim"] == 8
    else:
        assert config[{"distilbert": "hidden_dim"}.get(case, "intermediate_size")] == neurons


def test_hf_format_refusals_say_why(tmp_path, cli_sandbox):
    """Layers of different sizes, a head size the config derives, a token schedule."""
    from conftest import make_tiny_bert, make_tokenizer
    from optin_plugins.adapters.bert import BertAdapter

    cases = {
        "uneven": _uniform(BertAdapter(make_tiny_bert()), 4, 40),
        "bert-heads": _uniform(BertAdapter(make_tiny_bert()), 3, 40),
        "deberta-heads": _uniform(encoder_adapter("deberta-v2"), 2, 40),
        "tokens": make_hf_vit("vit", num_labels=10),
    }
    cases["uneven"].prune({"neurons": [torch.ones(40), (torch.arange(40) < 30).float(), torch.ones(40)]})
    cases["tokens"].install_reducer(create("reducer", "tome"), [4, 4, 4])
    expected = {"uneven": "keep different numbers of neurons ([40, 30, 40])",
                "bert-heads": "hidden size / heads = 32 / 3",
                "deberta-heads": "hidden size / heads = 32 / 2",
                "tokens": "token reducer"}
    data = _csv(tmp_path / "d.csv")
    earlier = tmp_path / "uneven-hf" / "config.json"  # an earlier export: --overwrite replaces it only on success
    earlier.parent.mkdir()
    earlier.write_text("{}")
    for name, ad in cases.items():
        if name != "tokens":
            ad.processor = make_tokenizer(tmp_path / "tokenizer")
        optin.save_pruned(ad, tmp_path / name)
        source = ["--task", "fashion-mnist"] if name == "tokens" else ["--data", data]
        line = one_line(invoke("export", "--model", tmp_path / name, "--format", "hf", "--output",
                               tmp_path / f"{name}-hf", "--overwrite", *source))
        assert expected[name] in line and "--format onnx" in line, line
        assert (tmp_path / f"{name}-hf").exists() == (name == "uneven")
    assert earlier.read_text() == "{}"
