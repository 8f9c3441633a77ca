"""Swin classifiers (timm ``swin``, HF ``hf-swin``): heads + neurons, exact restart, MACs, removal, reload."""
import json

import pytest
import torch
from transformers import SwinConfig, SwinForImageClassification

import optin
from optin.errors import OptinError
from optin.recipe import prune
from optin.testing import check_adapter
from optin.testing import flop_macs as _flop_macs
from optin_plugins.adapters import swin_blocks as sb
from optin_plugins.adapters.hf_swin import HFSwinAdapter
from optin_plugins.adapters.swin import SwinAdapter
from optin_plugins.zoo.vit_fmnist import save_timm_folder
from tiny_models import images as _images
from tiny_models import make_swin as make


def images(img: int = 32) -> dict:
    return _images(size=img)


def flop_macs(ad, img: int) -> float:
    return _flop_macs(ad, images(img))


def random_masks(ad, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    masks = {k: [(torch.rand(n, generator=g) > 0.4).float() for n in ns] for k, ns in ad.unit_counts().items()}
    masks["heads"][1][:] = 0  # a block without any head (the shifted-window block of stage 0)
    masks["heads"][2][0] = 1
    return masks


KINDS = ["timm", "hf"]


def test_block_macs_formula():
    head, neuron = sb.window_block_macs(6, 6, 64, 16, 4)  # padded to 8x8 = 64 tokens in 16-token windows
    assert head == 4 * 64 * 64 * 16 + 2 * 64 * 16 * 16 and neuron == 2 * 36 * 64


@pytest.mark.parametrize("kind", KINDS)
def test_found_by_the_registry_and_counts(kind):
    ad = make(kind)
    assert optin.models.adapter_for(ad.model) is type(ad)
    assert ad.unit_counts() == {"heads": [2, 2, 4, 4], "neurons": [64, 64, 128, 128]}


def test_hf_blocks_listing():
    ad = make("hf", 48)
    got = [(i.stage, i.index, i.resolution, i.window, i.shift) for i in sb.hf_swin_blocks(ad.swin.encoder, (12, 12))]
    assert got == [(0, 0, (12, 12), 4, 0), (0, 1, (12, 12), 4, 2), (1, 0, (6, 6), 4, 0), (1, 1, (6, 6), 4, 2)]


@pytest.mark.parametrize("kind", KINDS)
def test_run_from_matches_full_masked_forward(kind):
    ad, batch = make(kind, 48), images(48)
    tr = ad.trace(batch)
    assert [tuple(e.shape) for e in tr.embeddings] == [(4, 144, 32)] * 2 + [(4, 36, 64)] * 2
    n_layers = len(tr.embeddings)
    for unit in ("heads", "neurons"):
        for layer in (1, 2):  # a shifted-window block, and the first block after a patch merging
            n = ad.unit_counts()[unit][layer]
            masks = torch.ones(2, n)
            masks[1, :1] = 0
            emb, lg = ad.run_from(tr, unit, layer, masks, batch)
            per_layer = [None] * n_layers
            per_layer[layer] = masks[1]
            with torch.no_grad(), ad.masked({unit: per_layer}):
                ref = ad.logits(batch)
            lg = lg.reshape(2, 4, -1)
            assert torch.allclose(lg[0], tr.logits, atol=1e-5)
            assert torch.allclose(lg[1], ref, atol=1e-5)
            assert (lg[1] - tr.logits).abs().max() > 1e-6  # the mask did change something
            for z in range(layer, n_layers):
                assert torch.allclose(emb[z].reshape(2, *tr.embeddings[z].shape)[0], tr.embeddings[z], atol=1e-5)


@pytest.mark.parametrize("img", [32, 48])
@pytest.mark.parametrize("kind", KINDS)
def test_conforms_with_exact_macs(kind, img):
    """optin.testing.check_adapter with a shifted-window block losing every head: masked == removed, analytic
    MACs == FlopCounterMode before and after removal (48 px: on padded windows), export + reload, restart."""
    result = check_adapter(make(kind, img), images(img), count_macs=lambda ad: flop_macs(ad, img),
                           masks=random_masks(make(kind, img)))
    assert result["pruned_counts"]["heads"][1] == 0
    assert result["reloaded"].kept_index == result["pruned"].kept_index


@pytest.mark.parametrize("scorer", ["trajectory", "fisher"])
@pytest.mark.parametrize("kind", KINDS)
def test_recipe_prune_meets_budget_and_reloads(kind, scorer, tmp_path):
    ad, batch = make(kind), images()
    res = prune(ad, [batch], scorer=scorer, budget=0.6, options={"neuron_group": 16} if scorer == "trajectory" else {},
                allow_degenerate=True)  # the tiny Swin may lose a whole block: removal must still equal masking
    assert res.macs_after <= 0.6 * res.macs_before
    assert ad.cost_model().macs() == pytest.approx(res.macs_after)
    with torch.no_grad():
        got = ad.logits(batch)
    optin.save_pruned(ad, tmp_path / "m")
    again = optin.load_pruned(tmp_path / "m")
    assert type(again) is type(ad) and again.unit_counts() == ad.unit_counts()
    assert again.kept_index == ad.kept_index
    with torch.no_grad():
        assert torch.allclose(again.logits(batch), got, atol=1e-6)


def test_load_folders(tmp_path):
    timm_ad = make("timm")
    save_timm_folder(timm_ad.model, tmp_path / "t", timm_ad.processor["model_args"])
    loaded = optin.models.load_model(str(tmp_path / "t"))
    assert isinstance(loaded, SwinAdapter)
    hf_ad = make("hf")
    hf_ad.model.save_pretrained(tmp_path / "h")
    loaded_hf = optin.models.load_model(str(tmp_path / "h"))
    assert isinstance(loaded_hf, HFSwinAdapter)
    batch = images()
    with torch.no_grad():
        assert torch.allclose(loaded.logits(batch), timm_ad.logits(batch), atol=1e-6)
        assert torch.allclose(loaded_hf.logits(batch), hf_ad.logits(batch), atol=1e-5)


def test_clear_errors(tmp_path):
    with pytest.raises(OptinError, match="not a timm SwinTransformer"):
        SwinAdapter(torch.nn.Linear(2, 2))
    with pytest.raises(OptinError, match="not an HF Swin classifier"):
        HFSwinAdapter(torch.nn.Linear(2, 2))
    for kind in KINDS:
        with pytest.raises(OptinError, match="no unit kind 'channels'"):
            with make(kind).masked({"channels": [torch.ones(2)]}):
                pass
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=4)
    with pytest.raises(OptinError, match="smaller than the window 4"):
        HFSwinAdapter(SwinForImageClassification(cfg))
    bare = SwinAdapter(make("timm").model)  # no timm config: cannot be rebuilt from an export
    optin.save_pruned(bare, tmp_path / "bare")
    with pytest.raises(OptinError, match="without its timm config"):
        optin.load_pruned(tmp_path / "bare")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({"timm_class": "SwinTransformer", "model_args": {}}))
    with pytest.raises(OptinError, match="neither model.safetensors nor pytorch_model.bin"):
        SwinAdapter.load(str(tmp_path / "x"))
