"""Pure helpers for Swin Transformer blocks (HF ``SwinLayer`` and timm ``SwinTransformerBlock``).

Shared by the Swin classifiers (``swin``, ``hf-swin``) and by adapters whose backbone is a Swin encoder
(HF ``SwinBackbone`` in Mask2Former). Three things:

- ``window_block_macs``: analytic MACs of one attention head and one MLP neuron of a window-attention block.
- where a block's units are masked, and the weights each unit owns (HF and timm layouts); removal is in
  ``heads``.
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

import torch
from torch import nn

from .heads import timm_head_dim


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

def hf_head_count(layer: nn.Module) -> int:
    return int(layer.attention.num_attention_heads)


def hf_head_dim(layer: nn.Module) -> int:
    return int(layer.attention.head_dim)


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
