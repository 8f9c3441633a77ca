"""ToMe (Bolya et al., ICLR 2023): merge similar tokens by bipartite soft matching (DESIGN.md 3.5).

Tokens are split alternately into A (even positions) and B (odd positions). Each A token is matched to
its most similar B token (cosine similarity of the metric, e.g. the keys averaged over heads), and the r
A tokens with the most similar matches are merged into their B tokens by a size-weighted average; the
sizes add up, so that proportional attention (``+ log(size)`` on the attention logits, done by the
adapter) still counts every original patch. Protected tokens (class, distillation) are never merged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from optin.contracts import Reducer

from .common import clip_removals


def max_merge(n_tokens: int, protected: int = 1) -> int:
    """The most tokens one bipartite merge can remove from ``n_tokens``: the mergeable A tokens (even
    positions >= ``protected``), or 0 when no B token (odd position >= ``protected``) can receive them."""
    p = min(max(int(protected), 0), n_tokens)
    n_a = (n_tokens + 1) // 2 - (p + 1) // 2
    n_b = n_tokens // 2 - p // 2
    return n_a if n_b > 0 else 0


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which tokens merge where: ``(src, dst)``, both (B, r) positions in the original token order.

    Token ``src[b, k]`` (an A token, even position) is merged into token ``dst[b, k]`` (a B token, odd
    position); several sources may share a destination. ``r`` is clipped to ``max_merge``. Protected
    tokens are never a source (their row is -inf) nor a destination (their column is -inf). The r sources
    are the A tokens whose best match is the most similar (cosine on ``metric``, ties broken by position).
    """
    B, N, _ = metric.shape
    r = min(int(r), max_merge(N, protected))
    device = metric.device
    if r <= 0:
        empty = torch.zeros(B, 0, dtype=torch.long, device=device)
        return empty, empty
    a_pos = torch.arange(0, N, 2, device=device)
    b_pos = torch.arange(1, N, 2, device=device)
    with torch.no_grad():
        m = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
        scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, Na, Nb) cosine similarities
        # (masked_fill rather than boolean indexing: the same values, and it exports to ONNX)
        scores = scores.masked_fill((a_pos < protected)[None, :, None] | (b_pos < protected)[None, None, :],
                                    float("-inf"))
        best, best_b = scores.max(dim=-1)  # (B, Na): each A token's best B match
        order = best.argsort(dim=-1, descending=True, stable=True)
        src_a = order[:, :r]
        dst_b = best_b.gather(1, src_a)
    return a_pos[src_a], b_pos[dst_b]


def tome_merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, protected: int = 1,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of ``x`` (B, N, D) by bipartite soft matching on ``metric`` (B, N, C).

    Returns ``(x', sizes')`` with N - r tokens (r clipped to ``max_merge(N, protected)``): a merged B
    token becomes ``(s_B x_B + sum s_A x_A) / (s_B + sum s_A)`` and its size ``s_B + sum s_A``. The
    survivors keep their original relative order, so the protected tokens stay first, unchanged (tokens
    that receive no merge are returned bit-exact). The average is computed in at least float32 and cast
    back to ``x``'s dtype; ``sizes'`` keeps ``sizes``' dtype.
    """
    src, dst = bipartite_soft_matching(metric, r, protected)
    r = src.shape[1]
    if r == 0:
        return x, sizes
    B, N, D = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    s = sizes.to(dtype).unsqueeze(-1)  # (B, N, 1)
    src_d, dst_d = src.unsqueeze(-1).expand(-1, -1, D), dst.unsqueeze(-1).expand(-1, -1, D)
    s_src = s.gather(1, src.unsqueeze(-1))
    xf = x.to(dtype)
    # sum of s_A x_A and of s_A per destination (several A tokens may merge into one B token)
    added = xf.new_zeros(B, N, D).scatter_add(1, dst_d, xf.gather(1, src_d) * s_src)
    added_s = xf.new_zeros(B, N, 1).scatter_add(1, dst.unsqueeze(-1), s_src)
    merged = ((xf * s + added) / (s + added_s)).to(x.dtype)
    touched = torch.zeros(B, N, 1, dtype=torch.bool, device=x.device).scatter(1, dst.unsqueeze(-1), True)
    x_all = torch.where(touched, merged, x)  # tokens that received nothing stay bit-exact
    keep = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter(1, src, False)
    x_out = x_all[keep].view(B, N - r, D)
    sizes_out = sizes.scatter_add(1, dst, sizes.gather(1, src))[keep].view(B, N - r)
    return x_out, sizes_out


class ToMeReducer(Reducer):
    """ToMe: merge the r most similar token pairs (bipartite soft matching, size-weighted average)."""

    name = "tome"
    needs_importance = False

    def reduce(self, x: torch.Tensor, sizes: torch.Tensor, r: int, *, metric: torch.Tensor | None = None,
               importance: torch.Tensor | None = None, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge ``r`` tokens (at most ``max_merge(N, protected)``); ``metric`` defaults to ``x``."""
        return tome_merge(x, sizes, x if metric is None else metric, r, protected)


# --- schedules -------------------------------------------------------------------------------------

def constant_schedule(n_layers: int, r: int) -> list[int]:
    """ToMe's constant schedule: ``r`` tokens removed in every layer."""
    return [int(r)] * int(n_layers)


def decreasing_schedule(n_layers: int, r0: int) -> list[int]:
    """Linearly from ``r0`` (first layer) down to 0 (last layer), rounded to the nearest integer."""
    n = int(n_layers)
    if n <= 1:
        return [int(r0)] * n
    return [int(r0 * (n - 1 - i) / (n - 1) + 0.5) for i in range(n)]


def counts_from_removals(n_tokens: int, removals: list[int], protected: int = 1, *,
                         bipartite: bool = False) -> list[int]:
    """Tokens left after each layer when layer l removes ``removals[l]`` tokens.

    Removals are clipped so the count never drops below ``protected + 1``; with ``bipartite=True`` also
    to what one ToMe merge can remove (``max_merge``), i.e. what ``ToMeReducer`` actually removes.
    """
    out, n = [], int(n_tokens)
    for r in removals:
        r = clip_removals(n, r, protected)
        if bipartite:
            r = min(r, max_merge(n, protected))
        n -= r
        out.append(n)
    return out
