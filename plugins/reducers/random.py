"""Random token dropping: the floor every token reducer should beat (OPTIN A.6 also uses it)."""
from __future__ import annotations

import torch

from optin.contracts import Reducer

from .common import clip_removals, int_option, keep_highest


class RandomReducer(Reducer):
    """Drop r random non-protected tokens per example (seeded); survivors keep their order and sizes."""

    name = "random"
    needs_importance = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = int_option(seed, "random reducer: seed")
        self.generator = torch.Generator().manual_seed(self.seed)

    def reduce(self, x: torch.Tensor, sizes: torch.Tensor, r: int, *, metric: torch.Tensor | None = None,
               importance: torch.Tensor | None = None, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop ``r`` tokens (at most N - protected - 1) chosen uniformly at random per example."""
        B, N = x.shape[:2]
        r = clip_removals(N, r, protected)
        if r == 0:
            return x, sizes
        # drawn on the CPU from the instance's generator, so the draw does not depend on the device
        noise = torch.rand(B, N, generator=self.generator).to(x.device)
        return keep_highest(x, sizes, noise, r, protected)
