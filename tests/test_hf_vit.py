"""HF transformers ViT / DeiT classifiers: heads and neurons, exact restart, MACs, removal, reload."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

import optin
from optin.recipe import score, search
from optin_plugins.adapters.hf_vit import HFVitAdapter

KW = dict(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
          intermediate_size=64, num_labels=5)


def make(kind: str) -> HFVitAdapter:
    torch.manual_seed(0)
    if kind == "vit":
        cfg = ViTConfig(**KW)
        cfg._attn_implementation = "eager"
        return HFVitAdapter(ViTForImageClassification(cfg).eval())
    cfg = DeiTConfig(**KW)
    cfg._attn_implementation = "eager"
    return HFVitAdapter(DeiTForImageClassificationWithTeacher(cfg).eval())


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(5, 1, 28, 28, generator=g), "labels": torch.randint(0, 5, (5,), generator=g)}


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_found_by_the_registry_and_counts(kind):
    ad = make(kind)
    assert optin.models.adapter_for(ad.model) is HFVitAdapter
    assert ad.unit_counts() == {"heads": [4] * 3, "neurons": [64] * 3}
    assert ad.protected == (1 if kind == "vit" else 2) and ad.n_tokens == 49 + ad.protected


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_macs_match_flop_counter(kind, images):
    ad = make(kind)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ad.logits({"pixel_values": images["pixel_values"][:1]})
    assert fc.get_total_flops() / 2 == pytest.approx(ad.cost_model().macs())


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_run_from_matches_full_masked_forward(kind, images):
    ad = make(kind)
    tr = ad.trace(images)
    for unit, n in (("heads", 4), ("neurons", 64)):
        masks = torch.ones(2, n)
        masks[1, :3] = 0
        emb, lg = ad.run_from(tr, unit, 1, masks, images)
        with torch.no_grad(), ad.masked({unit: [None, masks[1], None]}):
            ref = ad.logits(images)
        assert torch.allclose(lg.reshape(2, 5, -1)[0], tr.logits, atol=1e-5)
        assert torch.allclose(lg.reshape(2, 5, -1)[1], ref, atol=1e-5)
        assert torch.allclose(emb[2].reshape(2, 5, *emb[2].shape[1:])[0], tr.embeddings[2], atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_pruned_equals_masked_and_reloads(kind, images, tmp_path):
    ad = make(kind)
    scores = score(ad, [images], "trajectory", {"neuron_group": 8})
    masks, costs = search(ad, scores, 0.6, ad.seq_len([images]))
    masks["heads"][0][:] = 0  # also a block without any head
    with torch.no_grad(), ad.masked(masks):
        expected = ad.logits(images)
    before = sum(p.numel() for p in ad.model.parameters())
    ad.prune(masks)
    with torch.no_grad():
        got = ad.logits(images)
    assert torch.allclose(got, expected, atol=1e-4)
    assert sum(p.numel() for p in ad.model.parameters()) < before
    assert ad.cost_model().macs() <= 0.6 * costs.macs()
    optin.save_pruned(ad, tmp_path / "m")
    again = optin.load_pruned(tmp_path / "m")
    assert isinstance(again, HFVitAdapter) and again.unit_counts() == ad.unit_counts()
    with torch.no_grad():
        assert torch.allclose(again.logits(images), got, atol=1e-6)
