"""Adapter for timm SwinTransformer image classifiers (Swin-T/S/B and custom sizes).

Units: attention heads and MLP hidden neurons of every block of every stage; the layer index runs over
the blocks in forward order (stage 0 block 0, stage 0 block 1, ..., last stage's last block). Heads are
masked by scaling their slice of the window-attention output entering ``attn.proj`` (the same for timm's
fused and unfused attention), neurons by scaling the activations entering ``mlp.fc2``. Removal slices
``qkv``/``proj``/the relative position bias table and ``fc1``/``fc2`` (see ``swin_blocks``). The
trajectory restarts the forward at a block from its cached input; a block's embedding is its ``mlp.fc2``
output flattened to (B, H*W, D). MACs count window attention on the padded map, patch embedding, patch
merging and the classifier.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.units import CostModel, UnitTensors

from . import swin_blocks as sb
from .common import HookedAdapter, cut_to_plan, trace_blocks
from .heads import prune_blocks, slice_mlp_neurons, slice_timm_heads, timm_head_dim
from .timm_io import TimmImageClassifier, claims_timm, timm_from_config


def _blocks_of(model: nn.Module) -> list[tuple[int, int, nn.Module]] | None:
    """(stage, index, block) of a timm SwinTransformer in forward order, or None if it is not one."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.Sequential) or not len(layers) or not hasattr(model, "patch_embed") \
            or not hasattr(model, "forward_head"):
        return None
    out = []
    for s, stage in enumerate(layers):
        blocks = getattr(stage, "blocks", None)
        if not isinstance(blocks, nn.Sequential) or not hasattr(stage, "downsample"):
            return None
        out += [(s, b, blk) for b, blk in enumerate(blocks)]
    if not out:
        return None
    first = out[0][2]
    attn, mlp = getattr(first, "attn", None), getattr(first, "mlp", None)
    ok = all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "relative_position_bias_table")) \
        and hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and hasattr(first, "input_resolution")
    return out if ok else None


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, D) or (B, N, D) -> (B, N, D) (older timm runs the MLP on the 2-D map)."""
    return x.flatten(1, -2) if x.dim() == 4 else x


class SwinAdapter(TimmImageClassifier, HookedAdapter):
    """timm SwinTransformer classifiers: attention heads and MLP neurons of every block."""

    name = "swin"
    sources = ("timm Swin: timm:swin* (hub weights, or --checkpoint FILE), folders written by "
               "timm.models.save_for_hf, optin timm folders (config.json timm_class SwinTransformer)")
    unit_kinds = ("heads", "neurons")

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        where = _blocks_of(model)
        if where is None:
            raise OptinError(f"{type(model).__name__} is not a timm SwinTransformer (layers[s].blocks[b].attn.qkv)")
        self.where = [(s, b) for s, b, _ in where]
        self.blocks = [blk for _, _, blk in where]
        self.stage_len = [len(stage.blocks) for stage in model.layers]
        self.head_dims = [timm_head_dim(blk) for blk in self.blocks]
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}

    # --- discovery -------------------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _blocks_of(model) is not None

    @classmethod
    def claims(cls, source: str) -> bool:
        return claims_timm(source, cls.handles, "swin")

    # --- data ------------------------------------------------------------------------------------
    def seq_len(self, batches: list[Batch]) -> float:
        h, w = self.blocks[0].input_resolution
        return float(h * w)

    # --- units -----------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        return {"heads": [int(b.attn.num_heads) for b in self.blocks],
                "neurons": [int(b.mlp.fc1.out_features) for b in self.blocks]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        return UnitSite(*sb.timm_mask_target(self.blocks[layer], kind))

    def embedding_module(self, z: int) -> nn.Module:
        return self.blocks[z].mlp.fc2

    def embedding_of(self, z: int, output: torch.Tensor) -> torch.Tensor:
        return _flat(output)

    def cost_model(self, seq_len: float | None = None) -> CostModel:
        heads, neurons = [], []
        for blk, d in zip(self.blocks, self.head_dims):
            h, w = blk.input_resolution
            hc, nc = sb.window_block_macs(h, w, blk.mlp.fc2.out_features, d, blk.window_size)
            heads.append(hc)
            neurons.append(nc)
        pe = self.model.patch_embed
        gh, gw = pe.grid_size
        fixed = gh * gw * pe.proj.out_channels * pe.proj.in_channels * math.prod(pe.proj.kernel_size)
        for stage in self.model.layers:
            red = getattr(stage.downsample, "reduction", None)
            if isinstance(red, nn.Linear):
                oh, ow = stage.output_resolution
                fixed += oh * ow * red.in_features * red.out_features
        fc = getattr(self.model.head, "fc", None)
        if isinstance(fc, nn.Linear):
            fixed += fc.in_features * fc.out_features
        return CostModel(per_unit={"heads": heads, "neurons": neurons}, counts=self.unit_counts(),
                         fixed=float(fixed), notes={"tokens": float(gh * gw)})

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        return {"heads": [sb.timm_head_weights(b) for b in self.blocks],
                "neurons": [sb.neuron_weights(b) for b in self.blocks]}

    # --- trajectory ------------------------------------------------------------------------------
    def _forward_from(self, x: torch.Tensor, z: int, skip_first: bool = False) -> torch.Tensor:
        """Run blocks z.. (``skip_first``: x is already block z's output) and the head. ``x`` is block z's
        input (after its stage's patch merging) as (B, H, W, C)."""
        layers = self.model.layers
        for i in range(z, len(self.blocks)):
            s, b = self.where[i]
            if b == 0 and i != z:
                x = layers[s].downsample(x)
            if not (skip_first and i == z):
                x = self.blocks[i](x)
        return self.model.forward_head(self.model.norm(x))

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        return trace_blocks(self.blocks, lambda: self.logits(batch), lambda b: b.norm2, lambda b: b.mlp.fc2, _flat)

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        reps = masks.shape[0]
        start = trace.state["starts"][layer]
        start = start.repeat(reps, *([1] * (start.dim() - 1)))
        with self.restart_hooks(kind, layer, masks, len(self.blocks), select) as collected:
            if kind == "neurons":  # restart inside the block: its MLP half only (timm's block forward)
                blk = self.blocks[layer]
                mid = trace.state["mids"][layer]
                x = mid.repeat(reps, *([1] * (mid.dim() - 1)))
                x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
                logits = self._forward_from(x.reshape(start.shape), layer, skip_first=True)
            else:
                logits = self._forward_from(start, layer)
        return dict(collected), logits

    # --- physical removal and persistence --------------------------------------------------------
    @torch.no_grad()
    def prune(self, masks: UnitTensors) -> None:
        prune_blocks(self.blocks, masks, self.kept_index, slice_timm_heads, slice_mlp_neurons)

    def plan(self) -> dict:
        return {"timm_config": self.timm_config(), "unit_counts": self.unit_counts(), "kept_index": self.kept_index}

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "SwinAdapter":
        cfg = plan.get("timm_config") or {}
        return cut_to_plan(cls(timm_from_config(cfg, "SwinTransformer"), cfg), plan)
