"""HF Mask2Former (Swin backbone): units, exact restart, MACs vs FlopCounterMode, removal, reload, errors."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import optin
from optin.errors import OptinError
from optin.recipe import prune
from optin_plugins.adapters.mask2former import Mask2FormerAdapter
from tiny_models import M2F_SIZE as SIZE
from tiny_models import make_mask2former as make
from tiny_models import mask2former_macs as flop_macs
from tiny_models import shapes


@pytest.fixture
def batch():
    return make().collate(shapes())


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
    res = prune(ad, [batch], scorer=scorer, budget=0.8, options={"neuron_group": 16} if scorer == "trajectory" else None,
                recover="none")  # removal alone equals masking the original
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
