"""Importance-based token pruning, with Zero-TPrune's similarity stage (DESIGN.md 3.6).

At a pruning layer the reducer gets a per-token importance (higher = keep) from a token scorer such as
``wpr`` and drops r tokens: first (S-stage, optional) the ``min(similarity_tokens, r)`` less-important
tokens that are the most similar to a more-important token (near-duplicates carry little extra
information), then (I-stage) the rest of r by lowest importance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from optin.contracts import Reducer
from optin.errors import OptinError

from .common import clip_removals, gather_tokens, int_option, keep_highest


def similarity_prune_index(importance: torch.Tensor, metric: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-TPrune's S-stage on non-protected tokens: positions (B, k) of the tokens to prune.

    ``importance`` (B, M) and ``metric`` (B, M, C) describe M tokens. They are ranked by importance and
    split into the more-important half (the first ceil(M/2)) and the less-important half; each
    less-important token is matched to its most similar more-important token (cosine on ``metric``) and
    the ``k`` with the highest similarity are returned (``k`` clipped to the size of that half).
    """
    B, M = importance.shape
    order = importance.argsort(dim=1, descending=True, stable=True)
    n_hi = M - M // 2
    k = max(0, min(int(k), M - n_hi))
    if k == 0:
        return order[:, :0]
    hi, lo = order[:, :n_hi], order[:, n_hi:]
    with torch.no_grad():
        m = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
        C = m.shape[-1]
        m_lo = m.gather(1, lo.unsqueeze(-1).expand(-1, -1, C))
        m_hi = m.gather(1, hi.unsqueeze(-1).expand(-1, -1, C))
        sim = m_lo @ m_hi.transpose(1, 2)  # (B, M - n_hi, n_hi)
        best = sim.max(dim=-1).values  # (B, M - n_hi): each less-important token's closest important one
        pick = best.argsort(dim=1, descending=True, stable=True)[:, :k]
    return lo.gather(1, pick)


class PruneReducer(Reducer):
    """Drop the r least important tokens (by a token scorer, e.g. wpr), optionally near-duplicates first."""

    name = "prune"
    needs_importance = True

    def __init__(self, similarity_tokens: int = 0) -> None:
        self.similarity_tokens = int_option(similarity_tokens, "prune reducer: similarity_tokens")
        if self.similarity_tokens < 0:
            raise OptinError(f"prune reducer: similarity_tokens must be >= 0, got {self.similarity_tokens}")

    def reduce(self, x: torch.Tensor, sizes: torch.Tensor, r: int, *, metric: torch.Tensor | None = None,
               importance: torch.Tensor | None = None, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop ``r`` tokens (at most N - protected - 1): S-stage on ``metric`` (default ``x``), then by
        lowest ``importance`` (B, N). Survivors keep their original order and sizes."""
        if importance is None:
            raise OptinError("the prune reducer needs a token scorer, e.g. --scorer wpr "
                             "(reduce() was called without a per-token importance)")
        B, N = x.shape[:2]
        if importance.shape != (B, N):
            raise OptinError(f"prune reducer: importance must be (B, N) = {(B, N)}, "
                             f"got {tuple(importance.shape)}")
        r = clip_removals(N, r, protected)
        if r == 0:
            return x, sizes
        k = min(self.similarity_tokens, r)
        if k > 0:
            feats = x if metric is None else metric
            drop = similarity_prune_index(importance[:, protected:], feats[:, protected:], k) + protected
            k = drop.shape[1]
            keep = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter(1, drop, False)
            index = torch.arange(N, device=x.device).expand(B, N)[keep].view(B, N - k)  # original order
            x, sizes = gather_tokens(x, sizes, index)
            importance = importance.gather(1, index)
            r -= k
        return keep_highest(x, sizes, importance, r, protected)
