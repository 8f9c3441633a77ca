"""The trajectory scorer's plan: which estimator each unit kind gets, the neuron group size, and the time the
job is expected to take (estimated from a timed forward pass), shared between processes and kept in the
resumable checkpoint as a fixed-size tensor."""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from optin.errors import OptinError


@dataclass
class Plan:
    """How a scoring job runs: per kind exact (one masked restart per group of ``group`` units) or
    Gauss-Newton (``probes`` probes for every unit at once), and the time it is expected to take."""

    estimator: dict[str, str]
    group: dict[str, int]
    probes: int
    seconds: float
    forward_seconds: float
    restart_factor: float = 1.0  # a timed masked restart / its modelled share of a forward pass

    SIZE = 4096  # bytes of an encoded plan (sent between processes as a fixed-size tensor)

    def encode(self) -> torch.Tensor:
        data = json.dumps({"estimator": self.estimator, "group": self.group, "probes": self.probes,
                           "seconds": self.seconds, "forward_seconds": self.forward_seconds,
                           "restart_factor": self.restart_factor}).encode()
        if len(data) > self.SIZE:
            raise OptinError("trajectory plan too large to share between processes")
        out = torch.zeros(self.SIZE, dtype=torch.float64)
        out[:len(data)] = torch.tensor(list(data), dtype=torch.float64)
        return out

    @classmethod
    def decode(cls, t: torch.Tensor) -> "Plan":
        data = bytes(int(v) for v in t.tolist() if v > 0)
        return cls(**json.loads(data.decode()))

    def describe(self, counts: dict[str, list[int]]) -> str:
        approx = [f"{sum(counts[k]):,} {k}" for k, how in self.estimator.items() if how != "exact"]
        exact = [f"{sum(counts[k]):,} {k}" + (f" (groups of {self.group[k]})" if self.group[k] > 1 else "")
                 for k, how in self.estimator.items() if how == "exact"]
        parts = ([f"{' + '.join(approx)} by Gauss-Newton ({self.probes} probes)"] if approx else []) + \
            ([f"{' + '.join(exact)} exactly (one masked restart each)"] if exact else [])
        return "; ".join(parts)


def restart_cost(n_layers: int, layer: int, kind: str) -> float:
    """A masked restart at ``layer`` in forward passes of the batch: the later blocks in full, the masked
    block's part after the unit (little for FFN neurons, the FFN for heads) - a planning estimate."""
    own = {"neurons": 0.1, "channels": 0.5, "heads": 0.6}.get(kind, 1.0)
    return (n_layers - layer - 1 + own) / n_layers


def minutes(seconds: float) -> str:
    """A duration as "42 s", "7 min" or "1.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
