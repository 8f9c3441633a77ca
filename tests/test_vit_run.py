"""End to end on a tiny timm ViT saved in the folder format: run, export, reload (with the token schedule)."""
import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import optin
from optin.recipe import run
from optin.tasks import Task

ARGS = dict(img_size=28, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)


@pytest.fixture
def vit_folder(tmp_path, monkeypatch):
    from optin_plugins.zoo.vit_fmnist import save_timm_folder

    monkeypatch.setattr("optin.measure.throughput",
                        lambda runs, examples, **kw: {k: 1.0 for k in runs})  # timing is for benchmarks
    monkeypatch.setattr("optin.recipe.throughput", lambda runs, examples, **kw: {k: 1.0 for k in runs})
    torch.manual_seed(0)
    return save_timm_folder(VisionTransformer(**ARGS).eval(), tmp_path / "vit", ARGS, architecture="tiny")


@pytest.fixture
def image_task():
    g = torch.Generator().manual_seed(0)
    data = {s: [{"image": torch.randn(1, 28, 28, generator=g), "label": i % 3} for i in range(24)]
            for s in ("train", "test")}
    return Task("tiny-images", "random images", ["a", "b", "c"], lambda split: data[split], kind="image")


@pytest.mark.parametrize("scorer,searcher,reducer,opts", [
    ("trajectory", "ptf", "tome", {"neuron_group": 8}),  # `optin run --reducer tome`: expanded by default
    ("trajectory", "ptf", None, {"neuron_group": 8}),
    ("trajectory", "token-schedule", "tome", {"neuron_group": 8}),  # OPTIN expanded
    ("trajectory", "token-schedule", "tome", {"units": False}),  # tokens only
    ("random", "token-schedule", "random", {"units": False, "schedule": "constant"}),
    ("wpr", "token-schedule", "prune", {"units": False, "schedule": "layers", "pruning_layers": [0, 1, 2],
                                        "retention": [0.9, 0.8, 0.7]}),  # Zero-TPrune
])
def test_vit_run_meets_budget_and_reloads(vit_folder, image_task, tmp_path, scorer, searcher, reducer, opts):
    out = tmp_path / "out"
    report = run(str(vit_folder), task=image_task, scorer=scorer, searcher=searcher, reducer=reducer,
                 budget=0.6, output=out, calib_size=8, eval_size=12, batch_size=6, options=opts)
    assert report["macs_after"] <= 0.6 * report["macs_before"]
    assert report["max_abs_diff_vs_masked"] <= 1e-4
    if reducer:
        assert sum(report["token_removals"]) > 0
    if opts.get("units") is False:
        assert report["params_after"] == report["params_before"]
    else:
        assert report["params_after"] < report["params_before"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["token_removals"] == report["token_removals"]
    reloaded = optin.load_pruned(out / "model")
    assert reloaded.removals == (report["token_removals"] or [0] * 4)
    x = {"pixel_values": torch.stack([e["image"] for e in image_task.examples("test")[:6]])}
    with torch.no_grad():
        first = reloaded.logits(x)
        again = optin.load_pruned(out / "model").logits(x)
    assert torch.allclose(first, again, atol=1e-6)


def test_reducer_with_a_text_model_is_a_clear_error(tmp_path):
    from optin.errors import OptinError
    from optin.recipe import reduce_tokens
    from transformers import BertConfig, BertForSequenceClassification
    from optin_plugins.adapters.bert import BertAdapter

    ad = BertAdapter(BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                              num_attention_heads=2, intermediate_size=8)))
    with pytest.raises(OptinError, match="no tokens"):
        reduce_tokens(ad, "tome", 0.5, 1.0)
