"""Swin classifiers (timm ``swin``, HF ``hf-swin``): heads + neurons, exact restart, MACs, removal, reload."""
import json

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from torch.utils.flop_counter import FlopCounterMode
from transformers import SwinConfig, SwinForImageClassification

import optin
from optin.errors import OptinError
from optin.recipe import prune
from optin_plugins.adapters import swin_blocks as sb
from optin_plugins.adapters.hf_swin import HFSwinAdapter
from optin_plugins.adapters.swin import SwinAdapter
from optin_plugins.zoo.vit_fmnist import save_timm_folder

# 32 px: 8x8 then 4x4 maps, windows fit exactly; 48 px: the 6x6 stage is padded to 8x8 for its windows.
SIZES = {32: (2, 2), 48: (2, 2)}


def timm_args(img: int) -> dict:
    return dict(img_size=img, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depths=SIZES[img],
                num_heads=(2, 4), window_size=4, mlp_ratio=2.0, drop_path_rate=0.0)


def make(kind: str, img: int = 32):
    torch.manual_seed(0)
    if kind == "timm":
        args = timm_args(img)
        model = SwinTransformer(**args).eval()
        for m in model.modules():  # unfused attention, so that FlopCounterMode sees the matmuls on CPU
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        return SwinAdapter(model, {"timm_class": "SwinTransformer", "model_args": args})
    cfg = SwinConfig(image_size=img, patch_size=4, num_channels=3, embed_dim=32, depths=list(SIZES[img]),
                     num_heads=[2, 4], window_size=4, mlp_ratio=2.0, num_labels=5)
    cfg._attn_implementation = "eager"
    model = SwinForImageClassification(cfg).eval()
    with torch.no_grad():  # HF initialises the relative position bias to 0: make its per-head slicing matter
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
    return HFSwinAdapter(model)


def images(img: int = 32, n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, img, img, generator=g), "labels": torch.randint(0, 5, (n,), generator=g)}


def flop_macs(ad, img: int) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ad.logits({"pixel_values": torch.randn(1, 3, img, img)})
    return fc.get_total_flops() / 2


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


@pytest.mark.parametrize("img", [32, 48])
@pytest.mark.parametrize("kind", KINDS)
def test_macs_match_flop_counter(kind, img):
    ad = make(kind, img)
    assert ad.cost_model().macs() == pytest.approx(flop_macs(ad, img))


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
def test_pruned_equals_masked_and_counts_its_macs(kind, img):
    ad, batch = make(kind, img), images(img)
    masks = random_masks(ad)
    with torch.no_grad(), ad.masked(masks):
        expected = ad.logits(batch)
    predicted = ad.cost_model().macs_of_masks(masks)
    before = sum(p.numel() for p in ad.model.parameters())
    ad.prune(masks)
    with torch.no_grad():
        got = ad.logits(batch)
    assert torch.allclose(got, expected, atol=1e-4)
    assert sum(p.numel() for p in ad.model.parameters()) < before
    assert ad.unit_counts()["heads"][1] == 0
    assert ad.cost_model().macs() == pytest.approx(predicted)
    assert ad.cost_model().macs() == pytest.approx(flop_macs(ad, img))
    with torch.no_grad(), ad.masked({k: [torch.ones(n) for n in ns] for k, ns in ad.unit_counts().items()}):
        assert torch.allclose(ad.logits(batch), got, atol=1e-6)  # masks still fit the pruned (and empty) blocks


@pytest.mark.parametrize("scorer", ["trajectory", "fisher"])
@pytest.mark.parametrize("kind", KINDS)
def test_recipe_prune_meets_budget_and_reloads(kind, scorer, tmp_path):
    ad, batch = make(kind), images()
    res = prune(ad, [batch], scorer=scorer, budget=0.6, options={"neuron_group": 16} if scorer == "trajectory" else {})
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
    with pytest.raises(OptinError, match="model.safetensors is missing"):
        SwinAdapter.load(str(tmp_path / "x"))
