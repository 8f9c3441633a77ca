"""Models as their users save them: timm's ``save_for_hf`` folders (``pytorch_model.bin`` and/or
``model.safetensors``), ``--model timm:NAME --checkpoint FILE`` (a state dict in a ``.pth``/safetensors), and HF
folders whose weights are a ``pytorch_model.bin``; each reloads with the original's logits and prunes end to end.
Pickled objects are never run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from timm.models import register_model, save_for_hf

import optin
from conftest import save_tiny_bert
from optin.cli import cli
from optin.errors import OptinError
from optin.models import load_model

pytestmark = pytest.mark.usefixtures("cli_sandbox")  # every command runs from an empty folder (conftest)
SMALL = ("--scorer", "magnitude", "--calib-size", "8", "--eval-size", "8", "--batch-size", "8", "--quiet")
VIT = dict(img_size=32, patch_size=8, depth=2)  # a 2-block ViT-Tiny (width 192, 3 heads) on 32 px images


@register_model
def optin_test_swin(pretrained: bool = False, **kwargs):
    """A tiny timm Swin registered like any timm architecture (what a user's own registered model is)."""
    from timm.models.swin_transformer import _create_swin_transformer

    args = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2))
    return _create_swin_transformer("optin_test_swin", pretrained=pretrained, **dict(args, **kwargs))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def one_error(res, *words: str) -> str:
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert res.exit_code == 2, f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def tiny_vit(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **VIT).eval()


def image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4, size=(40, 36), mode="RGB") -> Path:
    """``root/<class>/<i>.png``: a few generated images per class (brightness differs by class)."""
    rng = np.random.default_rng(len(str(root)))
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            Image.fromarray((rng.random(shape) * 80 + 60 * c).astype("uint8"), mode).save(root / name / f"{i}.png")
    return root


@torch.no_grad()
def same_logits(a: torch.nn.Module, b: torch.nn.Module, shape=(2, 3, 32, 32)) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --- timm's save_for_hf ----------------------------------------------------------------------------------

@pytest.mark.parametrize("serialization", [False, True, "both"])  # pytorch_model.bin, model.safetensors, both
def test_a_save_for_hf_folder_rebuilds_its_architecture(tmp_path, serialization):
    model = tiny_vit()
    save_for_hf(model, tmp_path / "vit", model_args=VIT, safe_serialization=serialization)
    if serialization == "both":  # model.safetensors is preferred: a damaged .bin beside it is never read
        (tmp_path / "vit" / "pytorch_model.bin").write_bytes(b"not a pickle")
    ad = load_model(str(tmp_path / "vit"))
    assert ad.name == "vit" and ad.model.embed_dim == 192 and len(ad.model.blocks) == 2  # not ViT-Base
    same_logits(ad.model, model)
    transform = ad.image_transform()  # timm's own eval transform from the folder's pretrained_cfg
    assert "mean (0.5, 0.5, 0.5)" in repr(transform) and "crop_pct 0.9" in repr(transform)
    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_a_save_for_hf_swin_is_the_swin_adapters(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                              embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=3).eval()
    save_for_hf(model, tmp_path / "swin")
    ad = load_model(str(tmp_path / "swin"))
    assert ad.name == "swin"
    same_logits(ad.model, model)


def test_a_greyscale_model_gets_greyscale_images(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=28, patch_size=7,
                              depth=1, num_classes=2).eval()
    save_for_hf(model, tmp_path / "grey")
    x = load_model(str(tmp_path / "grey")).image_transform()(Image.new("RGB", (28, 28), (255, 0, 0)))
    assert x.shape == (1, 28, 28)


def test_save_for_hf_vit_with_an_image_folder_prunes_end_to_end_and_reloads(tmp_path):
    model = tiny_vit()
    save_for_hf(model, tmp_path / "my-vit", model_args=VIT)
    train = image_folder(tmp_path / "train")
    held = image_folder(tmp_path / "held-out", per_class=2)
    res = invoke("run", "--model", tmp_path / "my-vit", "--data", train, "--eval-data", held, "--budget", "0.7",
                 "--output", tmp_path / "out", *SMALL)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["adapter"] == "vit" and report["macs_ratio"] <= 0.7 and report["params_after"] < report["params_before"]
    assert report["eval_split"] == f"eval-data {held}" and report["eval_examples"] == 6
    assert report["max_abs_diff_vs_masked"] < 1e-4
    pruned = optin.load_pruned(tmp_path / "out" / "model")  # rebuilt from the architecture name, not ViT-Base
    assert pruned.model.embed_dim == 192
    assert repr(pruned.image_transform()) == repr(load_model(str(tmp_path / "my-vit")).image_transform())


# --- timm:NAME --checkpoint FILE -------------------------------------------------------------------------

def test_a_timm_checkpoint_of_a_real_architecture_loads_with_its_head_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    ad = load_model("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "weights.pth"))
    assert ad.name == "vit" and ad.model.num_classes == 4  # read from the checkpoint's head
    same_logits(ad.model, model, (1, 3, 224, 224))


@pytest.mark.parametrize("save", ["wrapped.pth", "model.safetensors"])
def test_a_timm_swin_checkpoint_prunes_end_to_end(tmp_path, save):
    torch.manual_seed(0)
    model = timm.create_model("optin_test_swin", num_classes=3).eval()
    state = model.state_dict()
    if save.endswith(".pth"):  # as training scripts save it: wrapped, with DDP's "module." prefix
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / save)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / save))
    ad = load_model("timm:optin_test_swin", checkpoint=str(tmp_path / save))
    assert ad.name == "swin" and ad.model.num_classes == 3  # not the architecture's default 1000
    same_logits(ad.model, model)
    res = invoke("run", "--model", "timm:optin_test_swin", "--checkpoint", tmp_path / save,
                 "--data", image_folder(tmp_path / "images", per_class=6), "--budget", "0.8",
                 "--output", tmp_path / "out", *SMALL)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["adapter"] == "swin" and report["macs_ratio"] <= 0.8
    assert report["eval_split"].startswith("hash split of")
    res = invoke("bench", "--model", "timm:optin_test_swin", "--checkpoint", tmp_path / save, "--compare",
                 tmp_path / "out" / "model", "--data", tmp_path / "images", "--eval-data", tmp_path / "images",
                 "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--json")
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["results"]) == 2


def test_pickled_objects_in_a_checkpoint_are_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": tiny_vit().state_dict(), "args": Payload()}, tmp_path / "evil.pth")
    res = invoke("run", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp_path / "evil.pth",
                 "--data", image_folder(tmp_path / "images"), "--output", tmp_path / "out", *SMALL)
    one_error(res, "evil.pth", "pickled Python objects", "weights_only=True", "model.state_dict()")
    assert not marker.exists()


def test_checkpoint_refusals_name_what_was_found(tmp_path):
    model = tiny_vit()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    images = image_folder(tmp_path / "images")
    one_error(invoke("run", "--model", tmp_path / "weights.pth", "--data", images, *SMALL),
              "is a weights file", "--model timm:ARCHITECTURE --checkpoint")
    one_error(invoke("run", "--model", "timm:vit_tiny_patch16_224", "--checkpoint", tmp_path / "weights.pth",
                     "--data", images, *SMALL),  # trained at 32 px, 2 blocks: not the architecture's defaults
              "does not fit timm model 'vit_tiny_patch16_224'", "save_for_hf")
    one_error(invoke("run", "--model", "timm:no_such_net", "--checkpoint", tmp_path / "weights.pth", "--data",
                     images, *SMALL), "no model architecture 'no_such_net'")
    bert = save_tiny_bert(tmp_path / "bert")
    one_error(invoke("run", "--model", bert, "--checkpoint", tmp_path / "weights.pth", "--data", images, *SMALL),
              "adapter 'bert'", "takes no --checkpoint", "timm:NAME")
    with pytest.raises(OptinError, match="not a file"):
        load_model("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "missing.pth"))


# --- HF folders with pytorch_model.bin -------------------------------------------------------------------

def as_bin_folder(folder: Path, model: torch.nn.Module) -> Path:
    """An HF folder whose weights are a ``pytorch_model.bin`` (transformers 5 only writes safetensors)."""
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_an_hf_bert_folder_with_pytorch_model_bin_prunes_end_to_end(tmp_path):
    from conftest import NEGATIVE, POSITIVE, make_tiny_bert

    folder = as_bin_folder(save_tiny_bert(tmp_path / "bert"), make_tiny_bert(num_labels=2))
    ad = load_model(str(folder))
    ids = torch.randint(5, 35, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ad.model(ids).logits, make_tiny_bert(num_labels=2)(ids).logits)
    rows = [f"the movie was {w},{lab}" for lab, words in (("pos", POSITIVE), ("neg", NEGATIVE)) for w in words]
    (tmp_path / "data.csv").write_text("text,label\n" + "\n".join(rows * 2) + "\n")
    res = invoke("run", "--model", folder, "--data", tmp_path / "data.csv", "--budget", "0.7",
                 "--output", tmp_path / "out", *SMALL)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["macs_ratio"] <= 0.7


def test_an_hf_vit_folder_with_pytorch_model_bin_loads(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    model.save_pretrained(tmp_path / "hf-vit")
    ad = load_model(str(as_bin_folder(tmp_path / "hf-vit", model)))
    assert ad.name == "hf-vit"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ad.model(pixel_values=x).logits, model(pixel_values=x).logits)


def test_finetune_an_hf_vit_on_an_image_folder_with_its_own_test_split(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=5)
                              ).save_pretrained(tmp_path / "pretrained")
    res = invoke("finetune", "--model", tmp_path / "pretrained", "--data", image_folder(tmp_path / "train"),
                 "--eval-data", image_folder(tmp_path / "test", per_class=2), "--output", tmp_path / "tuned",
                 "--epochs", "1", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    tuned = load_model(str(tmp_path / "tuned"))
    assert tuned.name == "hf-vit" and tuned.num_classes() == 3  # the folder's classes, a fresh head


def test_optin_list_says_which_adapter_loads_which_source():
    res = invoke("list", "--json")
    assert res.exit_code == 0, res.output
    sources = {p["name"]: p["sources"] for p in json.loads(res.output)["plugins"] if p["kind"] == "adapter"}
    assert "save_for_hf" in sources["vit"] and "--checkpoint" in sources["swin"] and "bert" in sources["bert"]
    table = invoke("list")
    assert "model sources" in table.output and "save_for_hf" in table.output


def test_compare_takes_a_checkpoint_and_an_eval_split(tmp_path):
    torch.manual_seed(0)
    torch.save(timm.create_model("optin_test_swin", num_classes=3).state_dict(), tmp_path / "w.pth")
    held = image_folder(tmp_path / "held", per_class=2)
    res = invoke("compare", "--model", "timm:optin_test_swin", "--checkpoint", tmp_path / "w.pth", "--data",
                 image_folder(tmp_path / "train"), "--eval-data", held, "--scorers", "magnitude", "random",
                 "--budgets", "0.8", "--output", tmp_path / "cmp", "--quiet", "--no-speed")
    assert res.exit_code == 0, res.output
    settings = json.loads((tmp_path / "cmp" / "compare.json").read_text())["settings"]
    assert settings["adapter"] == "swin" and settings["eval_data"] == str(held)


def test_finetune_refuses_a_model_it_cannot_save_before_training(tmp_path):
    save_for_hf(tiny_vit(), tmp_path / "my-vit", model_args=VIT)
    one_error(invoke("finetune", "--model", tmp_path / "my-vit", "--data", image_folder(tmp_path / "imgs"),
                     "--output", tmp_path / "tuned"), "VisionTransformer", "adapter 'vit'", "save_for_hf")
    assert not (tmp_path / "tuned").exists()
