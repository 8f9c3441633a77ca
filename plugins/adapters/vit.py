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
import torch.nn.functional as F
from torch import nn

from optin.contracts import Batch, Reducer, TokenAdapter, TokenScorer, Trace, UnitSite
from optin.errors import OptinError
from optin.units import CostModel, UnitTensors

from .common import HookedAdapter, cut_to_plan, trace_blocks
from .heads import prune_blocks, slice_mlp_neurons, slice_timm_heads
from .timm_io import TimmImageClassifier, claims_timm, timm_from_config


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
    bias = None
    if sizes is not None:
        bias = sizes.log()[:, None, None, :].to(q.dtype)
    if key_mask is not None:
        km = torch.zeros(B, 1, 1, N, dtype=q.dtype).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        bias = km if bias is None else bias + km
    probs = None
    if need_probs:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(attn.norm(out))), k.mean(1), probs


class _ReducingBlock(nn.Module):
    """A timm Block that removes ``r`` tokens with a reducer between its attention and its MLP."""

    def __init__(self, block: nn.Module, layer: int, n_layers: int, r: int, reducer: Reducer,
                 token_scorer: TokenScorer | None, state: dict, protected: int, proportional: bool) -> None:
        super().__init__()
        self.block = block
        self.layer, self.n_layers, self.r = layer, n_layers, r
        self.reducer, self.token_scorer = reducer, token_scorer
        self.state, self.protected, self.proportional = state, protected, proportional

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        blk = self.block
        sizes = self.state.get("sizes")
        if sizes is None or sizes.shape[:2] != x.shape[:2] or self.layer == 0:
            sizes = x.new_ones(x.shape[0], x.shape[1])
        need_probs = self.r > 0 and self.reducer.needs_importance
        out, metric, probs = attention_forward(blk.attn, blk.norm1(x), sizes if self.proportional else None,
                                               need_probs)
        x = x + blk.drop_path1(blk.ls1(out))
        if self.r > 0:
            importance = None
            if self.reducer.needs_importance:
                if self.token_scorer is None or probs is None:
                    raise OptinError(f"reducer {self.reducer.name!r} needs a token scorer (e.g. --scorer wpr)")
                importance = self.token_scorer.token_importance(probs, self.layer, self.n_layers)
            left = self.r
            while left > 0:  # one bipartite merge removes at most about half the tokens: repeat
                n_before = x.shape[1]
                x, sizes = self.reducer.reduce(x, sizes, left, metric=metric, importance=importance,
                                               protected=self.protected)
                removed = n_before - x.shape[1]
                if removed <= 0:
                    raise OptinError(f"reducer {self.reducer.name!r} could not remove {left} more tokens at block "
                                     f"{self.layer} ({n_before} left)")
                left -= removed
                if left > 0:  # the similarity metric / importance must follow the remaining tokens
                    metric = None
                    if importance is not None:
                        _, _, probs = attention_forward(blk.attn, blk.norm1(x), None, True)
                        importance = self.token_scorer.token_importance(probs, self.layer, self.n_layers)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        self.state["sizes"] = sizes
        return x


def _options_of(plugin: Any) -> dict:
    """The plugin options an instance was built with (constructor arguments kept as attributes)."""
    if plugin is None:
        return {}
    from optin.registry import option_names

    return {k: getattr(plugin, k) for k in option_names(type(plugin)) if hasattr(plugin, k)}


class VitAdapter(TimmImageClassifier, HookedAdapter, TokenAdapter):
    """timm VisionTransformer (DeiT/ViT): attention heads, MLP neurons and tokens."""

    name = "vit"
    sources = ("timm ViT/DeiT: timm:NAME (hub weights, or --checkpoint FILE), folders written by "
               "timm.models.save_for_hf, optin timm folders (config.json timm_class VisionTransformer)")
    unit_kinds = ("heads", "neurons")

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

    def token_counts(self, removals: list[int] | None = None) -> tuple[list[int], list[int]]:
        """Tokens entering each block's attention and MLP under a schedule of removals per block."""
        removals = self.removals if removals is None else removals
        attn, mlp, n = [], [], self.n_tokens
        for r in removals:
            attn.append(n)
            n = max(self.protected + 1, n - int(r))
            mlp.append(n)
        return attn, mlp

    def cost_model(self, seq_len: float | None = None, removals: list[int] | None = None) -> CostModel:
        D, d = float(self.dim), float(self.head_dim)
        attn, mlp = self.token_counts(removals)
        pe = self.model.patch_embed.proj
        patches = self.n_tokens - self.protected
        fixed = patches * pe.out_channels * pe.in_channels * math.prod(pe.kernel_size)
        head = getattr(self.model, "head", None)
        if isinstance(head, nn.Linear):
            fixed += head.in_features * head.out_features
        dist = getattr(self.model, "head_dist", None)
        if isinstance(dist, nn.Linear):
            fixed += dist.in_features * dist.out_features
        return CostModel(per_unit={"heads": [4 * n * D * d + 2 * n * n * d for n in attn],
                                   "neurons": [2 * n * D for n in mlp]},
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
        """Remove token positions (mask 0) from block ``layer`` on, emulated exactly by letting no token
        attend to them; their own (meaningless) embeddings are replaced by the reference so that only
        the surviving tokens count in the trajectory."""
        reps, b = masks.shape[0], trace.logits.shape[0]
        keep = torch.cat([torch.ones(reps, self.protected), masks], 1).bool()  # (R, N)
        key_mask = keep.repeat_interleave(b, 0)  # (R*B, N)
        removed = ~key_mask
        collected: dict[int, torch.Tensor] = {}
        x = trace.state["starts"][layer].repeat(reps, 1, 1)
        for z in range(layer, len(self.blocks)):
            blk = self.blocks[z]
            out, _, _ = attention_forward(blk.attn, blk.norm1(x), None, False, key_mask)
            x = x + blk.drop_path1(blk.ls1(out))
            f = blk.mlp.fc2(blk.mlp.norm(blk.mlp.drop1(blk.mlp.act(blk.mlp.fc1(blk.norm2(x))))))
            ref = trace.embeddings[z].repeat(reps, 1, 1)
            collected[z] = select(torch.where(removed[..., None], ref, f))
            x = x + blk.drop_path2(blk.ls2(blk.mlp.drop2(f)))
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
    def _require_plain(self, what: str) -> None:
        if any(isinstance(b, _ReducingBlock) for b in self.model.blocks):
            raise OptinError(f"{what} needs the model without token reduction installed")

    def prune(self, masks: UnitTensors) -> None:
        if "neurons" in masks and any(not isinstance(b.mlp.norm, nn.Identity) for b in self.blocks):
            raise OptinError("MLPs with a hidden-layer norm (scale_mlp_norm) cannot be pruned")
        prune_blocks(self.blocks, masks, self.kept_index, slice_timm_heads, slice_mlp_neurons)

    # --- tokens ----------------------------------------------------------------------------------
    def install_reducer(self, reducer: Reducer, removals: list[int], token_scorer: TokenScorer | None = None,
                        proportional: bool = True) -> None:
        """Run ``reducer`` in every block with ``removals[l] > 0`` tokens removed there (0 everywhere =
        exactly the original model)."""
        if len(removals) != len(self.blocks):
            raise OptinError(f"a token schedule needs one entry per block ({len(self.blocks)}), got {len(removals)}")
        attn, mlp = self.token_counts(removals)
        removals = [a - m for a, m in zip(attn, mlp)]  # at least one non-protected token always stays
        state: dict = {}
        n = len(self.blocks)
        self.model.blocks = nn.Sequential(*[
            _ReducingBlock(b, i, n, int(r), reducer, token_scorer, state, self.protected, proportional)
            for i, (b, r) in enumerate(zip(self.blocks, removals))])
        self.removals = [int(r) for r in removals]
        self.reducer_spec = {"reducer": reducer.name, "options": _options_of(reducer),
                             "token_scorer": getattr(token_scorer, "name", None),
                             "token_scorer_options": _options_of(token_scorer), "proportional": proportional}

    def remove_reducer(self) -> None:
        self.model.blocks = nn.Sequential(*self.blocks)
        self.removals = [0] * len(self.blocks)
        self.reducer_spec = None

    # --- persistence -----------------------------------------------------------------------------
    def plan(self) -> dict:
        return {"timm_config": self.timm_config(), "unit_counts": self.unit_counts(), "kept_index": self.kept_index,
                "removals": self.removals, "reducer": self.reducer_spec}

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "VitAdapter":
        cfg = plan.get("timm_config") or {}
        adapter = cut_to_plan(cls(timm_from_config(cfg, "VisionTransformer"), cfg), plan)
        spec = plan.get("reducer")
        if spec:  # the token schedule is part of the architecture: reinstall it
            from optin import registry

            ts = registry.create("scorer", spec["token_scorer"], spec.get("token_scorer_options") or {}) \
                if spec.get("token_scorer") else None
            adapter.install_reducer(registry.create("reducer", spec["reducer"], spec.get("options") or {}),
                                    plan["removals"], ts, spec.get("proportional", True))
        return adapter
