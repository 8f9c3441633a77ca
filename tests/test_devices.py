"""--device and --dtype: scoring, pruning and evaluation on another device or in reduced precision give the
same kind of results (scores accumulated in float64 on the CPU, pruned == masked), and bad values are one
line. CUDA cases run where a GPU is present and are skipped with the reason elsewhere."""
from __future__ import annotations

import pytest
import torch

import optin
from optin.devices import resolve_device, resolve_dtype, to_device
from optin.errors import OptinError
from tiny_models import ADAPTERS, mmseg_unavailable, tiny

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def test_bad_device_and_dtype_are_one_line_errors():
    with pytest.raises(OptinError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(OptinError, match="use one of float32, bfloat16, float16"):
        resolve_dtype("float8")
    if not CUDA:
        with pytest.raises(OptinError, match="no CUDA device here"):
            resolve_device("cuda")


def test_batches_move_with_integer_tensors_kept():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": torch.ones(2, 1, 4, 4), "x": "keep"}
    moved = to_device(batch, torch.device("cpu"), torch.bfloat16)
    assert moved["input_ids"].dtype == torch.long and moved["pixel_values"].dtype == torch.bfloat16
    assert moved["x"] == "keep"


def _on(t, device: str, dtype: torch.dtype):
    t.adapter.model.to(device=device, dtype=dtype)
    return to_device(t.batch, torch.device(device), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["bert", "vit", "hf-vit", "vgg"])
def test_scoring_and_pruning_on_a_device(name, device):
    """Trajectory (its default plan) and magnitude scores on the device come back as float32 CPU tensors;
    the pruned model equals the masked one there."""
    t = tiny(name)
    batch = _on(t, device, torch.float32)
    ad = t.adapter
    for scorer in ("trajectory", "magnitude"):
        scores = optin.score(ad, [batch], scorer, t.options if scorer == "trajectory" else None)
        for v in scores.values.values():
            for s in v:
                assert s.device.type == "cpu" and s.dtype == torch.float32 and torch.isfinite(s).all()
    masks, _ = optin.search(ad, scores, t.budget, t.seq_len or ad.seq_len([batch]), allow_degenerate=True)
    with torch.no_grad(), ad.masked(masks):
        expected = ad.logits(batch)
    ad.prune(masks)
    with torch.no_grad():
        got = ad.logits(batch)
    assert got.device.type == device
    tol = 1e-3 if device == "cuda" else 1e-4  # CUDA convolutions run in TF32 by default (cudnn.allow_tf32)
    assert torch.allclose(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_reduced_precision_scores_rank_like_float32(name, dtype):
    """bfloat16 forward passes give scores whose ranking agrees with float32 (Spearman > 0.8 per kind)."""
    from scipy.stats import spearmanr

    ref_t, low_t = tiny(name), tiny(name)
    opts = {**(ref_t.options or {}), "estimator": "exact"}
    ref = optin.score(ref_t.adapter, [ref_t.batch], "trajectory", opts).values
    low = optin.score(low_t.adapter, [_on(low_t, "cpu", dtype)], "trajectory", opts).values
    for kind in ref:
        a, b = torch.cat(ref[kind]), torch.cat(low[kind])
        assert spearmanr(a.numpy(), b.numpy()).correlation > 0.8, kind


@pytest.mark.skipif(not CUDA, reason="no CUDA device here (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_scores_recovers_and_prunes_on_cuda(name):
    if name == "mmseg-mask2former" and mmseg_unavailable():
        pytest.skip(mmseg_unavailable())
    import copy

    from optin.recovery import recover

    t = tiny(name)
    batch = _on(t, "cuda", torch.float32)
    ad = t.adapter
    scores = optin.score(ad, [batch], "trajectory", t.options)
    masks, _ = optin.search(ad, scores, t.budget, t.seq_len or ad.seq_len([batch]), allow_degenerate=True)
    masks, _ = recover(ad, copy.deepcopy(ad), masks, [batch], ("reconstruct",))
    with torch.no_grad(), ad.masked(masks):
        expected = ad.logits(batch)
    ad.prune(masks)
    with torch.no_grad():
        assert torch.allclose(ad.logits(batch), expected, atol=1e-3, rtol=1e-3)
