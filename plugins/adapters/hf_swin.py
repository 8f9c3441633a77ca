"""Adapter for HF transformers Swin image classifiers (``SwinForImageClassification``).

Units: attention heads (masked at the input of ``attention.o_proj``) and MLP neurons (at the input of
``mlp.fc2``) of every ``SwinLayer`` of every stage; layer index = block in forward order across stages.
The trajectory restarts at a block from its cached input (neurons: at its MLP, from the cached residual)
and runs the remaining blocks, patch mergings, final LayerNorm, pooling and classifier. A block's
embedding is its ``mlp.fc2`` output (B, H*W, D). MACs count window attention on the padded map (see
``swin_blocks.window_block_macs``), patch embedding, patch merging and the classifier.
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
from .common import (HFImageClassifier, HookedAdapter, config_json, cut_to_plan, hf_model_from_plan, hf_plan,
                     trace_blocks)
from .heads import prune_blocks, slice_hf_heads, slice_mlp_neurons


def _swin_of(model: nn.Module) -> nn.Module | None:
    """The ``SwinModel`` inside a classifier, or None when the model does not have that layout."""
    swin = getattr(model, "swin", None)
    layers = getattr(getattr(swin, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not hasattr(model, "classifier"):
        return None
    blocks = getattr(layers[0], "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    att, mlp = getattr(blocks[0], "attention", None), getattr(blocks[0], "mlp", None)
    ok = all(hasattr(att, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias")) \
        and hasattr(mlp, "fc2") and hasattr(getattr(swin, "embeddings", None), "patch_embeddings")
    return swin if ok else None


class HFSwinAdapter(HFImageClassifier, HookedAdapter):
    """HF transformers SwinForImageClassification: attention heads and MLP neurons of every block."""

    name = "hf-swin"
    sources = "HF folders, config.json model_type swin with SwinForImageClassification"
    unit_kinds = ("heads", "neurons")

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        swin = _swin_of(model)
        if swin is None:
            raise OptinError(f"{type(model).__name__} is not an HF Swin classifier "
                             "(swin.encoder.layers[s].blocks[b].attention.q_proj + classifier)")
        self.swin = swin
        self.grid = tuple(int(g) for g in swin.embeddings.patch_embeddings.grid_size)
        self.infos = sb.hf_swin_blocks(swin.encoder, self.grid)
        self.blocks = [i.block for i in self.infos]
        self.head_dims = [sb.hf_head_dim(b) for b in self.blocks]
        for info in self.infos:  # transformers clamps the window but not the bias table: its forward fails
            bias = getattr(info.block.attention, "relative_position_bias", None)  # absent once all heads go
            table = info.window if bias is None else int(bias.window_size[0])
            if info.window != table:
                raise OptinError(f"stage {info.stage} runs on a {info.resolution[0]}x{info.resolution[1]} map, "
                                 f"smaller than the window {table}: transformers' Swin cannot run it; use a larger "
                                 "image_size or a smaller window_size (or fewer stages)")
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}

    # --- discovery -------------------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _swin_of(model) is not None and hasattr(model, "config")

    @classmethod
    def claims(cls, source: str) -> bool:
        data = config_json(source) or {}
        archs = data.get("architectures") or ["SwinForImageClassification"]
        return data.get("model_type") == "swin" and "SwinForImageClassification" in archs

    def seq_len(self, batches: list[Batch]) -> float:
        return float(self.grid[0] * self.grid[1])

    # --- units -----------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        return {"heads": [sb.hf_head_count(b) for b in self.blocks],
                "neurons": [int(b.mlp.fc1.out_features) for b in self.blocks]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        return UnitSite(*sb.hf_mask_target(self.blocks[layer], kind))

    def embedding_module(self, z: int) -> nn.Module:
        return self.blocks[z].mlp.fc2

    def cost_model(self, seq_len: float | None = None) -> CostModel:
        per = [sb.hf_block_macs(i) for i in self.infos]
        proj = self.swin.embeddings.patch_embeddings.projection
        fixed = self.grid[0] * self.grid[1] * proj.out_channels * proj.in_channels * math.prod(proj.kernel_size)
        fixed += sb.hf_merging_macs(self.swin.encoder, self.grid)
        if isinstance(self.model.classifier, nn.Linear):
            fixed += self.model.classifier.in_features * self.model.classifier.out_features
        return CostModel(per_unit={"heads": [h for h, _ in per], "neurons": [n for _, n in per]},
                         counts=self.unit_counts(), fixed=float(fixed),
                         notes={"tokens": float(self.grid[0] * self.grid[1])})

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        return {"heads": [sb.hf_head_weights(b) for b in self.blocks],
                "neurons": [sb.neuron_weights(b) for b in self.blocks]}

    # --- trajectory ------------------------------------------------------------------------------
    def _forward_from(self, x: torch.Tensor, z: int, skip_first: bool = False) -> torch.Tensor:
        """Run blocks z.. (``skip_first``: x is already block z's output), the patch mergings after each
        stage's last block, and the head (LayerNorm, average pool, classifier), as SwinModel does."""
        stages = self.swin.encoder.layers
        for i in range(z, len(self.infos)):
            info = self.infos[i]
            if not (skip_first and i == z):
                x = info.block(x, info.resolution)[0]
            stage = stages[info.stage]
            if info.index == len(stage.blocks) - 1 and stage.downsample is not None:
                x = stage.downsample(x, info.resolution)
        x = self.swin.layernorm(x)
        return self.model.classifier(torch.flatten(self.swin.pooler(x.transpose(1, 2)), 1))

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        return trace_blocks(self.blocks, lambda: self.logits(batch), lambda b: b.layernorm_after,
                            lambda b: b.mlp.fc2)

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        reps = masks.shape[0]
        with self.restart_hooks(kind, layer, masks, len(self.blocks), select) as collected:
            if kind == "neurons":  # restart at the block's MLP from the cached residual
                blk = self.blocks[layer]
                x = trace.state["mids"][layer].repeat(reps, 1, 1)
                x = blk.dropout(blk.mlp(blk.layernorm_after(x))) + x
                logits = self._forward_from(x, layer, skip_first=True)
            else:
                logits = self._forward_from(trace.state["starts"][layer].repeat(reps, 1, 1), layer)
        return dict(collected), logits

    # --- physical removal and persistence --------------------------------------------------------
    @torch.no_grad()
    def prune(self, masks: UnitTensors) -> None:
        prune_blocks(self.blocks, masks, self.kept_index, slice_hf_heads, slice_mlp_neurons)

    def plan(self) -> dict:
        return hf_plan(self)

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "HFSwinAdapter":
        from .image_io import hf_image_processor

        return cut_to_plan(cls(hf_model_from_plan(plan), hf_image_processor(directory)), plan)
