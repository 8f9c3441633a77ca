"""HF Mask2Former (Swin backbone): units, exact restart, MACs vs FlopCounterMode, removal, reload, errors."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

import optin
from optin.errors import OptinError
from optin.recipe import prune
from optin_plugins.adapters.mask2former import Mask2FormerAdapter

SIZE = 32
SWIN = dict(image_size=SIZE, patch_size=4, num_channels=1, embed_dim=16, depths=[2, 1, 2], num_heads=[1, 2, 2],
            window_size=2, mlp_ratio=4.0, out_features=["stage1", "stage2", "stage3"])
M2F = dict(feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, encoder_layers=1,
           decoder_layers=3, num_attention_heads=2, dim_feedforward=64, num_queries=8, num_labels=5,
           feature_strides=[4, 8, 16], train_num_points=256)


def make(decoder_neurons: bool = False, seed: int = 0) -> Mask2FormerAdapter:
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=SwinConfig(**SWIN), **M2F)).eval()
    return Mask2FormerAdapter(model, decoder_neurons=decoder_neurons)


def shapes(n: int = 4, seed: int = 1) -> list[dict]:
    """Stand-in segmentation examples: random rectangles of classes 1-4 on background 0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.zeros(SIZE, SIZE, dtype=torch.long)
        for c in torch.randint(1, 5, (2,), generator=g).tolist():
            t, l = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
            mask[t:t + 8 + c, l:l + 10] = c
        image = (mask.float() / 4 + 0.1 * torch.randn(SIZE, SIZE, generator=g)).unsqueeze(0)
        out.append({"image": image, "mask": mask})
    return out


@pytest.fixture
def batch():
    return make().collate(shapes())


def flop_macs(ad: Mask2FormerAdapter, batch: dict) -> float:
    cfg = ad.backbone.config
    cfg._attn_implementation = "eager"
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ad.logits({"pixel_values": batch["pixel_values"][:1]})
    finally:
        cfg._attn_implementation = "sdpa"
    return fc.get_total_flops() / 2


def test_registry_counts_and_output(batch):
    ad = make(decoder_neurons=True)
    assert optin.models.adapter_for(ad.model) is Mask2FormerAdapter and ad.output == "segmentation"
    assert ad.unit_counts() == {"neurons": [64, 64, 128, 256, 256, 0, 0], "decoder_neurons": [0] * 5 + [64, 64]}
    with torch.no_grad():
        logp = ad.logits(batch)
    assert logp.shape == (4, 5, SIZE, SIZE)
    assert torch.allclose(logp.exp().sum(1), torch.ones(4, SIZE, SIZE), atol=1e-4)
    assert batch["masks"].shape == (4, SIZE, SIZE)
    assert torch.isfinite(ad.loss(batch))


def test_macs_match_flop_counter_and_window_attention(batch):
    ad = make(decoder_neurons=True)
    assert ad.cost_model().macs() == pytest.approx(flop_macs(ad, batch))
    cfg = ad.backbone.config
    cfg._attn_implementation = "eager"
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ad.backbone(batch["pixel_values"][:1])
    cfg._attn_implementation = "sdpa"
    assert ad.backbone_macs()["total"] == pytest.approx(fc.get_total_flops() / 2)
    assert ad.cost_model().notes["backbone_attention_macs"] > 0


def test_run_from_matches_masked_forward(batch):
    ad = make(decoder_neurons=True)
    tr = ad.trace(batch)
    assert [tuple(e.shape[1:]) for e in tr.embeddings] == [(64, 16), (64, 16), (16, 32), (4, 64), (4, 64),
                                                            (8, 32), (8, 32)]
    counts = ad.unit_counts()
    for kind, layer in (("neurons", 0), ("neurons", 1), ("neurons", 3), ("decoder_neurons", 6)):
        n = counts[kind][layer]
        masks = torch.ones(2, n)
        masks[1, :3] = 0
        emb, lg = ad.run_from(tr, kind, layer, masks, batch)
        assert sorted(emb) == list(range(layer, 7))
        one = {k: [None] * 7 for k in counts}
        one[kind][layer] = masks[1]
        with torch.no_grad(), ad.masked(one):
            ref = ad.logits(batch)
        lg = lg.reshape(2, *tr.logits.shape)
        assert torch.allclose(lg[0], tr.logits, atol=1e-4)  # a mask of ones reproduces the trace
        assert torch.allclose(lg[1], ref, atol=1e-4)
        assert not torch.allclose(lg[1], tr.logits, atol=1e-6)
        for z in emb:
            e = emb[z].reshape(2, *tr.embeddings[z].shape)
            assert torch.allclose(e[0], tr.embeddings[z], atol=1e-4)


@pytest.mark.parametrize("scorer", ["trajectory", "magnitude"])
def test_prune_budget_equals_masked_and_reloads(scorer, batch, tmp_path):
    ad = make(decoder_neurons=scorer == "trajectory")
    reference = make(decoder_neurons=scorer == "trajectory")
    before_macs = ad.cost_model().macs()
    before = sum(p.numel() for p in ad.model.parameters())
    res = prune(ad, [batch], scorer=scorer, budget=0.8, options={"neuron_group": 16} if scorer == "trajectory" else None)
    with torch.no_grad(), reference.masked(res.masks):
        expected = reference.logits(batch)
        got = ad.logits(batch)
    assert torch.allclose(got, expected, atol=1e-4)
    assert sum(p.numel() for p in ad.model.parameters()) < before
    assert ad.cost_model().macs() <= 0.8 * before_macs * (1 + 1e-9)
    assert ad.cost_model().macs() == pytest.approx(flop_macs(ad, batch))  # the analytic count still holds
    optin.save_pruned(ad, tmp_path / "m")
    again = optin.load_pruned(tmp_path / "m")
    assert isinstance(again, Mask2FormerAdapter) and again.unit_counts() == ad.unit_counts()
    assert again.image_size == (SIZE, SIZE) and again.kept_index == ad.kept_index
    with torch.no_grad():
        assert torch.allclose(again.logits(batch), got, atol=1e-6)


def test_a_layer_without_neurons(batch):
    ad, reference = make(), make()
    masks = {"neurons": [torch.ones(n) for n in ad.unit_counts()["neurons"]]}
    masks["neurons"][1][:] = 0
    masks["neurons"][4][5:] = 0
    with torch.no_grad(), reference.masked(masks):
        expected = reference.logits(batch)
    ad.prune(masks)
    with torch.no_grad():
        assert torch.allclose(ad.logits(batch), expected, atol=1e-4)
    assert ad.unit_counts()["neurons"][1] == 0


def test_clear_errors(batch):
    with pytest.raises(OptinError, match="Swin backbone"):
        Mask2FormerAdapter(torch.nn.Linear(2, 2))
    ad = make()
    with pytest.raises(OptinError, match="segmentation"):
        ad.collate([{"image": torch.zeros(1, SIZE, SIZE), "label": 3}])
    with pytest.raises(OptinError, match="channels"):
        ad.logits({"pixel_values": torch.zeros(1, 3, SIZE, SIZE)})
    with pytest.raises(OptinError, match="decoder_neurons=True"):
        ad.masked({"decoder_neurons": [torch.ones(4)] * 5}).__enter__()
    with pytest.raises(OptinError, match="image_size"):
        Mask2FormerAdapter(ad.model, image_size="big")
    with pytest.raises(OptinError, match="labelled"):
        ad.loss({"pixel_values": batch["pixel_values"]})


def test_claims_and_load(tmp_path):
    ad = make()
    ad.model.save_pretrained(str(tmp_path / "hf"))
    assert Mask2FormerAdapter.claims(str(tmp_path / "hf")) and not Mask2FormerAdapter.claims(str(tmp_path))
    loaded = Mask2FormerAdapter.load(str(tmp_path / "hf"))
    assert loaded.unit_counts() == ad.unit_counts() and loaded.image_size == (SIZE, SIZE)


def test_segmentation_model_refuses_a_classification_task(tmp_path):
    make().model.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(OptinError, match="segmentation model .* classification task"):
        optin.recipe.run(str(tmp_path / "hf"), task="fashion-mnist", output=tmp_path / "out")
