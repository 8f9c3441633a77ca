"""The four plugin contracts. Plugins subclass these; the core only ever talks to these methods.

- Adapter: knows one model family (units, masking, partial forwards, MACs, physical removal, rebuild).
- Scorer: units + calibration batches -> importance per unit (higher = keep).
- Searcher: importances + cost model + budget -> keep-masks.
- Reducer: at run time, between blocks, tokens -> fewer tokens (used by the vision adapters).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from .units import CostModel, UnitTensors

Batch = dict[str, Any]


@dataclass
class Trace:
    """What an adapter captured from one unmasked forward, to restart the forward at any block.

    ``embeddings[z]`` is block z's embedding used by the trajectory (for transformers the FFN output
    before dropout/residual/LayerNorm), ``valid`` marks non-padding token positions (B, T) or None,
    ``logits`` the unmasked model output. ``state`` is adapter-private (cached block inputs etc.).
    """

    embeddings: list[torch.Tensor]
    logits: torch.Tensor
    valid: torch.Tensor | None
    state: dict[str, Any] = field(default_factory=dict)


class Adapter(ABC):
    """One model family. Instances wrap one model (and its input processor).

    ``name`` must equal the entry-point name: pruned exports record it to find the adapter again.
    A plugin of any kind may define ``unavailable_reason()`` (a classmethod or staticmethod returning a
    string or None) to be listed as unavailable, with the reason, where it cannot run.
    """

    name: ClassVar[str] = ""
    unit_kinds: ClassVar[tuple[str, ...]] = ()
    # What ``logits`` returns: "classes" (B, C) or "segmentation" (B, C, H, W) per-pixel class scores;
    # a task's ``target`` must match it.
    output: ClassVar[str] = "classes"
    # How the trajectory scorer compares embeddings: "manifold" (token embeddings (B, T, D), relation maps,
    # DESIGN 3.2) or "feature-mse" (CNN feature maps (B, C, H, W), batch-averaged, OPTIN A.10).
    trajectory_distance: ClassVar[str] = "manifold"
    # Searcher options this model family needs by default (user options win; only options the chosen
    # searcher takes are used), e.g. CNNs: {"normalize": "mean"} so layers compete by relative importance.
    search_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        self.model = model
        self.processor = processor

    # --- discovery -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def handles(cls, model: nn.Module) -> bool:
        """True when this adapter knows the model's architecture."""

    @classmethod
    def claims(cls, source: str) -> bool:
        """True when this adapter can load ``source`` (a path or hub id) - a cheap check, no loading."""
        return False

    @classmethod
    def load(cls, source: str, num_labels: int | None = None) -> "Adapter":
        """Load the model (and processor) named by ``source``. With ``num_labels``, a model without a
        matching trained head gets a fresh one (for fine-tuning)."""
        raise NotImplementedError(f"adapter {cls.name!r} cannot load models by name")

    # --- data ------------------------------------------------------------------------------------
    @abstractmethod
    def collate(self, examples: list[dict]) -> Batch:
        """Turn task examples (dicts with the task's fields and ``label``) into a model batch."""

    @abstractmethod
    def logits(self, batch: Batch) -> torch.Tensor:
        """Model output for a batch: class logits (B, C) or per-pixel logits."""

    def loss(self, batch: Batch) -> torch.Tensor:
        """Task loss (mean over the batch), used by gradient-based scorers and fine-tuning."""
        return nn.functional.cross_entropy(self.logits(batch), batch["labels"])

    def batch_size(self, batch: Batch) -> int:
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])

    def seq_len(self, batches: list[Batch]) -> float:
        """Average token count per example used by the cost model (1 for models without tokens)."""
        return 1.0

    # --- units -----------------------------------------------------------------------------------
    @abstractmethod
    def unit_counts(self) -> dict[str, list[int]]:
        """Current number of units per kind per layer."""

    @abstractmethod
    @contextmanager
    def masked(self, masks: UnitTensors) -> Iterator[None]:
        """Within the context, multiply units by ``masks``. A mask may be (n,) or batched (R, n): then
        the batch is R replicas of the input and replica r uses mask row r."""

    @abstractmethod
    def cost_model(self, seq_len: float) -> CostModel:
        """Analytic MACs per unit at this average sequence length."""

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        """Per unit, the flattened weights it owns: ``{kind: [tensor (n_units, w) per layer]}``."""
        raise NotImplementedError(f"adapter {self.name!r} does not expose unit weights")

    # --- trajectory support ----------------------------------------------------------------------
    def trace(self, batch: Batch) -> Trace:
        raise NotImplementedError(f"adapter {self.name!r} does not support trajectory scoring")

    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Forward R replicas of the traced batch from ``layer`` on, masking ``kind`` units of that layer
        with ``masks`` (R, n). Returns ``{z: select(embedding_z)}`` for z >= layer (embedding_z is
        (R*B, ...), ``select`` lets the caller keep only what it needs) and logits (R*B, C)."""
        raise NotImplementedError(f"adapter {self.name!r} does not support trajectory scoring")

    # --- physical removal and persistence --------------------------------------------------------
    @abstractmethod
    def prune(self, masks: UnitTensors) -> None:
        """Physically remove every unit whose mask is 0 (in place)."""

    @abstractmethod
    def plan(self) -> dict:
        """JSON-able description to rebuild the (pruned) architecture without the original weights."""

    @classmethod
    @abstractmethod
    def rebuild(cls, plan: dict, directory: str) -> "Adapter":
        """Recreate the pruned architecture from ``plan`` (weights are loaded by the caller)."""

    def save_extras(self, directory: str) -> None:
        """Save non-weight artifacts (e.g. the tokenizer) next to the weights."""

    def recalibrate(self, batches: list[Batch]) -> bool:
        """Optional, after physical removal: re-estimate statistics that removal made stale (CNNs: the
        BatchNorm running mean/variance, whose inputs lost channels upstream) from ``batches``, with no
        gradients. Returns True when something was re-estimated."""
        return False

    # --- token reduction -------------------------------------------------------------------------
    has_tokens: ClassVar[bool] = False

    def install_reducer(self, reducer: "Reducer", schedule: list[int]) -> None:
        raise NotImplementedError(f"adapter {self.name!r} has no tokens to reduce")


class Scorer(ABC):
    """Importance per unit (higher = keep)."""

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    # Optional by-products saved next to the scores (e.g. trajectory's md/kd components), set by score().
    extras: dict[str, UnitTensors] = {}

    @abstractmethod
    def score(self, adapter: Adapter, batches: list[Batch], ctx: "ScoreContext") -> UnitTensors:
        ...

    def describe(self) -> dict:
        """Options that change the scores (stored in the scores file)."""
        return {}


@dataclass
class ScoreContext:
    """Services the core gives a scorer: a resumable checkpoint, progress reporting and a seed."""

    seed: int = 0
    checkpoint: Any = None  # optin.rankings.Checkpoint or None
    advance: Callable[[int], None] = lambda n: None  # progress: n units done
    total: Callable[[int], None] = lambda n: None  # progress: set the number of units to do

    def cached(self, key: str) -> torch.Tensor | None:
        return None if self.checkpoint is None else self.checkpoint.get(key)

    def store(self, key: str, value: torch.Tensor) -> None:
        if self.checkpoint is not None:
            self.checkpoint.put(key, value)


class Searcher(ABC):
    """Chooses which units to keep under a MACs budget (a fraction of the unpruned MACs)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def search(self, scores: UnitTensors, costs: CostModel, budget: float) -> UnitTensors:
        ...


class Reducer(ABC):
    """Token reduction between blocks, on a per-layer schedule, batched (every example keeps the same count).

    ``reduce`` removes exactly ``r`` tokens from ``x`` (B, N, D) and returns ``(x', sizes')`` with N - r
    tokens; ``sizes`` (B, N) counts how many original patches each token stands for (ToMe's size, used for
    proportional attention; droppers leave kept sizes unchanged). The first ``protected`` tokens (class,
    distillation) are never removed and stay first, in order. ``metric`` (B, N, Dm) is a similarity
    feature (ToMe: keys averaged over heads); ``importance`` (B, N) a per-token importance (higher = keep),
    supplied at run time by a token scorer such as ``wpr``.
    """

    name: ClassVar[str] = ""
    needs_importance: ClassVar[bool] = False

    @abstractmethod
    def reduce(self, x: torch.Tensor, sizes: torch.Tensor, r: int, *, metric: torch.Tensor | None = None,
               importance: torch.Tensor | None = None, protected: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class TokenScorer(ABC):
    """A scorer that ranks tokens at run time from a block's attention (e.g. Zero-TPrune's WPR)."""

    @abstractmethod
    def token_importance(self, attn: torch.Tensor, layer: int, n_layers: int) -> torch.Tensor:
        """Attention probabilities (B, H, N, N) of block ``layer`` -> importance (B, N), higher = keep."""
