"""Token reduction on HF vision transformers (``hf-vit``: ViT, DeiT, DINOv2), with the timm adapter's shared
machinery: a schedule of zeros is the original model, reducers keep the scheduled counts, MACs equal
FlopCounterMode with a reducer installed, the schedule travels with the export, token trajectories restart
exactly, and ``optin run --reducer tome`` runs end to end on an HF ViT folder."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import optin
from optin.cli import cli
from optin.recipe import _token_importance, reduce_tokens, score
from optin.registry import create
from tiny_models import images, make_hf_vit, make_vit

KINDS = ["vit", "deit", "dinov2"]


@pytest.fixture
def batch():
    return images(n=6, channels=1, size=28)


def logits(ad, batch):
    with torch.no_grad():
        return ad.logits(batch)


def _reducer(name):
    return create("reducer", name), (create("scorer", "wpr") if name == "prune" else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tome", "random", "prune"])
def test_a_schedule_of_zeros_is_the_original_model(kind, name, batch):
    ad = make_hf_vit(kind)
    ref = logits(ad, batch)
    reducer, scorer = _reducer(name)
    ad.install_reducer(reducer, [0, 0, 0], scorer)
    assert torch.allclose(logits(ad, batch), ref, atol=1e-5)
    ad.remove_reducer()
    assert torch.equal(logits(ad, batch), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["tome", "random", "prune"])
def test_reducers_keep_exactly_the_scheduled_counts(kind, name, batch):
    ad = make_hf_vit(kind)
    reducer, scorer = _reducer(name)
    ad.install_reducer(reducer, [10, 25, 5], scorer)  # 25 > one bipartite merge can remove: the merge repeats
    seen = []
    hooks = [layer.mlp.fc1.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1])) for layer in ad.layers]
    out = logits(ad, batch)
    for h in hooks:
        h.remove()
    n = ad.n_tokens
    assert seen == ad.token_counts()[1] == [n - 10, n - 35, n - 40]
    assert out.shape == (6, 5) and torch.isfinite(out).all()


def _explicit_sdpa(q, k, v, attn_mask=None, scale=None, **kw):
    """Attention as plain matmuls, so that FlopCounterMode sees them (it misses fused SDPA on CPU)."""
    logits = (q * scale) @ k.transpose(-2, -1)
    return (logits if attn_mask is None else logits + attn_mask).softmax(-1) @ v


@pytest.mark.parametrize("adapter", ["hf-vit", "hf-dinov2", "vit"])
def test_macs_equal_flop_counter_with_a_reducer_installed(adapter, batch, monkeypatch):
    """The same token accounting on the HF and timm adapters (the random reducer does no matmul of its own)."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _explicit_sdpa)
    ad = {"hf-vit": lambda: make_hf_vit("vit"), "hf-dinov2": lambda: make_hf_vit("dinov2"),
          "vit": lambda: make_vit(fused=False)}[adapter]()
    removals = [7, 12, 3] + [0] * (len(ad.blocks) - 3)
    ad.install_reducer(create("reducer", "random"), removals)
    with FlopCounterMode(display=False) as fc:
        logits(ad, {"pixel_values": batch["pixel_values"][:1]})
    assert fc.get_total_flops() / 2 == pytest.approx(ad.cost_model().macs(), rel=1e-9)
    assert ad.cost_model().macs() == pytest.approx(ad.cost_model(removals=removals).macs())
    assert ad.cost_model().macs() < ad.cost_model(removals=[0] * len(removals)).macs()


@pytest.mark.parametrize("kind", KINDS)
def test_the_schedule_travels_with_the_export(kind, batch, tmp_path):
    ad = make_hf_vit(kind)
    ad.prune({"heads": [torch.tensor([1.0, 0, 1, 1]), torch.ones(4), torch.ones(4)]})
    ad.install_reducer(create("reducer", "tome"), [8, 8, 4])
    expected = logits(ad, batch)
    optin.save_pruned(ad, tmp_path / "model")
    again = optin.load_pruned(tmp_path / "model")
    assert again.removals == ad.removals == [8, 8, 4]
    assert again.reducer_spec["reducer"] == "tome" and again.unit_counts() == ad.unit_counts()
    assert torch.allclose(logits(again, batch), expected, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_token_trajectory_restarts_exactly(kind, batch):
    ad = make_hf_vit(kind)
    tr = ad.trace(batch)
    masks = torch.ones(2, ad.token_units())
    masks[0, :20] = 0
    emb, lg = ad.run_from(tr, "tokens", 1, masks, batch)
    assert torch.allclose(lg.reshape(2, 6, -1)[1], tr.logits, atol=1e-5)  # all-ones masks: the unmasked model
    assert torch.allclose(emb[2].reshape(2, 6, ad.n_tokens, -1)[1], tr.embeddings[2], atol=1e-5)
    assert not torch.allclose(lg.reshape(2, 6, -1)[0], tr.logits, atol=1e-4)  # removing 20 tokens matters
    kept = emb[2].reshape(2, 6, ad.n_tokens, -1)[0]
    gone = torch.zeros(ad.n_tokens, dtype=torch.bool)
    gone[ad.protected:ad.protected + 20] = True
    assert torch.equal(kept[:, gone], tr.embeddings[2][:, gone])  # removed positions carry the reference


def test_searched_token_schedules_meet_the_budget(batch):
    ad = make_hf_vit("vit")
    scores = score(ad, [batch], "trajectory", {"tokens": True, "kinds": []})
    base = ad.cost_model().macs()
    removals = reduce_tokens(ad, "tome", 0.7, base, token_importance=_token_importance(scores),
                             options={"schedule": "trajectory", "units": False})
    counts = ad.token_counts(removals)[1]
    assert sum(removals) > 0 and all(a >= b for a, b in zip(counts, counts[1:]))
    assert ad.cost_model(removals=removals).macs() <= 0.7 * base
    with pytest.raises(optin.errors.OptinError, match="without token reduction"):
        ad.trace(batch)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_optin_run_with_tome_on_an_hf_folder(kind, tmp_path, cli_sandbox):
    folder, out = tmp_path / kind, tmp_path / "out"
    make_hf_vit(kind, num_labels=10).model.save_pretrained(folder)
    res = CliRunner().invoke(cli, ["run", "--model", str(folder), "--task", "fashion-mnist", "--reducer", "tome",
                                   "--set", "neuron_group=16", "--set", "rows=16", "--budget", "0.6", "--output",
                                   str(out), "--calib-size", "8", "--eval-size", "16", "--batch-size", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["adapter"] == "hf-vit" and report["reducer"] == "tome"
    assert sum(report["token_removals"]) > 0 and report["macs_after"] <= 0.6 * report["macs_before"]
    reloaded = optin.load_model(str(out / "model"))
    assert reloaded.removals == report["token_removals"] and reloaded.reducer_spec["reducer"] == "tome"
