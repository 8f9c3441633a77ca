"""Unit tests of the example activation scorer on three model families (no downloads, a few seconds on a CPU)."""
from __future__ import annotations

import pytest
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer

from optin.contracts import ScoreContext
from optin.errors import OptinError
from optin.testing import check_scorer
from optin_plugins.adapters.bert import BertAdapter
from optin_plugins.adapters.vgg import VggAdapter, cifar_vgg16_bn
from optin_plugins.adapters.vit import VitAdapter
from optin_taylor import ActivationScorer


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1:, 5:] = 0  # padding, which the scorer must not count
    batch = {"input_ids": torch.randint(5, 30, (4, 7)) * mask, "attention_mask": mask}
    return BertAdapter(transformers.BertForSequenceClassification(config).eval()), batch


def tiny_vit():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2,
                              num_heads=2, mlp_ratio=2)
    return VitAdapter(model.eval()), {"pixel_values": torch.randn(4, 1, 16, 16)}


def tiny_vgg():
    torch.manual_seed(0)
    model = cifar_vgg16_bn(num_classes=10, in_chans=1, width=0.0625, image_size=32)
    return VggAdapter(model.eval()), {"pixel_values": torch.randn(4, 1, 32, 32)}


@pytest.mark.parametrize("make", [tiny_bert, tiny_vit, tiny_vgg], ids=["bert", "vit", "vgg"])
@pytest.mark.parametrize("statistic", ["rms", "mean_abs"])
def test_conforms_on_three_model_families(make, statistic):
    adapter, batch = make()
    scores = check_scorer(ActivationScorer(statistic), adapter, [batch])  # optin's conformance kit
    assert set(scores) == set(adapter.unit_counts())
    assert all((t >= 0).all() and (t > 0).any() for layers in scores.values() for t in layers)


def test_rms_of_the_ffn_activations_over_the_real_tokens():
    adapter, batch = tiny_bert()
    seen = {}
    hook = adapter.layers[1].output.dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        adapter.logits(batch)
    hook.remove()
    real = seen["x"][batch["attention_mask"].bool()]  # (real tokens, neurons)
    scores = ActivationScorer().score(adapter, [batch], ScoreContext())
    assert torch.allclose(scores["neurons"][1], real.pow(2).mean(0).sqrt(), rtol=1e-5)


def test_each_process_probes_its_share_and_the_sums_are_reduced():
    adapter, batch = tiny_bert()
    other = {k: v.flip(0) for k, v in batch.items()}
    alone = ActivationScorer().score(adapter, [batch], ScoreContext())
    share = ActivationScorer().score(adapter, [batch, other], ScoreContext(rank=0, world=2))  # reduce: identity
    assert all(torch.equal(a, b) for k in alone for a, b in zip(alone[k], share[k]))


def test_unknown_statistic_is_a_clear_error():
    with pytest.raises(OptinError, match="use one of rms, mean_abs"):
        ActivationScorer("median")
