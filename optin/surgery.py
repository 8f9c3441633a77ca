"""Physical removal helpers: rebuild layers with only the kept rows/columns."""
from __future__ import annotations

import warnings

import torch
from torch import nn


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Feature indices covered by the given head indices (head h owns rows h*d .. h*d+d-1)."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@torch.no_grad()
def slice_linear(layer: nn.Linear, out_idx: torch.Tensor | None = None,
                 in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only the selected output rows and/or input columns (zero-sized allowed)."""
    w = layer.weight
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    bias = layer.bias
    if bias is not None and out_idx is not None:
        bias = bias[out_idx]
    with warnings.catch_warnings():  # a fully pruned layer is zero-sized: its (skipped) init warns
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        new = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=bias is not None, device=w.device,
                                 dtype=w.dtype)  # weights are copied below: no random init
    new.weight.copy_(w)
    if bias is not None:
        new.bias.copy_(bias)
    new.train(layer.training)
    return new
