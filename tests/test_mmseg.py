"""mmsegmentation Mask2Former (Swin) adapter on a reduced config at 64x128: exact restart, MACs vs
FlopCounterMode, pruned == masked, budget met through the recipe, save/reload, listing.

Needs mmcv (with its compiled ops) + mmsegmentation 1.x + mmdet; skipped with the reason otherwise.
The always-run check of the unavailable path is in test_mmseg_unavailable.py.
"""
import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from optin_plugins.adapters.mmseg_mask2former import DEFAULT_CONFIG, MMSegMask2FormerAdapter, find_config

REASON = MMSegMask2FormerAdapter.unavailable_reason()
if REASON:
    pytest.skip(f"mmseg-mask2former unavailable: {REASON}", allow_module_level=True)

import optin  # noqa: E402
from optin.errors import OptinError  # noqa: E402
from optin.recipe import prune  # noqa: E402
from tiny_models import MMSEG_CLASSES as CLASSES  # noqa: E402
from tiny_models import MMSEG_H as H  # noqa: E402
from tiny_models import MMSEG_SMALL as SMALL  # noqa: E402
from tiny_models import MMSEG_W as W  # noqa: E402
from tiny_models import make_mmseg as make  # noqa: E402
from tiny_models import mmseg_batch  # noqa: E402

NEURONS = [64, 64, 128, 128, 256, 256, 512, 512]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch():
    return mmseg_batch()


def flops_macs(ad: MMSegMask2FormerAdapter) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ad.logits({"pixel_values": torch.randn(1, 3, H, W)})
    return fc.get_total_flops() / 2


def test_found_by_the_registry_and_counts(batch):
    ad = make()
    assert optin.models.adapter_for(ad.model) is MMSegMask2FormerAdapter
    assert ad.unit_counts() == {"neurons": NEURONS}
    assert ad.output == "segmentation" and ad.processor["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert MMSegMask2FormerAdapter.claims(DEFAULT_CONFIG) and MMSegMask2FormerAdapter.claims("mmseg:" + DEFAULT_CONFIG)
    assert not MMSegMask2FormerAdapter.claims("bert-base-uncased")
    assert find_config(DEFAULT_CONFIG)[0].name == DEFAULT_CONFIG + ".py"
    lp = ad.logits(batch)
    assert lp.shape == (2, CLASSES, H, W) and torch.allclose(lp.exp().sum(1), torch.ones(2, H, W), atol=1e-5)
    assert torch.isfinite(ad.loss(batch))


def test_run_from_is_exact(batch):
    ad = make()
    tr = ad.trace(batch)
    assert [tuple(e.shape) for e in tr.embeddings[::2]] == [(2, 512, 16), (2, 128, 32), (2, 32, 64), (2, 8, 128)]
    for layer in (0, 3, 7):
        masks = torch.ones(2, NEURONS[layer])
        masks[1, :7] = 0
        emb, lg = ad.run_from(tr, "neurons", layer, masks, batch)
        with torch.no_grad(), ad.masked({"neurons": [masks[1] if i == layer else None for i in range(8)]}):
            ref = ad.logits(batch)
        assert sorted(emb) == list(range(layer, 8))
        assert torch.allclose(lg[:2], tr.logits, atol=1e-5) and torch.allclose(lg[2:], ref, atol=1e-5)
        assert not torch.allclose(lg[2:], tr.logits, atol=1e-5)
        assert torch.allclose(emb[7][:2], tr.embeddings[7], atol=1e-5)


def test_macs_match_flop_counter_before_and_after_pruning(batch):
    ad = make()
    ad.seq_len([batch])
    full = ad.cost_model()
    assert full.macs() == pytest.approx(flops_macs(ad))
    assert full.per_unit["neurons"] == [2 * n * d for n, d in zip([512, 512, 128, 128, 32, 32, 8, 8],
                                                                  [16, 16, 32, 32, 64, 64, 128, 128])]
    g = torch.Generator().manual_seed(2)
    masks = {"neurons": [(torch.rand(n, generator=g) < 0.5).float() for n in NEURONS]}
    masks["neurons"][1][:] = 0  # a block without any FFN neuron
    ad.prune(masks)
    assert ad.cost_model().macs() == pytest.approx(flops_macs(ad))
    assert ad.cost_model().macs() == pytest.approx(full.macs_of_masks(masks))


def test_prune_meets_budget_equals_masked_and_reloads(batch, tmp_path):
    ad = make()
    reference = copy.deepcopy(ad)
    res = prune(ad, [batch], scorer="trajectory", budget=0.8, options={"neuron_group": 16, "rows": 256},
                recover="none")  # removal alone equals masking the original
    assert res.macs_after <= 0.8 * res.macs_before
    assert ad.cost_model().macs() == pytest.approx(res.macs_after)
    assert ad.cost_model().macs() == pytest.approx(flops_macs(ad))
    with torch.no_grad():
        with reference.masked(res.masks):
            expected = reference.logits(batch)
        got = ad.logits(batch)
    assert torch.allclose(got, expected, atol=1e-4)
    assert sum(p.numel() for p in ad.model.parameters()) < sum(p.numel() for p in reference.model.parameters())
    optin.save_pruned(ad, tmp_path / "m")
    plan = json.loads((tmp_path / "m" / "optin-plan.json").read_text())
    assert plan["adapter"] == "mmseg-mask2former" and plan["plan"]["input_size"] == [H, W]
    again = optin.load_pruned(tmp_path / "m")
    assert isinstance(again, MMSegMask2FormerAdapter) and again.unit_counts() == ad.unit_counts()
    assert again.kept_index == ad.kept_index
    with torch.no_grad():
        assert torch.allclose(again.logits(batch), got, atol=1e-6)


def test_load_a_config_file_with_its_checkpoint(tmp_path, batch):
    ad = make()
    torch.save({"state_dict": ad.model.state_dict()}, tmp_path / "small.pth")
    base = find_config(DEFAULT_CONFIG)[0]
    lines = [f"_base_ = [{str(base)!r}]", "crop_size = (64, 128)"]
    model: dict = {}
    for key, value in SMALL.items():  # dotted overrides -> the nested dict an mmseg config file holds
        node = model
        *parents, leaf = key.split(".")[1:]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    lines.append(f"model = {model!r}")
    (tmp_path / "small.py").write_text("\n".join(lines) + "\n")
    assert MMSegMask2FormerAdapter.claims(str(tmp_path / "small.py"))
    loaded = optin.models.load_model(str(tmp_path / "small.py"))
    assert isinstance(loaded, MMSegMask2FormerAdapter) and loaded.input_size == (64, 128)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(batch), ad.logits(batch), atol=1e-6)


def test_clear_errors(batch):
    ad = make()
    with pytest.raises(OptinError, match="no unit kind 'heads'"):
        ad.masked({"heads": [torch.ones(1)] * 8}).__enter__()
    with pytest.raises(OptinError, match="one entry per Swin block"):
        ad.prune({"neurons": [torch.ones(64)]})
    with pytest.raises(OptinError, match=r"pixel_values \(B, 3, H, W\)"):
        ad.logits({"pixel_values": torch.randn(1, 1, H, W)})
    with pytest.raises(OptinError, match="needs labelled batches"):
        ad.loss({"pixel_values": batch["pixel_values"]})
    with pytest.raises(OptinError, match="no config named"):
        MMSegMask2FormerAdapter.from_config("mask2former_swin-nope")
    with pytest.raises(OptinError, match="SwinTransformer backbone"):
        MMSegMask2FormerAdapter.from_config("mask2former_r50_8xb2-90k_cityscapes-512x1024")
    with pytest.raises(OptinError, match="not an mmseg EncoderDecoder"):
        MMSegMask2FormerAdapter(torch.nn.Linear(2, 2))
    bare = MMSegMask2FormerAdapter(ad.model)  # built elsewhere, without its config
    with pytest.raises(OptinError, match="without its config"):
        bare.plan()


def test_listed_available():
    from click.testing import CliRunner

    from optin.cli import cli

    res = CliRunner().invoke(cli, ["list", "--json"])
    assert res.exit_code == 0, res.output
    info = [p for p in json.loads(res.stdout)["plugins"] if p["name"] == "mmseg-mask2former"]
    assert len(info) == 1 and info[0]["kind"] == "adapter" and info[0]["available"] and info[0]["error"] is None
