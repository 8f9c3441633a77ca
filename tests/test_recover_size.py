"""How many examples recovery fits on (``--recover-size``): the rows-per-column rule, where it draws more
examples (a CNN's last convolutions on small maps), the limits, the CLI and compare folders."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import check_old_compare_folders, one_error_line
from optin_plugins.adapters.cnn_common import save_cnn_folder
from optin_plugins.adapters.vgg import cifar_vgg16_bn
from test_model_sources import image_folder
from tiny_models import make_cnn, tiny

import optin
from optin import recovery
from optin.cli import cli
from optin.errors import OptinError


def test_examples_for_rows_is_the_most_any_layer_needs():
    # 2 rows per fitted column (the kept columns and the bias)
    assert recovery.examples_for_rows([10, 100], [50.0, 4.0]) == 51  # ceil(2 * 101 / 4)
    assert recovery.examples_for_rows([10, 100], [50.0, 4.0], ratio=1) == 26
    assert recovery.examples_for_rows([10], [0.0]) == 0 and recovery.examples_for_rows([], []) == 0


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), (" Calibration", "calibration"), ("300", 300), (7, 7),
                                           (None, "auto")])
def test_recover_sizes_parse(value, parsed):
    assert recovery.parse_recover_size(value) == parsed


@pytest.mark.parametrize("value", ["0", "-3", "many", "1.5", True])
def test_bad_recover_sizes_are_refused(value):
    with pytest.raises(OptinError, match="--recover-size"):
        recovery.parse_recover_size(value)


def _random_masks(ad, keep: float = 0.6):
    g = torch.Generator().manual_seed(0)
    masks = {k: [(torch.rand(n, generator=g) < keep).float() for n in ns] for k, ns in ad.unit_counts().items()}
    for ms in masks.values():
        for m in ms:
            m[0] = 1.0
    return masks


def test_a_cnn_on_small_maps_asks_for_more_examples_than_its_calibration_sample():
    """CIFAR-style VGG at 32px: the convolution reading layer i's channels runs on a map of 32..2 pixels a
    side and the classifier on one row per image; its last convolutions get 4 rows an image for hundreds
    of columns, so 4 images are far too few."""
    ad, batch = make_cnn("vgg-cifar")
    masks = _random_masks(ad)
    todo = recovery.readers(ad, masks, batch)
    assert [r.rows_per_example for r in todo] == [1024, 256, 256, 64, 64, 64, 16, 16, 16, 4, 4, 4, 1]
    want, why = recovery.recovery_size(ad, masks, [batch], "auto")
    expected = recovery.examples_for_rows([int(r.columns().numel()) for r in todo], [r.rows_per_example for r in todo])
    assert want == min(expected, recovery.MAX_RECOVER_EXAMPLES) > 4 and "rows per fitted column" in why
    assert recovery.recovery_size(ad, masks, [batch], "calibration") == (4, "the calibration sample")
    assert recovery.recovery_size(ad, masks, [batch], 20)[0] == 20
    assert recovery.recovery_size(ad, masks, [batch], 2)[0] == 4  # never fewer than the calibration sample


def test_text_rows_are_its_tokens():
    """A transformer's reading layers see one row per real token: padding does not count."""
    t = tiny("bert")
    masks = _random_masks(t.adapter)
    tokens = float(t.batch["attention_mask"].sum()) / t.batch["attention_mask"].shape[0]
    assert all(r.rows_per_example == pytest.approx(tokens) for r in recovery.readers(t.adapter, masks, t.batch))
    big = {k: v.repeat(200, 1) if v.dim() == 2 else v.repeat(200) for k, v in t.batch.items()}  # 800 texts
    assert recovery.recovery_size(t.adapter, masks, [big], "auto")[0] == 800  # enough rows already


@pytest.fixture()
def cnn_folder(tmp_path):
    torch.manual_seed(0)
    model = cifar_vgg16_bn(num_classes=3, in_chans=3, width=0.125).eval()
    save_cnn_folder(model, tmp_path / "vgg", {"architecture": "cifar_vgg16_bn",
                                              "args": {"num_classes": 3, "in_chans": 3, "width": 0.125},
                                              "image_size": 32})
    return {"model": str(tmp_path / "vgg"), "data": str(image_folder(tmp_path / "images", per_class=12))}


SMALL = ["--scorer", "magnitude", "--calib-size", "8", "--eval-size", "8", "--batch-size", "8", "--quiet",
         "--allocation", "scores", "--budget", "0.8"]


def test_a_run_recovers_on_more_training_examples_where_the_rule_asks(cnn_folder, cli_sandbox):
    """36 images, about 80% in the training split: auto asks for hundreds, gets what the data has, and says
    so; ``calibration`` keeps to the 8 calibration images; both prune to the budget."""
    runs = {}
    for setting in ("auto", "calibration", "12"):
        out = cli_sandbox / setting
        res = CliRunner().invoke(cli, ["run", "--model", cnn_folder["model"], "--data", cnn_folder["data"], *SMALL,
                                       "--recover-size", setting, "--output", str(out)])
        assert res.exit_code == 0, res.output + repr(res.exception)
        runs[setting] = json.loads((out / "report.json").read_text())
        assert runs[setting]["macs_ratio"] <= 0.8 + 1e-9 and runs[setting]["max_abs_diff_vs_masked"] < 1e-4
    train = 36 - runs["auto"]["eval_examples"]  # every image not held out
    assert 8 < runs["auto"]["recovery"]["examples"] <= train
    assert "rows per fitted column" in runs["auto"]["recovery"]["examples_why"]
    assert runs["calibration"]["recovery"]["examples"] == 8
    assert runs["12"]["recovery"]["examples"] == 12


def test_python_prune_recovers_on_the_data_it_is_given():
    ad, batch = make_cnn("vgg-cifar")
    result = optin.prune(ad, [batch], scorer="magnitude", budget=0.8, allocation="scores")
    layers = result.info["recovery"]["layers"]
    assert layers and layers[-1]["rows"] == 4  # the classifier: one row per image, 4 images
    assert result.info["recovery"]["wanted"] > 4  # what optin run would have drawn


def test_a_compare_folder_from_before_the_setting_resumes_only_with_the_calibration_sample(cnn_folder, cli_sandbox):
    folder = cli_sandbox / "old"
    args = ["compare", "--model", cnn_folder["model"], "--data", cnn_folder["data"], "--scorers", "magnitude",
            "--budgets", "0.8", "--calib-size", "8", "--eval-size", "8", "--output", str(folder), "--quiet",
            "--no-speed", "--allocation", "scores"]
    check_old_compare_folders(args, folder, "recover_size", ["--recover-size", "calibration"],
                              ["--budgets", "0.8", "0.9"])


@pytest.mark.parametrize("value", ["0", "lots"])
def test_a_bad_recover_size_on_the_command_line_is_one_error_line(value, cli_sandbox):
    one_error_line(CliRunner().invoke(cli, ["run", "--recover-size", value, "--output", str(cli_sandbox / "x")]),
                   "--recover-size")


def test_auto_draws_no_more_than_the_paused_forwards_can_hold(monkeypatch):
    """torchvision's VGG layout reads the last convolution's channels with a Linear over its 7x7 map: 49 columns
    a channel, one row an image, so the rule asks for hundreds of images; the memory the paused forwards
    would hold caps it (and never below the calibration sample)."""
    ad, batch = make_cnn("vgg-imagenet")
    masks = _random_masks(ad)
    todo = recovery.readers(ad, masks, batch)
    held = 2 * max(r.bytes_per_example for r in todo)
    assert held > 0 and todo[-1].rows_per_example == 1 and todo[-1].columns_per_unit == 49
    free, _ = recovery.recovery_size(ad, masks, [batch], "auto")
    monkeypatch.setattr(recovery, "RECOVER_MEMORY", 10 * held)
    capped, why = recovery.recovery_size(ad, masks, [batch], "auto")
    assert free > 10 and capped == 10 and "GiB" in why
    monkeypatch.setattr(recovery, "RECOVER_MEMORY", held)
    assert recovery.recovery_size(ad, masks, [batch], "auto")[0] == 4  # the calibration sample, not fewer
