"""Removing attention heads and MLP neurons in place, block by block (shared by the transformer adapters).

Two attention layouts: HF transformers 5 (``q_proj``/``k_proj``/``v_proj`` rows and ``o_proj`` columns per
head, ``num_attention_heads``, ``head_dim``: ViT, DeiT, Swin) and timm (``qkv`` rows of q, k and v and
``proj`` columns per head, ``num_heads``: ViT, Swin). Swin's relative position bias table loses the removed
heads' columns, timm's optional per-head ``gate`` its rows. An attention left without heads becomes a
stand-in whose output is the output projection's bias: exactly what the masked model computes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from optin.surgery import head_rows, slice_linear

from .common import kept, slice_mlp, track


class HFNoHeads(nn.Module):
    """An HF attention (``o_proj`` layout) whose heads were all removed: outputs ``o_proj``'s bias."""

    def __init__(self, o_proj: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.o_proj, self.num_attention_heads, self.head_dim = o_proj, 0, head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.o_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


class TimmNoHeads(nn.Module):
    """A timm attention (``proj`` layout) whose heads were all removed: outputs ``proj``'s bias."""

    def __init__(self, proj: nn.Linear, head_dim: int) -> None:
        super().__init__()
        self.proj, self.num_heads, self.head_dim, self.attn_dim = proj, 0, head_dim, 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.proj(x.new_zeros(*x.shape[:-1], 0))


def _keep_bias_columns(owner: nn.Module, keep: list[int]) -> None:
    """Keep only the heads' columns ``keep`` of ``owner.relative_position_bias_table`` (Swin), if it has one."""
    table = getattr(owner, "relative_position_bias_table", None)
    if table is not None:
        owner.relative_position_bias_table = nn.Parameter(table[:, keep].clone(), requires_grad=table.requires_grad)


@torch.no_grad()
def slice_hf_heads(layer: nn.Module, keep: list[int]) -> None:
    """Keep only heads ``keep`` (indices into the current heads) of an HF layer's ``attention``, in place.
    With no head left the attention becomes ``HFNoHeads``."""
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
    bias = getattr(att, "relative_position_bias", None)
    if bias is not None:
        _keep_bias_columns(bias, keep)
    att.num_attention_heads = len(keep)


def timm_head_dim(block: nn.Module) -> int:
    """Features per head of a timm block's ``attn``."""
    attn = block.attn
    if isinstance(attn, TimmNoHeads):
        return attn.head_dim
    return attn.qkv.out_features // (3 * attn.num_heads)


@torch.no_grad()
def slice_timm_heads(block: nn.Module, keep: list[int]) -> None:
    """Keep only heads ``keep`` of a timm block's ``attn`` (ViT or Swin), in place (``TimmNoHeads`` when none)."""
    attn = block.attn
    d, n = timm_head_dim(block), int(attn.num_heads)
    rows = head_rows(keep, d)
    proj = slice_linear(attn.proj, in_idx=rows)
    if not keep:
        block.attn = TimmNoHeads(proj, d)
        return
    attn.qkv = slice_linear(attn.qkv, out_idx=torch.cat([rows + j * n * d for j in range(3)]))
    attn.proj = proj
    if getattr(attn, "gate", None) is not None:
        attn.gate = slice_linear(attn.gate, out_idx=rows)
    _keep_bias_columns(attn, keep)
    attn.num_heads = len(keep)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = len(keep) * d


@torch.no_grad()
def slice_mlp_neurons(block: nn.Module, keep: list[int] | torch.Tensor) -> None:
    """Keep only the MLP hidden neurons ``keep`` of a block (``mlp.fc1`` rows, ``mlp.fc2`` columns)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    block.mlp.fc1, block.mlp.fc2 = slice_mlp(block.mlp.fc1, block.mlp.fc2, keep)


SliceFn = Callable[[nn.Module, list[int]], None]


@torch.no_grad()
def prune_blocks(blocks: list[nn.Module], masks: dict[str, list[torch.Tensor]], kept_index: dict[str, list[list[int]]],
                 slice_heads: SliceFn, slice_neurons: SliceFn) -> None:
    """Physically remove the masked heads/neurons of every block with the layout's slicing functions and
    record the original indices kept (for the export plan)."""
    for i, block in enumerate(blocks):
        for kind, slice_fn in (("heads", slice_heads), ("neurons", slice_neurons)):
            if kind in masks:
                keep = kept(masks[kind][i]).tolist()
                slice_fn(block, keep)
                track(kept_index, kind, i, keep)
