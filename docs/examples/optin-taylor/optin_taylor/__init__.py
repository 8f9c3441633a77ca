"""optin-taylor: an example third-party optin plugin (see CONTRIBUTING.md of optin)."""
from __future__ import annotations

from optin.contracts import Adapter, Batch, ScoreContext, Scorer
from optin.errors import OptinError
from optin.gradients import mask_gradient_sums
from optin.units import UnitTensors

from .activation import ActivationScorer

__all__ = ["ActivationScorer", "TaylorScorer"]


class TaylorScorer(Scorer):
    """First-order Taylor importance: |sum over micro-batches of mask * d(loss)/d(mask)|."""

    name = "taylor"
    needs_labels = True  # the task loss needs labels; the core refuses unlabelled calibration data
    scale = "global"  # first-order loss changes: one unit (the loss) for every kind and layer

    def __init__(self, micro_batch: int = 8) -> None:  # plugin option: --set micro_batch=4
        if int(micro_batch) < 1:
            raise OptinError(f"micro_batch must be >= 1, got {micro_batch}")
        self.micro_batch = int(micro_batch)

    def describe(self) -> dict:
        return {"micro_batch": self.micro_batch}  # stored in the scores file

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        # optin.gradients gives, summed over micro-batches, the gradient of adapter.loss with respect to every
        # unit's mask at 1 (the model's own parameters frozen meanwhile, progress reported to ctx); at mask = 1,
        # mask * gradient is the gradient itself.
        sums = mask_gradient_sums(adapter, batches, self.micro_batch, ctx)
        return {kind: [t.abs().float() for t in layers] for kind, layers in sums.items()}
