"""The Fashion-MNIST task (real data from the Debian package) and the timm model folders of vit-fmnist."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from optin.errors import OptinError
from optin_plugins.tasks import images
from optin_plugins.zoo import vit_fmnist

HAVE_DATA = all((Path(os.environ.get(images.ENV_VAR) or images.DEFAULT_FOLDER) / f"{stem}.gz").is_file()
                for pair in images.FILES.values() for stem in pair)
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"Fashion-MNIST is not installed ({images.INSTALL})")


@needs_data
def test_fashion_mnist_task_splits_shapes_and_labels():
    from optin.tasks import get_task

    task = get_task("fashion-mnist")
    assert task.kind == "image" and task.num_labels == 10
    assert task.labels[0] == "T-shirt/top" and task.labels[-1] == "Ankle boot"
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (60000, 10000)
    for ex in (train[0], train[-1], test[0], test[-1]):
        assert set(ex) == {"image", "label"}
        assert ex["image"].shape == (1, 28, 28) and ex["image"].dtype == torch.float32
        assert isinstance(ex["label"], int) and 0 <= ex["label"] < 10
    x, y = images.load_tensors("test", str(images.fashion_mnist_folder()))
    assert sorted(torch.bincount(y).tolist()) == [1000] * 10  # the official test set is balanced
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1.0) < 0.05  # roughly standardised
    assert test[0]["label"] == 9  # the first official test image is an ankle boot


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_parser_and_env_var_folder(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        write_idx(tmp_path / f"{images.FILES[split][0]}.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{images.FILES[split][1]}.gz", np.arange(n) % 10)
    monkeypatch.setenv(images.ENV_VAR, str(tmp_path))
    examples = images.load_fashion_mnist("train")
    assert len(examples) == 5 and [e["label"] for e in examples] == [0, 1, 2, 3, 4]
    raw, _ = images.load_arrays("train", str(tmp_path))
    expected = (torch.from_numpy(raw[2].astype(np.float32)) / 255 - images.MEAN) / images.STD
    assert torch.allclose(examples[2]["image"][0], expected)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    with pytest.raises(OptinError, match="truncated"):
        images.read_idx(tmp_path / "bad.gz")


def test_missing_dataset_is_an_optin_error_naming_apt_get(tmp_path, monkeypatch):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    monkeypatch.setenv(images.ENV_VAR, str(empty))
    with pytest.raises(OptinError, match="apt-get install dataset-fashion-mnist") as info:
        images.load_fashion_mnist("test")
    assert str(empty) in str(info.value)


TINY_ARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2,
             "num_heads": 2, "mlp_ratio": 4.0, "class_token": True, "global_pool": "token"}


def test_load_timm_folder_round_trips_a_tiny_vit(tmp_path):
    model = vit_fmnist.make_vit(TINY_ARGS, seed=3).eval()
    folder = vit_fmnist.save_timm_folder(model, tmp_path / "tiny", TINY_ARGS, architecture="tiny-vit",
                                         num_classes=10, task="fashion-mnist", mean=0.2860, std=0.3530)
    config = json.loads((folder / "config.json").read_text())
    assert config["timm_class"] == "VisionTransformer" and config["model_args"] == TINY_ARGS
    loaded = vit_fmnist.load_timm_folder(folder)
    assert not loaded.training
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    config["model_args"]["depth"] = 3  # weights no longer match: a clear OptinError, not a silent partial load
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OptinError, match="does not match"):
        vit_fmnist.load_timm_folder(folder)
    with pytest.raises(OptinError, match="is not a timm model folder"):
        vit_fmnist.load_timm_folder(tmp_path)


def test_train_vit_runs_and_augment_keeps_shapes():
    from optin.tasks import Task

    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 28, 28, generator=g), "label": i % 10} for i in range(40)]
    task = Task("tiny-images", "random images", [str(i) for i in range(10)], lambda split: data, kind="image")
    x = torch.stack([e["image"] for e in data[:8]])
    out = vit_fmnist.augment(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    fill = -images.MEAN / images.STD
    for b in range(len(x)):  # each output is a window of the padded image or of its mirror
        windows = [torch.nn.functional.pad(src, (2, 2, 2, 2), value=fill)[:, dy:dy + 28, dx:dx + 28]
                   for src in (x[b], x[b].flip(-1)) for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)
    model = vit_fmnist.make_vit(TINY_ARGS, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    log = vit_fmnist.train_vit(model, task, epochs=2, batch_size=16, seed=0)
    assert log["steps"] == 6 and not model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 0.0 <= vit_fmnist.evaluate_vit(model, task, "test") <= 1.0


def test_vit_fmnist_is_a_named_model_of_the_image_task():
    from optin.models import named_models

    named = named_models()["vit-fmnist"]
    assert named.task == "fashion-mnist"
