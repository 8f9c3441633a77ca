"""Adapter for timm VisionTransformer models (DeiT, ViT: class and distillation tokens).

Units: attention heads and MLP hidden neurons per block, as for BERT. Heads are masked by scaling their
slice of the attention output entering ``attn.proj`` (valid for timm's fused and unfused attention, which
only differ before that point), neurons by scaling the activations entering ``mlp.fc2``. Physical
removal slices ``qkv``/``proj`` and ``fc1``/``fc2``. Token reduction wraps each block so that a reducer
runs between attention and MLP on a per-layer schedule (ToMe's placement), with size tracking and
proportional attention.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.units import CostModel, UnitTensors

from .common import HookedAdapter, cut_to_plan, trace_blocks
from .heads import prune_blocks, slice_mlp_neurons, slice_timm_heads
from .timm_io import TimmImageClassifier, claims_timm, timm_from_config
from .tokens import Halves, ReducibleTokens, attend


def _is_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0 or not hasattr(model, "patch_embed"):
        return False
    b = blocks[0]
    b = getattr(b, "block", b)
    attn, mlp = getattr(b, "attn", None), getattr(b, "mlp", None)
    return all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads", "head_dim")) and \
        hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and hasattr(model, "forward_head") and \
        isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)


def attention_forward(attn: nn.Module, x: torch.Tensor, sizes: torch.Tensor | None, need_probs: bool,
                      key_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """timm attention with ToMe's proportional attention (log token sizes added to the logits).

    Returns (output (B,N,D), metric = keys averaged over heads (B,N,d), attention probs or None).
    ``key_mask`` (B, N) bool, False = this token may not be attended to (token removal by masking).
    """
    B, N, _ = x.shape
    if attn.num_heads == 0:
        return attn(x), x, None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, probs = attend(q, k, v, attn.scale, sizes, need_probs, key_mask)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(attn.norm(out))), k.mean(1), probs


def _attention_half(blk: nn.Module, x: torch.Tensor, sizes: torch.Tensor | None, need_probs: bool,
                    key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    out, metric, probs = attention_forward(blk.attn, blk.norm1(x), sizes, need_probs, key_mask)
    return x + blk.drop_path1(blk.ls1(out)), metric, probs


def _mlp_half(blk: nn.Module, x: torch.Tensor, embedding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not embedding:
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), None
    f = blk.mlp.fc2(blk.mlp.norm(blk.mlp.drop1(blk.mlp.act(blk.mlp.fc1(blk.norm2(x))))))
    return x + blk.drop_path2(blk.ls2(blk.mlp.drop2(f))), f


TIMM_HALVES = Halves(_attention_half, _mlp_half)  # a timm Block's attention and MLP halves


class VitAdapter(TimmImageClassifier, HookedAdapter, ReducibleTokens):
    """timm VisionTransformer (DeiT/ViT): attention heads, MLP neurons and tokens."""

    name = "vit"
    sources = ("timm ViT/DeiT: timm:NAME (hub weights, or --checkpoint FILE), folders written by "
               "timm.models.save_for_hf, optin timm folders (config.json timm_class VisionTransformer)")
    unit_kinds = ("heads", "neurons")
    halves = TIMM_HALVES

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        if not _is_vit(model):
            raise OptinError(f"{type(model).__name__} is not a timm VisionTransformer with standard blocks")
        self.blocks = [getattr(b, "block", b) for b in model.blocks]
        self.protected = int(getattr(model, "num_prefix_tokens", 1))
        grid = model.patch_embed.grid_size
        self.n_tokens = int(grid[0] * grid[1]) + self.protected
        self.dim = int(model.embed_dim)
        self.head_dim = int(self.blocks[0].attn.head_dim)
        self.removals = [0] * len(self.blocks)
        self.reducer_spec: dict | None = None
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}

    # --- discovery -------------------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _is_vit(model)

    @classmethod
    def claims(cls, source: str) -> bool:
        return claims_timm(source, _is_vit, "vit")

    # --- data ------------------------------------------------------------------------------------
    def seq_len(self, batches: list[Batch]) -> float:
        return float(self.n_tokens)

    # --- units -----------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        return {"heads": [int(b.attn.num_heads) for b in self.blocks],
                "neurons": [int(b.mlp.fc1.out_features) for b in self.blocks]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        b = self.blocks[layer]
        if kind == "heads":
            return UnitSite(b.attn.proj, self.head_dim)
        return UnitSite(b.mlp.fc2)

    def cost_model(self, seq_len: float | None = None, removals: list[int] | None = None) -> CostModel:
        pe = self.model.patch_embed.proj
        patches = self.n_tokens - self.protected
        fixed = patches * pe.out_channels * pe.in_channels * math.prod(pe.kernel_size)
        head = getattr(self.model, "head", None)
        if isinstance(head, nn.Linear):
            fixed += head.in_features * head.out_features
        dist = getattr(self.model, "head_dist", None)
        if isinstance(dist, nn.Linear):
            fixed += dist.in_features * dist.out_features
        return CostModel(per_unit=self.token_unit_costs(float(self.dim), float(self.head_dim), removals),
                         counts=self.unit_counts(), fixed=float(fixed), notes={"tokens": float(self.n_tokens)})

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        heads, neurons = [], []
        d, D = self.head_dim, self.dim
        for b in self.blocks:
            n = int(b.attn.num_heads)
            if n:
                qkv = b.attn.qkv.weight.reshape(3, n, d, D).permute(1, 0, 2, 3).reshape(n, -1)
                proj = b.attn.proj.weight.reshape(D, n, d).permute(1, 0, 2).reshape(n, -1)
                heads.append(torch.cat([qkv, proj], 1).detach())
            else:
                heads.append(torch.zeros(0, 4 * d * D))
            neurons.append(torch.cat([b.mlp.fc1.weight, b.mlp.fc2.weight.t()], 1).detach())
        return {"heads": heads, "neurons": neurons}

    # --- trajectory ------------------------------------------------------------------------------
    def _tail(self, x: torch.Tensor, start: int) -> torch.Tensor:
        for blk in self.model.blocks[start:]:
            x = blk(x)
        return self.model.forward_head(self.model.norm(x))

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        self._require_plain("trajectory scoring")
        return trace_blocks(self.blocks, lambda: self.logits(batch), lambda b: b.norm2, lambda b: b.mlp.fc2)

    def embedding_module(self, z: int) -> nn.Module:
        return self.blocks[z].mlp.fc2

    def _run_tokens_removed(self, trace: Trace, layer: int, masks: torch.Tensor,
                            select: Callable[[torch.Tensor], torch.Tensor]
                            ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Token positions removed from block ``layer`` on (``ReducibleTokens.tokens_removed``), then the head."""
        collected, x = self.tokens_removed(trace.state["starts"][layer], layer, masks, trace.embeddings, select)
        return collected, self.model.forward_head(self.model.norm(x))

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        if kind == "tokens":
            return self._run_tokens_removed(trace, layer, masks, select)
        reps = masks.shape[0]
        with self.restart_hooks(kind, layer, masks, len(self.blocks), select) as collected:
            if kind == "neurons":  # restart inside the block: the MLP half only
                blk = self.blocks[layer]
                x = trace.state["mids"][layer].repeat(reps, 1, 1)
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
                logits = self._tail(x, layer + 1)
            else:
                logits = self._tail(trace.state["starts"][layer].repeat(reps, 1, 1), layer)
        return dict(collected), logits

    # --- physical removal ------------------------------------------------------------------------
    def prune(self, masks: UnitTensors) -> None:
        if "neurons" in masks and any(not isinstance(b.mlp.norm, nn.Identity) for b in self.blocks):
            raise OptinError("MLPs with a hidden-layer norm (scale_mlp_norm) cannot be pruned")
        prune_blocks(self.blocks, masks, self.kept_index, slice_timm_heads, slice_mlp_neurons)

    # --- tokens (ReducibleTokens) -----------------------------------------------------------------
    def _set_blocks(self, modules: list[nn.Module]) -> None:
        self.model.blocks = nn.Sequential(*modules)

    # --- persistence -----------------------------------------------------------------------------
    def plan(self) -> dict:
        return {"timm_config": self.timm_config(), "unit_counts": self.unit_counts(), "kept_index": self.kept_index,
                **self.token_plan()}

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "VitAdapter":
        cfg = plan.get("timm_config") or {}
        adapter = cut_to_plan(cls(timm_from_config(cfg, "VisionTransformer"), cfg), plan)
        adapter.reinstall(plan)  # the token schedule is part of the architecture
        return adapter
