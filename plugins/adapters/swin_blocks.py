"""Pure helpers for Swin Transformer blocks (HF ``SwinLayer`` and timm ``SwinTransformerBlock``).

Shared by the Swin classifiers (``swin``, ``hf-swin``) and by adapters whose backbone is a Swin encoder
(HF ``SwinBackbone`` in Mask2Former). Three things:

- ``window_block_macs``: analytic MACs of one attention head and one MLP neuron of a window-attention block.
- slicing: remove heads / MLP neurons of one block in place (HF and timm layouts), zero heads included.
- ``hf_swin_blocks``: the blocks of an HF Swin encoder with the resolution and window they run at.

Head layout: HF ``attention.q_proj/k_proj/v_proj`` (rows), ``attention.o_proj`` (columns) and the relative
position bias table column (``attention.relative_position_bias.relative_position_bias_table``); timm
``attn.qkv`` (rows of q, k, v), ``attn.proj`` (columns) and ``attn.relative_position_bias_table``.
Neurons: ``mlp.fc1`` rows and ``mlp.fc2`` columns in both. Masks for either unit go at the input of the
output projection (``o_proj`` / ``proj``, unit size = head dim) and of ``mlp.fc2`` (unit size 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optin.surgery import head_rows, slice_linear

from .common import kept, slice_mlp, track


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) or not hasattr(v, "__len__") else (int(v[0]), int(v[1]))


def window_block_macs(height: int, width: int, dim: int, head_dim: int,
                      window: int | tuple[int, int]) -> tuple[float, float]:
    """(MACs per head, MACs per MLP neuron) of one Swin block on a ``height x width`` token map.

    Attention runs on the map padded up to a multiple of the window: N = Hp*Wp tokens in windows of
    M*M = wh*ww tokens. One head costs its q, k, v and output projection slices (4*N*D*d) plus QK^T and
    AV inside each window (2*N*M*M*d). The MLP runs on the unpadded H*W tokens: 2*H*W*D per neuron.
    Biases, LayerNorm, softmax and the relative position bias add are not counted (as FlopCounterMode).
    """
    wh, ww = _pair(window)
    n_attn = math.ceil(height / wh) * wh * math.ceil(width / ww) * ww
    d, D = float(head_dim), float(dim)
    head = 4 * n_attn * D * d + 2 * n_attn * wh * ww * d
    return float(head), float(2 * height * width * D)


# --- HF SwinLayer -------------------------------------------------------------------------------------

class HFNoHeads(nn.Module):
    """An HF Swin attention whose heads were all removed: outputs ``o_proj``'s bias (what masking gives)."""

    def __init__(self, o_proj: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.o_proj, self.num_attention_heads, self.head_dim = o_proj, 0, head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def hf_head_count(layer: nn.Module) -> int:
    return int(layer.attention.num_attention_heads)


def hf_head_dim(layer: nn.Module) -> int:
    return int(layer.attention.head_dim)


@torch.no_grad()
def slice_hf_heads(layer: nn.Module, keep: list[int]) -> None:
    """Keep only heads ``keep`` (indices into the current heads) of an HF ``SwinLayer``, in place.
    With no head left the attention becomes ``HFNoHeads`` (its output is ``o_proj``'s bias)."""
    att = layer.attention
    d = int(att.head_dim)
    rows = head_rows(keep, d)
    o_proj = slice_linear(att.o_proj, in_idx=rows)
    if not keep:
        layer.attention = HFNoHeads(o_proj, d)
        return
    for p in ("q_proj", "k_proj", "v_proj"):
        setattr(att, p, slice_linear(getattr(att, p), out_idx=rows))
    att.o_proj = o_proj
    bias = att.relative_position_bias
    table = bias.relative_position_bias_table
    bias.relative_position_bias_table = nn.Parameter(table[:, keep].clone(), requires_grad=table.requires_grad)
    att.num_attention_heads = len(keep)


@torch.no_grad()
def slice_hf_neurons(layer: nn.Module, keep: list[int] | torch.Tensor) -> None:
    """Keep only MLP hidden neurons ``keep`` of an HF ``SwinLayer`` (``mlp.fc1`` rows, ``mlp.fc2`` columns)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    layer.mlp.fc1, layer.mlp.fc2 = slice_mlp(layer.mlp.fc1, layer.mlp.fc2, keep)


def hf_mask_target(layer: nn.Module, kind: str) -> tuple[nn.Module, int]:
    """(module whose input a ``kind`` mask scales, unit size) for an HF ``SwinLayer``."""
    if kind == "heads":
        return layer.attention.o_proj, int(layer.attention.head_dim)
    return layer.mlp.fc2, 1


def hf_head_weights(layer: nn.Module) -> torch.Tensor:
    """Per head, the flattened q/k/v rows, o_proj columns and bias-table column: (heads, w)."""
    att = layer.attention
    n, d = int(att.num_attention_heads), int(att.head_dim)
    D = att.o_proj.out_features
    if not n:
        return torch.zeros(0, 4 * d * D)
    parts = [getattr(att, p).weight.reshape(n, d * D) for p in ("q_proj", "k_proj", "v_proj")]
    parts.append(att.o_proj.weight.reshape(D, n, d).permute(1, 0, 2).reshape(n, -1))
    parts.append(att.relative_position_bias.relative_position_bias_table.t())
    return torch.cat(parts, 1).detach()


# --- timm SwinTransformerBlock ------------------------------------------------------------------------

class TimmNoHeads(nn.Module):
    """A timm window attention whose heads were all removed: outputs ``proj``'s bias."""

    def __init__(self, proj: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.proj, self.num_heads, self.head_dim = proj, 0, head_dim

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.proj(x.new_zeros(*x.shape[:-1], 0))


def timm_head_dim(block: nn.Module) -> int:
    attn = block.attn
    if isinstance(attn, TimmNoHeads):
        return attn.head_dim
    return attn.qkv.out_features // (3 * attn.num_heads)


@torch.no_grad()
def slice_timm_heads(block: nn.Module, keep: list[int]) -> None:
    """Keep only heads ``keep`` of a timm ``SwinTransformerBlock``, in place (``TimmNoHeads`` when none)."""
    attn = block.attn
    d, n = timm_head_dim(block), int(attn.num_heads)
    rows = head_rows(keep, d)
    proj = slice_linear(attn.proj, in_idx=rows)
    if not keep:
        block.attn = TimmNoHeads(proj, d)
        return
    attn.qkv = slice_linear(attn.qkv, out_idx=torch.cat([rows + j * n * d for j in range(3)]))
    attn.proj = proj
    table = attn.relative_position_bias_table
    attn.relative_position_bias_table = nn.Parameter(table[:, keep].clone(), requires_grad=table.requires_grad)
    attn.num_heads = len(keep)


@torch.no_grad()
def slice_timm_neurons(block: nn.Module, keep: list[int] | torch.Tensor) -> None:
    """Keep only MLP hidden neurons ``keep`` of a timm ``SwinTransformerBlock``."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    block.mlp.fc1, block.mlp.fc2 = slice_mlp(block.mlp.fc1, block.mlp.fc2, keep)


def timm_mask_target(block: nn.Module, kind: str) -> tuple[nn.Module, int]:
    """(module whose input a ``kind`` mask scales, unit size) for a timm ``SwinTransformerBlock``."""
    if kind == "heads":
        return block.attn.proj, timm_head_dim(block)
    return block.mlp.fc2, 1


def timm_head_weights(block: nn.Module) -> torch.Tensor:
    """Per head, the flattened q/k/v rows, proj columns and bias-table column: (heads, w)."""
    attn = block.attn
    n, d = int(attn.num_heads), timm_head_dim(block)
    D = attn.proj.out_features
    if not n:
        return torch.zeros(0, 4 * d * D)
    qkv = attn.qkv.weight.reshape(3, n, d, D).permute(1, 0, 2, 3).reshape(n, -1)
    proj = attn.proj.weight.reshape(D, n, d).permute(1, 0, 2).reshape(n, -1)
    return torch.cat([qkv, proj, attn.relative_position_bias_table.t()], 1).detach()


def neuron_weights(block: nn.Module) -> torch.Tensor:
    """Per MLP neuron, its ``fc1`` row and ``fc2`` column (HF and timm alike): (neurons, 2*D)."""
    return torch.cat([block.mlp.fc1.weight, block.mlp.fc2.weight.t()], 1).detach()


# --- HF encoder layout ---------------------------------------------------------------------------------

@dataclass
class SwinBlockInfo:
    """One block of a Swin encoder: where it is and the token map / window it runs at."""

    stage: int
    index: int  # within the stage
    block: nn.Module
    resolution: tuple[int, int]  # (H, W) tokens entering the block
    window: int  # effective window side (after HF's clamp to small maps)
    shift: int


def hf_swin_blocks(encoder: nn.Module, grid: tuple[int, int], always_partition: bool = False) -> list[SwinBlockInfo]:
    """Blocks of an HF ``SwinEncoder`` (``encoder.layers[s].blocks[b]``) in forward order, with the patch
    grid ``grid`` (H, W) tracked through the patch mergings ((x+1)//2 per stage, as HF does).

    ``always_partition`` as the caller's forward passes it (``SwinBackbone`` passes True): without it HF
    shrinks the window to the map when min(H, W) <= window, and drops the shift.
    """
    out: list[SwinBlockInfo] = []
    h, w = int(grid[0]), int(grid[1])
    for s, stage in enumerate(encoder.layers):
        for b, layer in enumerate(stage.blocks):
            window, shift = int(layer.window_size), int(layer.shift_size)
            if not always_partition and min(h, w) <= window:
                window, shift = min(h, w), 0
            out.append(SwinBlockInfo(s, b, layer, (h, w), window, shift))
        if stage.downsample is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
    return out


def hf_block_macs(info: SwinBlockInfo) -> tuple[float, float]:
    """(MACs per head, per neuron) of an HF block listed by ``hf_swin_blocks``."""
    layer = info.block
    dim = layer.mlp.fc2.out_features
    return window_block_macs(info.resolution[0], info.resolution[1], dim, hf_head_dim(layer), info.window)


def hf_merging_macs(encoder: nn.Module, grid: tuple[int, int]) -> float:
    """MACs of the patch mergings (``reduction`` Linear 4C -> 2C on the halved map) of an HF encoder."""
    total, h, w = 0.0, int(grid[0]), int(grid[1])
    for stage in encoder.layers:
        if stage.downsample is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
            red = stage.downsample.reduction
            total += h * w * red.in_features * red.out_features
    return total


def prune_blocks(blocks: list[nn.Module], masks: dict[str, list[torch.Tensor]], kept_index: dict[str, list[list[int]]],
                 slice_heads: Any, slice_neurons: Any) -> None:
    """Physically remove the masked heads/neurons of every block with the library's slicing functions
    (``slice_hf_*`` or ``slice_timm_*``) and record the original indices kept (for the export plan)."""
    for i, block in enumerate(blocks):
        for kind, slice_fn in (("heads", slice_heads), ("neurons", slice_neurons)):
            if kind in masks:
                keep = kept(masks[kind][i]).tolist()
                slice_fn(block, keep)
                track(kept_index, kind, i, keep)
