"""Token reduction in vision transformers, shared by the ViT adapters (timm ``vit``, HF ``hf-vit``).

A reducer runs in every block between attention and MLP (ToMe's placement) on a per-block schedule, with
token sizes (how many patches a token stands for) and proportional attention (``log size`` added to the
attention logits). An adapter describes its blocks by ``Halves``: how a block's attention half and MLP half
run on a token tensor; everything else is here: the attention with sizes and key masks (``attend``), the
schedule and the blocks standing in for a model's blocks (``Schedule``, ``ReducingBlock``), the schedule's token counts, installing, removing and re-installing a
reducer from a plan (``ReducibleTokens``), and the exact emulation of removed token positions that the
token trajectory (OPTIN A.9) restarts with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from optin.contracts import Reducer, TokenAdapter, TokenScorer
from optin.errors import OptinError

# (block, x, sizes or None, need_probs, key_mask or None) -> (x after the attention residual, metric, probs)
AttentionHalf = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", bool, "torch.Tensor | None"],
                         tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]
# (block, x, embedding) -> (x after the MLP residual, the MLP's output (the trajectory embedding) if asked, else None)
MlpHalf = Callable[[nn.Module, torch.Tensor, bool], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Halves:
    """How one layout's block runs in two halves (eval mode), for reducing and removing tokens between them."""

    attention: AttentionHalf
    mlp: MlpHalf


def attention_bias(sizes: torch.Tensor | None, key_mask: torch.Tensor | None, dtype: torch.dtype
                   ) -> torch.Tensor | None:
    """The additive attention bias (B, 1, 1, N): ``log size`` (proportional attention) and ``-inf`` where
    ``key_mask`` (B, N) is False (a token nobody may attend to); None when neither is given."""
    bias = None
    if sizes is not None:
        bias = sizes.log()[:, None, None, :].to(dtype)
    if key_mask is not None:
        km = torch.zeros(key_mask.shape[0], 1, 1, key_mask.shape[1], dtype=dtype, device=key_mask.device)
        km = km.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        bias = km if bias is None else bias + km
    return bias


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sizes: torch.Tensor | None,
           need_probs: bool, key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention of (B, H, N, d) queries, keys and values with ``attention_bias``: the output
    (B, N, H*d) and the attention probabilities (B, H, N, N) when ``need_probs`` (else fused, None)."""
    B, H, N, d = q.shape
    bias = attention_bias(sizes, key_mask, q.dtype)
    probs = None
    if need_probs:
        logits = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(-1)
        out = probs @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(B, N, H * d), probs


class Schedule:
    """The blocks of a model run in order, each removing ``removals[l]`` tokens with a reducer between its
    attention half and its MLP half. The token sizes pass from block to block within one call (no state is
    kept between calls, so the whole schedule traces as one function)."""

    def __init__(self, blocks: list[nn.Module], halves: Halves, removals: list[int], reducer: Reducer,
                 token_scorer: TokenScorer | None, protected: int, proportional: bool) -> None:
        self.blocks, self.halves, self.removals = list(blocks), halves, [int(r) for r in removals]
        self.reducer, self.token_scorer = reducer, token_scorer
        self.protected, self.proportional = protected, proportional

    def run(self, x: torch.Tensor) -> torch.Tensor:
        sizes = x.new_ones(x.shape[0], x.shape[1])
        for layer, (blk, r) in enumerate(zip(self.blocks, self.removals)):
            x, sizes = self.block(layer, blk, r, x, sizes)
        return x

    def block(self, layer: int, blk: nn.Module, r: int, x: torch.Tensor, sizes: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``layer`` removing ``r`` tokens: the new tokens and sizes."""
        attention, n_layers = self.halves.attention, len(self.blocks)
        need_probs = r > 0 and self.reducer.needs_importance
        x, metric, probs = attention(blk, x, sizes if self.proportional else None, need_probs, None)
        if r > 0:
            importance = None
            if self.reducer.needs_importance:
                if self.token_scorer is None or probs is None:
                    raise OptinError(f"reducer {self.reducer.name!r} needs a token scorer (e.g. --scorer wpr)")
                importance = self.token_scorer.token_importance(probs, layer, n_layers)
            left = r
            while left > 0:  # one bipartite merge removes at most about half the tokens: repeat
                n_before = x.shape[1]
                x, sizes = self.reducer.reduce(x, sizes, left, metric=metric, importance=importance,
                                               protected=self.protected)
                removed = n_before - x.shape[1]
                if removed <= 0:
                    raise OptinError(f"reducer {self.reducer.name!r} could not remove {left} more tokens at block "
                                     f"{layer} ({n_before} left)")
                left -= removed
                if left > 0:  # the similarity metric / importance must follow the remaining tokens
                    metric = None
                    if importance is not None:
                        probs = attention(blk, x, None, True, None)[2]
                        importance = self.token_scorer.token_importance(probs, layer, n_layers)
        x, _ = self.halves.mlp(blk, x, False)
        return x, sizes


class ReducingBlock(nn.Module):
    """Stands in for one block while a token schedule is installed (its weights stay under ``block``): the
    first one runs the whole ``Schedule``, the others pass its result on."""

    def __init__(self, block: nn.Module, schedule: Schedule | None) -> None:
        super().__init__()
        self.block = block
        self.schedule = schedule  # a plain attribute: the blocks it runs are registered by their own wrappers

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x if self.schedule is None else self.schedule.run(x)


def options_of(plugin: Any) -> dict:
    """The plugin options an instance was built with (constructor arguments kept as attributes)."""
    if plugin is None:
        return {}
    from optin.registry import option_names

    return {k: getattr(plugin, k) for k in option_names(type(plugin)) if hasattr(plugin, k)}


class ReducibleTokens(TokenAdapter):
    """What a ViT adapter with token reduction shares. It sets ``blocks`` (the plain blocks), ``n_tokens``,
    ``protected``, ``removals`` (zeros) and ``reducer_spec`` (None), and implements ``halves`` and
    ``_set_blocks`` (put modules in the place of the model's blocks)."""

    blocks: list[nn.Module]
    reducer_spec: dict | None
    halves: Halves

    def _set_blocks(self, modules: list[nn.Module]) -> None:
        raise NotImplementedError

    def token_counts(self, removals: list[int] | None = None) -> tuple[list[int], list[int]]:
        """Tokens entering each block's attention and MLP under a schedule of removals per block."""
        removals = self.removals if removals is None else removals
        attn, mlp, n = [], [], self.n_tokens
        for r in removals:
            attn.append(n)
            n = max(self.protected + 1, n - int(r))
            mlp.append(n)
        return attn, mlp

    def token_unit_costs(self, dim: float, head_dim: float, removals: list[int] | None = None
                         ) -> dict[str, list[float]]:
        """MACs per head (``4·Na·D·d + 2·Na²·d``) and per MLP neuron (``2·Nm·D``) of every block, with Na/Nm
        the tokens entering its attention/MLP under ``removals`` (default: the installed schedule)."""
        attn, mlp = self.token_counts(removals)
        return {"heads": [4 * n * dim * head_dim + 2 * n * n * head_dim for n in attn],
                "neurons": [2 * n * dim for n in mlp]}

    def reducing(self) -> bool:
        """True while a reducer is installed."""
        return self.reducer_spec is not None

    def _require_plain(self, what: str) -> None:
        if self.reducing():
            raise OptinError(f"{what} needs the model without token reduction installed")

    def install_reducer(self, reducer: Reducer, removals: list[int], token_scorer: TokenScorer | None = None,
                        proportional: bool = True) -> None:
        """Run ``reducer`` in every block with ``removals[l] > 0`` tokens removed there (0 everywhere =
        exactly the original model)."""
        if len(removals) != len(self.blocks):
            raise OptinError(f"a token schedule needs one entry per block ({len(self.blocks)}), got {len(removals)}")
        attn, mlp = self.token_counts(removals)
        removals = [a - m for a, m in zip(attn, mlp)]  # at least one non-protected token always stays
        schedule = Schedule(list(self.blocks), self.halves, removals, reducer, token_scorer, self.protected,
                            proportional)
        self._set_blocks([ReducingBlock(b, schedule if i == 0 else None) for i, b in enumerate(self.blocks)])
        self.removals = [int(r) for r in removals]
        self.reducer_spec = {"reducer": reducer.name, "options": options_of(reducer),
                             "token_scorer": getattr(token_scorer, "name", None),
                             "token_scorer_options": options_of(token_scorer), "proportional": proportional}

    def remove_reducer(self) -> None:
        self._set_blocks(list(self.blocks))
        self.removals = [0] * len(self.blocks)
        self.reducer_spec = None

    def token_plan(self) -> dict:
        """The installed schedule, for the export plan (``reinstall`` reads it back)."""
        return {"removals": self.removals, "reducer": self.reducer_spec}

    def reinstall(self, plan: dict) -> None:
        """Install the reducer a plan records (the token schedule is part of the architecture)."""
        spec = plan.get("reducer")
        if not spec:
            return
        from optin import registry

        ts = registry.create("scorer", spec["token_scorer"], spec.get("token_scorer_options") or {}) \
            if spec.get("token_scorer") else None
        self.install_reducer(registry.create("reducer", spec["reducer"], spec.get("options") or {}),
                             plan["removals"], ts, spec.get("proportional", True))

    def tokens_removed(self, start: torch.Tensor, layer: int, masks: torch.Tensor, reference: list[torch.Tensor],
                       select: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Remove token positions (mask 0 in ``masks`` (R, token_units)) from block ``layer`` on, emulated
        exactly by letting no token attend to them, starting from block ``layer``'s input ``start`` (B, N, D);
        their own (meaningless) embeddings are replaced by the ``reference`` (the unmasked embeddings per
        block), so that only the surviving tokens count in the trajectory. Returns ``{z: select(embedding)}``
        and the last block's output (R*B, N, D)."""
        reps, b = masks.shape[0], start.shape[0]
        keep = torch.cat([torch.ones(reps, self.protected, device=masks.device), masks], 1).bool()  # (R, N)
        key_mask = keep.repeat_interleave(b, 0).to(start.device)  # (R*B, N)
        removed = ~key_mask
        collected: dict[int, torch.Tensor] = {}
        x = start.repeat(reps, 1, 1)
        for z in range(layer, len(self.blocks)):
            blk = self.blocks[z]
            x, _, _ = self.halves.attention(blk, x, None, False, key_mask)
            x, f = self.halves.mlp(blk, x, True)
            ref = reference[z].repeat(reps, 1, 1)
            collected[z] = select(torch.where(removed[..., None], ref, f))
        return collected, x
