"""PTF's Fisher importance (Kwon et al., NeurIPS 2022): squared mask gradients of the task loss.

Every unit gets a mask variable fixed at 1; for each micro-batch of labelled calibration data the
gradient of the task loss w.r.t. the masks is squared and accumulated (the empirical Fisher diagonal).
"""
from __future__ import annotations

import torch

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.errors import OptinError
from optin.gradients import mask_gradient_sums
from optin.units import UnitTensors


class FisherScorer(Scorer):
    """Sum over micro-batches of (d task loss / d unit mask)^2."""

    name = "fisher"
    scale = "global"
    needs_labels = True

    def __init__(self, micro_batch: int = 8) -> None:
        self.micro_batch = int(micro_batch)
        if self.micro_batch < 1 or self.micro_batch != micro_batch:
            raise OptinError(f"fisher scorer: micro_batch must be a positive whole number of examples, got "
                             f"{micro_batch!r} (e.g. --set micro_batch=8)")

    def describe(self) -> dict:
        return {"micro_batch": self.micro_batch}

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        fisher = mask_gradient_sums(adapter, batches, self.micro_batch, ctx, lambda g: g.pow(2))
        return {k: [t.float() for t in v] for k, v in fisher.items()}  # accumulated in float64
