"""Shared helpers of the token reducers: clipping ``r`` and keeping a per-example subset of tokens."""
from __future__ import annotations

from typing import Any

import torch

from optin.errors import OptinError


def int_option(value: Any, what: str) -> int:
    """``value`` as an int, or an OptinError ``"{what} must be an integer, got ..."`` (plugin options may
    come from YAML or Python as anything)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise OptinError(f"{what} must be an integer, got {value!r}") from None


def clip_removals(n_tokens: int, r: int, protected: int) -> int:
    """``r`` clipped so that at least ``protected + 1`` tokens are left (never negative)."""
    return max(0, min(int(r), n_tokens - protected - 1))


def gather_tokens(x: torch.Tensor, sizes: torch.Tensor, index: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``index`` (B, K) of ``x`` (B, N, D) and ``sizes`` (B, N), in the order of ``index``."""
    return (x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])), sizes.gather(1, index))


def keep_highest(x: torch.Tensor, sizes: torch.Tensor, score: torch.Tensor, r: int, protected: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the ``r`` non-protected tokens with the lowest ``score`` (B, N) per example.

    The protected tokens stay first and the survivors keep their original order. Ties are broken by
    position (the earlier token is dropped first), so the result is deterministic.
    """
    B, N = score.shape
    m = N - protected
    if r <= 0:
        return x, sizes
    order = score[:, protected:].argsort(dim=1, stable=True)  # ascending: least important first
    kept = order[:, r:].sort(dim=1).values + protected  # survivors in original order
    head = torch.arange(protected, device=score.device).expand(B, protected)
    index = torch.cat([head, kept], dim=1)
    assert index.shape[1] == N - r and m >= r
    return gather_tokens(x, sizes, index)
