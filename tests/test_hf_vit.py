"""HF transformers ViT / DeiT classifiers: heads and neurons, exact restart, MACs, removal, reload."""
import pytest
import torch

import optin
from optin.recipe import score, search
from optin.testing import check_adapter, flop_macs
from optin_plugins.adapters.hf_vit import HFVitAdapter
from tiny_models import images as _images
from tiny_models import make_hf_vit as make


@pytest.fixture
def images():
    return _images(n=5, channels=1, size=28)


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_found_by_the_registry_and_counts(kind):
    ad = make(kind)
    assert optin.models.adapter_for(ad.model) is HFVitAdapter
    assert ad.unit_counts() == {"heads": [4] * 3, "neurons": [64] * 3}
    assert ad.protected == (2 if kind == "deit" else 1) and ad.n_tokens == 49 + ad.protected


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
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


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2"])
def test_conforms_with_exact_macs(kind, images):
    """optin.testing.check_adapter: masked == removed (a block without any head included), analytic MACs ==
    FlopCounterMode (eager attention) before and after removal, export + reload, restart."""
    result = check_adapter(make(kind), images, count_macs=lambda ad: flop_macs(ad, images))
    assert result["pruned_counts"]["heads"][0] == 0
    assert isinstance(result["reloaded"], HFVitAdapter)


def test_searched_masks_meet_the_budget(images):
    ad = make("vit")
    scores = score(ad, [images], "trajectory", {"neuron_group": 8})
    masks, costs = search(ad, scores, 0.6, ad.seq_len([images]))
    ad.prune(masks)
    assert ad.cost_model().macs() <= 0.6 * costs.macs()
    assert ad.cost_model().macs() == pytest.approx(costs.macs_of_masks(masks))
