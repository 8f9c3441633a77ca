"""The user's own data: image folders, CSV/JSONL files of image paths, segmentation folders of image + mask pairs,
decoded lazily with the model's own preprocessing; ``--eval-data`` (their own held-out split); the text files as
before; bad files and mismatched kinds as one line naming what was found."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import save_tiny_bert
from optin import images as image_data
from optin.cli import cli
from optin.errors import OptinError
from optin.models import load_model
from optin.recipe import batches_of, resolve_task
from optin.tasks import file_task, split_of
from test_model_sources import SMALL, image_folder, one_error

pytestmark = pytest.mark.usefixtures("cli_sandbox")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def grey_vit(tmp_path) -> Path:
    """A tiny greyscale timm ViT in optin's own folder format (mean/std as free keys), 3 classes."""
    from timm.models.vision_transformer import VisionTransformer

    from optin_plugins.adapters.timm_io import save_timm_folder

    args = dict(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2)
    torch.manual_seed(0)
    return save_timm_folder(VisionTransformer(**args).eval(), tmp_path / "vit", args, mean=[0.25], std=[0.5])


# --- image folders and CSVs of image paths ---------------------------------------------------------------

def test_an_image_folder_is_decoded_lazily_with_the_models_preprocessing(tmp_path, grey_vit, monkeypatch):
    folder = image_folder(tmp_path / "imgs", per_class=10, size=(28, 28))
    opened = []
    real_open = image_data.ImageReader.open
    monkeypatch.setattr(image_data.ImageReader, "open", lambda self, p: opened.append(p) or real_open(self, p))
    task = file_task(folder)
    assert task.labels == ["cat", "dog", "fox"] and task.kind == "image" and task.target == "classes"
    assert not opened  # nothing decoded up front
    with pytest.raises(OptinError, match="task.prepare"):
        task.examples("train")[0]["image"]
    ad = load_model(str(grey_vit))
    task.prepare(ad)
    batch = batches_of(ad, task.examples("train")[:4], 4)[0]
    assert len(opened) == 4 and batch["pixel_values"].shape == (4, 1, 28, 28)  # greyscale model: greyscale input
    path = task.examples("train")[0].path
    expected = (torch.from_numpy(np.array(Image.open(path).convert("L"), np.float32)) / 255 - 0.25) / 0.5
    torch.testing.assert_close(batch["pixel_values"][0, 0], expected, atol=1e-5, rtol=0)  # the folder's mean/std
    assert batch["labels"].tolist() == [task.labels.index(e.path.parent.name) for e in task.examples("train")[:4]]
    n_test = len(task.examples("test"))
    assert 0 < n_test < 30 and n_test + len(task.examples("train")) == 30
    assert all(split_of(str(e.path.relative_to(folder))) == "test" for e in task.examples("test"))


@pytest.mark.parametrize("form", ["image.csv", "path.csv", "image.jsonl"])
def test_a_table_of_image_paths_relative_to_the_file(tmp_path, grey_vit, form):
    folder = image_folder(tmp_path / "data" / "pictures", size=(28, 28))
    column = form.split(".")[0]
    rows = [(f"pictures/{p.parent.name}/{p.name}", p.parent.name) for p in sorted(folder.rglob("*.png"))]
    table = tmp_path / "data" / form
    if form.endswith(".csv"):
        table.write_text(f"{column},label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    else:
        table.write_text("".join(json.dumps({column: p, "label": lab}) + "\n" for p, lab in rows))
    task = file_task(table).prepare(load_model(str(grey_vit)))
    assert task.labels == ["cat", "dog", "fox"] and task.kind == "image"
    first = task.examples("train")[0]
    assert first["image"].shape == (1, 28, 28) and task.labels[first["label"]] == first.path.parent.name


def test_image_folder_prunes_end_to_end_and_reports_the_split(tmp_path, grey_vit):
    folder = image_folder(tmp_path / "imgs", per_class=8, size=(28, 28), mode="L")
    res = invoke("run", "--model", grey_vit, "--data", folder, "--budget", "0.7", "--output", tmp_path / "out", *SMALL)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval_split"] == f"hash split of {folder} (20%)" and report["macs_ratio"] <= 0.7


# --- --eval-data --------------------------------------------------------------------------------------------

def text_rows(words: list[str], label: str) -> list[str]:
    return [f"the movie was {w} {v},{label}" for w in words for v in ("really", "very", "so")]


def test_eval_data_is_the_test_split_and_never_calibrates(tmp_path):
    from conftest import NEGATIVE, POSITIVE

    data, held = tmp_path / "train.csv", tmp_path / "test.csv"
    data.write_text("text,label\n" + "\n".join(text_rows(POSITIVE[:5], "pos") + text_rows(NEGATIVE[:5], "neg")) + "\n")
    held.write_text("text,label\n" + "\n".join(text_rows(POSITIVE[5:], "pos") + text_rows(NEGATIVE[5:], "neg")) + "\n")
    task = resolve_task(None, str(data), None, str(held))
    train_texts = {e["text"] for e in task.examples("train")}
    test_texts = {e["text"] for e in task.examples("test")}
    assert len(train_texts) == 30 and len(test_texts) == 18 and not train_texts & test_texts
    assert task.eval_split == f"eval-data {held}"
    plain = file_task(data)  # without it: the stable hash split, as before
    assert [e["text"] for e in plain.examples("test")] == [t.split(",")[0] for t in data.read_text().splitlines()[1:]
                                                          if split_of(t.split(",")[0]) == "test"]
    res = invoke("run", "--model", save_tiny_bert(tmp_path / "bert"), "--data", data, "--eval-data", held,
                 "--budget", "0.7", "--output", tmp_path / "out", *SMALL, "--calib-size", "100")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration_examples"] == 30 and report["eval_examples"] == 8  # --eval-size 8 of the 18
    assert report["eval_split"] == f"eval-data {held}"


def test_eval_data_refusals(tmp_path, grey_vit):
    data = tmp_path / "train.csv"
    data.write_text("text,label\nthe movie was good,pos\nthe movie was bad,neg\n")
    other = tmp_path / "other.csv"
    other.write_text("text,label\nthe movie was fine,meh\n")
    one_error(invoke("run", "--eval-data", data, *SMALL), "--eval-data", "pass --data FILE too")
    one_error(invoke("run", "--model", grey_vit, "--data", data, "--eval-data", other, *SMALL),
              "has label 'meh'", "does not have", "pos")
    images = image_folder(tmp_path / "imgs")
    one_error(invoke("run", "--model", grey_vit, "--data", images, "--eval-data", data, *SMALL),
              "is a text file", "is images", "same form")


# --- segmentation folders ------------------------------------------------------------------------------------

def segmentation_folder(root: Path, n: int = 6, size: int = 40, classes: int = 5, with_names: bool = True) -> Path:
    """``root/images/i.png`` (greyscale) + ``root/masks/i.png`` (class ids, a 255 border), ``classes.txt``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for c in rng.integers(1, classes, 2):
            t, l = rng.integers(0, size - 12, 2)
            mask[t:t + 12, l:l + 12] = c
        mask[0, :] = 255
        picture = (mask.astype(np.int64) * 40 + rng.integers(0, 20, mask.shape)) % 256
        Image.fromarray(picture.astype(np.uint8), "L").save(root / "images" / f"{i}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"{i}.png")
    if with_names:
        (root / "classes.txt").write_text("\n".join(["background", "a", "b", "c", "d"][:classes]) + "\n")
    return root


@pytest.fixture
def m2f_folder(tmp_path) -> Path:
    """The tiny Mask2Former of the adapter tests (32 px greyscale, 5 classes) saved as an HF folder."""
    from tiny_models import make_mask2former

    ad = make_mask2former()
    ad.model.save_pretrained(tmp_path / "m2f")
    return tmp_path / "m2f"


def notes(monkeypatch) -> list[str]:
    """What the image transforms tell the user."""
    said: list[str] = []
    monkeypatch.setattr("optin_plugins.adapters.image_io.say", said.append)
    return said


def test_a_segmentation_folder_gives_image_and_mask_pairs(tmp_path, m2f_folder, monkeypatch):
    said = notes(monkeypatch)
    folder = segmentation_folder(tmp_path / "seg")
    task = file_task(folder)
    assert task.target == "segmentation" and task.metric == "miou" and task.labels[0] == "background"
    ad = load_model(str(m2f_folder))
    task.prepare(ad)
    ad.image_transform()
    assert len(said) == 1 and "no preprocessor_config.json" in said[0]  # the fallback is said, once
    example = (task.examples("train") + task.examples("test"))[0]
    image, mask = example["image"], example["mask"]
    assert image.shape == (1, 32, 32) and mask.shape == (32, 32)  # resized to the model's input, nearest for masks
    raw = torch.from_numpy(np.array(Image.open(example.mask_path))).long()
    assert set(mask.unique().tolist()) <= set(raw.unique().tolist()) and (mask == 255).any()
    unnamed = segmentation_folder(tmp_path / "unnamed", with_names=False)  # classes: 0 .. the highest id found
    top = max(int(v) for m in (unnamed / "masks").iterdir() for v in np.unique(np.array(Image.open(m))) if v != 255)
    assert file_task(unnamed).labels == [str(i) for i in range(top + 1)] and top >= 2


def test_a_segmentation_folder_prunes_end_to_end(tmp_path, m2f_folder):
    folder = segmentation_folder(tmp_path / "seg", n=8)
    res = invoke("run", "--model", m2f_folder, "--data", folder, "--eval-data", segmentation_folder(tmp_path / "held"),
                 "--budget", "0.9", "--output", tmp_path / "out", *SMALL)
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["metric"] == "miou" and report["macs_ratio"] <= 0.9 and report["calibration_examples"] == 8


# --- bad files and mismatched kinds: one line naming what was found ------------------------------------------

def test_bad_image_files_are_one_line_naming_the_file(tmp_path, grey_vit):
    folder = image_folder(tmp_path / "imgs", per_class=3, size=(28, 28))
    broken = folder / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one_error(invoke("run", "--model", grey_vit, "--data", folder, "--calib-size", "20", "--scorer", "magnitude",
                     "--quiet", "--output", tmp_path / "out"), "cannot decode image file", "broken.png")
    table = tmp_path / "list.csv"
    table.write_text("image,label\nimgs/cat/0.png,cat\nimgs/cat/missing.png,dog\n")
    one_error(invoke("run", "--model", grey_vit, "--data", table, *SMALL), "row 2", "'imgs/cat/missing.png' not found",
              "relative to the data file's folder")
    (tmp_path / "loose").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "loose" / "a.png")
    one_error(invoke("run", "--model", grey_vit, "--data", tmp_path / "loose", *SMALL),
              "1 files (1 images) and no sub-folders", "one sub-folder per class")
    (folder / "empty").mkdir()
    one_error(invoke("run", "--model", grey_vit, "--data", folder, *SMALL), "class folder", "empty", "holds no images")
    archive = tmp_path / "data.npz"
    np.savez(archive, x=np.zeros(3))
    one_error(invoke("run", "--model", grey_vit, "--data", archive, *SMALL), "NumPy/zip archive", "image folder")


def test_bad_masks_are_one_line_naming_the_file(tmp_path, m2f_folder):
    folder = segmentation_folder(tmp_path / "seg", n=2)
    Image.new("L", (20, 20)).save(folder / "masks" / "0.png")
    task = file_task(folder).prepare(load_model(str(m2f_folder)))
    first = next(e for e in task.examples("train") + task.examples("test") if e.mask_path.name == "0.png")
    with pytest.raises(OptinError, match=r"mask .*0\.png' is 20x20 but its image .* is 40x40"):
        first["mask"]
    Image.fromarray(np.full((40, 40), 7, np.uint8), "L").save(folder / "masks" / "0.png")
    with pytest.raises(OptinError, match=r"0\.png' has class id 7 but task 'seg' has 5 classes"):
        first["mask"]
    Image.new("RGB", (40, 40)).save(folder / "masks" / "0.png")
    with pytest.raises(OptinError, match="single-channel"):
        first["mask"]
    (folder / "masks" / "1.png").unlink()
    with pytest.raises(OptinError, match=r"images/1\.png' has no mask"):
        file_task(folder)


def test_images_for_a_text_model_and_text_for_an_image_model_are_refused(tmp_path, grey_vit):
    bert = save_tiny_bert(tmp_path / "bert")
    one_error(invoke("run", "--model", bert, "--data", image_folder(tmp_path / "imgs"), *SMALL),
              "is images", "adapter 'bert'", "takes no images")
    text = tmp_path / "text.csv"
    text.write_text("text,label\nthe movie was good,pos\nthe movie was bad,neg\n")
    one_error(invoke("run", "--model", grey_vit, "--data", text, *SMALL), "is text", "takes images")


# --- preprocessing of the other vision adapters ---------------------------------------------------------------

def test_hf_vision_folders_use_their_image_processor(tmp_path, monkeypatch):
    said = notes(monkeypatch)
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3))
    model.save_pretrained(tmp_path / "bare")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    x = load_model(str(tmp_path / "bare")).image_transform()(picture)
    assert x.shape == (3, 32, 32) and "ImageNet mean/std" in said[0]
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5] * 3)
    model.save_pretrained(tmp_path / "with")
    processor.save_pretrained(tmp_path / "with")
    x = load_model(str(tmp_path / "with")).image_transform()(picture)
    torch.testing.assert_close(x, processor(images=picture, return_tensors="pt")["pixel_values"][0])


def test_cnn_folders_use_their_mean_std_and_size(tmp_path):
    from optin_plugins.adapters.cnn_common import save_cnn_folder
    from tiny_models import make_cnn

    ad, _ = make_cnn("vgg-fmnist")
    args = {"num_classes": 10, "in_chans": 1, "width": 0.125, "image_size": 28}
    save_cnn_folder(ad.model, tmp_path / "vgg", {"architecture": "cifar_vgg16_bn", "args": args, "image_size": 28,
                                                  "mean": [0.3], "std": [0.4]})
    x = load_model(str(tmp_path / "vgg")).image_transform()(Image.new("RGB", (56, 56), (255, 255, 255)))
    assert x.shape == (1, 28, 28)
    torch.testing.assert_close(x, torch.full((1, 28, 28), (1 - 0.3) / 0.4))


def test_a_mobilenet_folder_takes_rgb_images_though_its_first_unit_convolution_reads_more_channels(tmp_path):
    """MobileNetV2's channels with units start after the stem (16+ channels in): the images it takes have the
    stem's 3 channels. (The named mobilenetv2-imagenet failed on its photos before this was read from the stem.)"""
    from optin_plugins.adapters.cnn_common import save_cnn_folder
    from tiny_models import make_cnn

    ad, _ = make_cnn("mobilenet")
    assert ad.layers[0].conv.in_channels != 3
    save_cnn_folder(ad.model, tmp_path / "mob", {"architecture": "mobilenet_v2", "image_size": 64,
                                                  "args": {"num_classes": 6, "width_mult": 0.35, "dropout": 0.2},
                                                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    loaded = load_model(str(tmp_path / "mob"))
    x = loaded.image_transform()(Image.new("L", (80, 80), 255))
    assert x.shape == (3, 64, 64)
    torch.testing.assert_close(x, torch.full((3, 64, 64), (1 - 0.5) / 0.25))
    with torch.no_grad():
        assert loaded.logits({"pixel_values": x[None]}).shape == (1, 6)
