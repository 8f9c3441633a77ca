"""Zero-TPrune (Wang, Dedhia, Jha, CVPR 2024): token importance by Weighted PageRank (DESIGN.md 3.6).

A block's attention probabilities are a graph per head: query i gives token j the weight A[i, j]. A
token is important when important tokens attend to it, so the importance s solves s = A^T s, found by
power iteration from a uniform start with the class token started sqrt(N) times larger (it is the
token the prediction reads). Heads are combined by root-mean-square (EIR, emphasising heads that single
out a few tokens), skipping heads whose score variance is outside [var_low, var_high] (VHF: a flat head
says nothing, a head locked onto one token is degenerate); all heads are kept when none passes.

This scorer ranks *tokens* at run time (``token_importance``, used by ``--reducer prune``); it does not
score heads or neurons, so its ``score`` raises ``NotImplementedError``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer, TokenScorer
from optin.errors import OptinError
from optin.units import UnitTensors

from optin_plugins.searchers.token_schedule import REFERENCE_LAYERS, REFERENCE_RETENTION, scaled_layers


def weighted_pagerank(attn: torch.Tensor, iterations: int, cls_boost: bool = True) -> torch.Tensor:
    """Power iteration ``s <- A^T s`` on attention ``attn`` (B, H, N, N) -> scores (B, H, N).

    Rows of ``attn`` are queries and columns keys: ``s_new[j] = sum_i A[i, j] s[i]``, the attention token
    j receives weighted by the importance of who attends. The start is uniform 1/N, the class token
    (index 0) ``sqrt(N)`` times larger when ``cls_boost``, renormalised to sum 1. Softmax rows sum to 1,
    so every iterate sums to 1 (a distribution over tokens). Computed in at least float32.
    """
    B, H, N, _ = attn.shape
    dtype = torch.promote_types(attn.dtype, torch.float32)
    a = attn.to(dtype)
    s0 = torch.ones(N, dtype=dtype, device=attn.device)
    if cls_boost:
        s0[0] = math.sqrt(N)
    s = (s0 / s0.sum()).expand(B, H, N)
    for _ in range(int(iterations)):
        s = (s.unsqueeze(-2) @ a).squeeze(-2)  # (B, H, 1, N) @ (B, H, N, N): sum over queries i
    return s.contiguous()


def iterations_for_layer(layer: int, n_layers: int) -> int:
    """Zero-TPrune's iteration counts: 30 in the first three blocks, 1 in the last three, 5 between
    (``layer`` counts from 0; in models with fewer than six blocks the first-three rule wins)."""
    if layer < 3:
        return 30
    if layer >= n_layers - 3:
        return 1
    return 5


def head_variance(scores: torch.Tensor) -> torch.Tensor:
    """Variance (population, over tokens) of each head's N-scaled scores ``s * N``: (B, H, N) -> (B, H).

    Scaling by N makes the value independent of the token count: uniform scores give 0 whatever N, and
    a head whose scores are a probability distribution has mean 1 after scaling.
    """
    n = scores.shape[-1]
    return (scores * n).var(dim=-1, unbiased=False)


def combine_heads(scores: torch.Tensor, low: float = 0.01, high: float = 0.7) -> torch.Tensor:
    """EIR with VHF: root-mean-square over the heads whose ``head_variance`` is in [low, high].

    ``scores`` (B, H, N) -> (B, N). The selection is per example; an example where no head passes uses
    all heads.
    """
    var = head_variance(scores)
    keep = (var >= low) & (var <= high)  # (B, H)
    keep = keep | ~keep.any(dim=-1, keepdim=True)  # every head where none passes (as ONNX-friendly logic)
    w = keep.to(scores.dtype).unsqueeze(-1)
    return ((scores.square() * w).sum(dim=1) / w.sum(dim=1)).sqrt()


class WPRScorer(Scorer, TokenScorer):
    """Zero-TPrune: run-time token importance by Weighted PageRank on attention (use with --reducer prune)."""

    name = "wpr"

    def __init__(self, pruning_layers: Sequence[int] | None = None, retention: Sequence[float] | None = None,
                 similarity_tokens: int = 10, var_low: float = 0.01, var_high: float = 0.7) -> None:
        try:
            # unset: Zero-TPrune's reference pattern (blocks 1, 3, 6, 9, 11 of 12) moved to the model's depth
            self.pruning_layers = None if pruning_layers is None else [int(v) for v in pruning_layers]
            self.retention = [float(v) for v in (REFERENCE_RETENTION if retention is None else retention)]
            self.retention_set = retention is not None
            self.similarity_tokens = int(similarity_tokens)
            self.var_low, self.var_high = float(var_low), float(var_high)
        except (TypeError, ValueError) as exc:
            raise OptinError(f"wpr scorer: bad option value ({exc}); pruning_layers is a list of block "
                             "indices, retention a list of fractions, similarity_tokens an integer") from None
        layers = list(REFERENCE_LAYERS) if self.pruning_layers is None else self.pruning_layers
        if len(layers) != len(self.retention):
            raise OptinError(f"wpr scorer: pruning_layers ({len(layers)} entries"
                             f"{', the reference pattern' if self.pruning_layers is None else ''}) and retention "
                             f"({len(self.retention)} entries) must have the same length")
        if len(set(layers)) != len(layers) or any(v < 0 for v in layers):
            raise OptinError(f"wpr scorer: pruning_layers must be distinct block indices >= 0, "
                             f"got {self.pruning_layers}")
        if any(not 0.0 < v <= 1.0 for v in self.retention):
            raise OptinError(f"wpr scorer: every retention must be in (0, 1], got {self.retention}")
        if self.similarity_tokens < 0:
            raise OptinError(f"wpr scorer: similarity_tokens must be >= 0, got {self.similarity_tokens}")
        if not 0.0 <= self.var_low <= self.var_high:
            raise OptinError(f"wpr scorer: need 0 <= var_low <= var_high, got {self.var_low}, {self.var_high}")

    def method_options(self) -> dict:
        """Zero-TPrune: the token-schedule searcher prunes at given layers (``schedule=layers``: this
        scorer's pattern when set, else the reference pattern moved to the model's depth) and the prune
        reducer runs the similarity stage on ``similarity_tokens`` tokens."""
        return {"schedule": "layers", "similarity_tokens": self.similarity_tokens}

    def describe(self) -> dict:
        """The options; ``pruning_layers`` None means Zero-TPrune's reference pattern scaled to the model's depth
        (``layer_pattern``), ``retention`` None its reference retentions."""
        return {"pruning_layers": None if self.pruning_layers is None else list(self.pruning_layers),
                "retention": list(self.retention) if self.retention_set else None,
                "similarity_tokens": self.similarity_tokens, "var_low": self.var_low, "var_high": self.var_high}

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        raise NotImplementedError("wpr ranks tokens at run time; use it with --reducer prune "
                                  "(it does not score heads or neurons)")

    def token_importance(self, attn: torch.Tensor, layer: int, n_layers: int) -> torch.Tensor:
        """Attention probabilities (B, H, N, N) of block ``layer`` -> WPR importance (B, N), higher = keep."""
        scores = weighted_pagerank(attn, iterations_for_layer(layer, n_layers))
        return combine_heads(scores, self.var_low, self.var_high)

    def layer_pattern(self, n_layers: int) -> tuple[list[int], list[float]]:
        """Pruning blocks and retentions for a model of ``n_layers`` blocks: the ``pruning_layers`` given, or
        Zero-TPrune's reference pattern for 12 blocks moved to this depth (``scaled_layers``: block l goes to
        ``round(l * (n_layers - 1) / 11)``; retentions landing on one block multiply) - the same rule as the
        token-schedule searcher's."""
        if self.pruning_layers is None:
            return scaled_layers(REFERENCE_LAYERS, self.retention, n_layers)
        return list(self.pruning_layers), list(self.retention)

    def schedule(self, n_tokens: int, n_layers: int, protected: int = 1) -> list[int]:
        """Tokens removed after each block: at block l of ``layer_pattern(n_layers)`` keep its retention of the
        current non-protected tokens (rounded half up, at least one), 0 elsewhere. Pruning layers at or
        beyond ``n_layers`` are ignored."""
        at = dict(zip(*self.layer_pattern(n_layers)))
        current = int(n_tokens) - int(protected)
        out = []
        for layer in range(int(n_layers)):
            r = 0
            if layer in at and current > 1:
                keep = max(1, math.floor(at[layer] * current + 0.5))
                r = current - keep
                current = keep
            out.append(r)
        return out
