"""The plugin contracts. Plugins subclass these; the core only ever calls the methods declared here.

- Adapter: knows one model family (units, where they live, masking, partial forwards, MACs, removal).
  TokenAdapter: an adapter whose model has tokens a reducer can remove at run time.
- Scorer: units + calibration batches -> importance per unit (higher = keep), on a declared scale.
- Searcher: importances + cost model + budget -> keep-masks. TokenSearcher: also a per-block token schedule.
- Reducer: at run time, between blocks, tokens -> fewer tokens. TokenScorer: ranks tokens at run time.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from .errors import OptinError
from .hooking import removing
from .units import CostModel, UnitTensors

Batch = dict[str, Any]

# What a scorer's numbers can be compared with (``Scorer.scale``); the recipe brings scores to one common
# scale before any searcher sees them (optin.scales).
SCALES = ("global", "kind", "layer")


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


@dataclass(frozen=True)
class UnitSite:
    """Where one layer's units of one kind are carried: a tensor passing through ``module`` (its first
    input, or its output when ``output``) whose axis ``dim`` holds ``n units x unit_size`` features, unit k
    owning features ``k*unit_size .. (k+1)*unit_size - 1``; axis ``batch_dim`` is the example axis.

    Multiplying that tensor by a keep-mask is exactly what removing the units does, and reading it gives
    each unit's activations (the ``probe``). Transformers: the input of the attention output projection
    (heads, ``unit_size`` = head dim) and of the FFN output projection (neurons); CNNs: a feature map's
    channel axis (``dim=1``).
    """

    module: nn.Module
    unit_size: int = 1
    dim: int = -1
    output: bool = False
    batch_dim: int = 0

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the example axis first and the unit feature axis last."""
        dim, bdim = self.dim % x.dim(), self.batch_dim % x.dim()
        if (bdim, dim) == (0, x.dim() - 1):
            return x
        return x.movedim((bdim, dim), (0, -1))

    def restore(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Undo ``canonical`` (``like`` is the original tensor)."""
        dim, bdim = self.dim % like.dim(), self.batch_dim % like.dim()
        if (bdim, dim) == (0, like.dim() - 1):
            return y
        return y.movedim((0, -1), (bdim, dim))


Observer = Callable[[str, int, torch.Tensor], None]


class RowSelect:
    """A ``select`` for ``run_from`` that keeps fixed token rows of every block's embedding.

    ``rows[n]`` are indices into the ``n`` flattened token rows (examples x positions, in ``trace``'s
    layout) of one replica's embedding; calling the object on stacked replicas (R*B, ..., D) returns
    (R, K, D). An adapter may instead read ``rows_for(n)`` and gather the rows inside its forward (no
    full-size buffers); the result must be the same.
    """

    def __init__(self, rows: dict[int, torch.Tensor], replicas: int) -> None:
        self.rows, self.replicas = rows, replicas

    def rows_for(self, n: int) -> torch.Tensor:
        return self.rows[n]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(self.replicas, -1, features.shape[-1])
        return flat[:, self.rows_for(flat.shape[1]).to(flat.device)]


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
    # What ``load`` accepts, in a few words for error messages, e.g. "HF folders/hub ids with model_type bert,
    # roberta" (shown when no adapter claims a model).
    sources: ClassVar[str] = ""

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
        matching trained head gets a fresh one (for fine-tuning). An adapter that can load an architecture
        named without weights (``timm:NAME``) from a separate weights file declares a ``checkpoint`` keyword
        (``--checkpoint FILE``; read without unpickling objects, e.g. ``torch.load(weights_only=True)``)."""
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

    def num_classes(self) -> int | None:
        """How many classes the model predicts (None when it does not say); checked against the task."""
        labels = getattr(getattr(self.model, "config", None), "num_labels", None)  # HF models
        return int(labels) if isinstance(labels, int) else None

    def batch_size(self, batch: Batch) -> int:
        return int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])

    def seq_len(self, batches: list[Batch]) -> float:
        """Average token count per example used by the cost model (1 for models without tokens)."""
        return 1.0

    def split(self, batch: Batch, size: int) -> list[Batch]:
        """``batch`` as micro-batches of at most ``size`` examples, for passes whose result does not depend on
        which examples run together (statistics summed over examples, e.g. recovery). Default: consecutive
        slices. An adapter with padded inputs may group examples of similar length and trim each group's
        padding: the same values for less work."""
        from .gradients import micro_batches
        return micro_batches(batch, size)

    def valid_tokens(self, batch: Batch) -> torch.Tensor | None:
        """(B, T) bool, True at real (non-padding) token positions of ``batch``; None when every position
        counts (images, unpadded text)."""
        return None

    def image_transform(self) -> Callable[[Any], torch.Tensor] | None:
        """How an image file becomes this model's input: a callable taking a PIL image of any mode (RGB, L,
        RGBA, P...) and returning the ``image`` tensor (C, H, W) that ``collate`` stacks, converted to the
        model's channels (greyscale for one input channel, RGB for three), resized and normalised as the
        model expects (its own preprocessing config, e.g. timm's ``pretrained_cfg`` or an HF image
        processor). Image data given as files (``--data DIR``) is decoded with it, so the user passes no
        sizes or statistics. A segmentation model's transform only resizes (no crop): its masks are resized
        (nearest) to the transformed image's size. None (the default): the model takes no images."""
        return None

    # --- units -----------------------------------------------------------------------------------
    @abstractmethod
    def unit_counts(self) -> dict[str, list[int]]:
        """Current number of units per kind per layer."""

    def unit_site(self, kind: str, layer: int) -> UnitSite | None:
        """Where the units of ``kind`` in ``layer`` are carried (see ``UnitSite``); None where the layer has
        no units of that kind. Raises OptinError for a kind the adapter does not have."""
        raise NotImplementedError(f"adapter {self.name!r} does not expose where its units live")

    def unit_reader(self, kind: str, layer: int) -> UnitSite | None:
        """The layer that reads the units of ``kind`` in ``layer``: a Linear or Conv2d whose input features
        (channels) are the units, ``unit_size`` per unit, in order (for least-squares recovery). Default: the
        unit site itself when it is the input of such a layer (transformers' output projections); adapters
        whose units are read further on (a CNN's next convolution) override it. None: no such layer."""
        site = self.unit_site(kind, layer)
        if site is not None and not site.output and isinstance(site.module, (nn.Linear, nn.Conv2d)):
            return site
        return None

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

    def probe(self, batch: Batch, observe: Observer, kinds: Sequence[str] | None = None) -> torch.Tensor:
        """Run ``logits(batch)`` and show every unit's activations: for each kind (default: all) and layer,
        ``observe(kind, layer, x)`` with ``x`` (N, n_units, unit_size), N = the valid positions (padding
        dropped; every example x token, or x pixel for CNNs). Activations keep their autograd graph, so a
        gradient scorer may differentiate through them. Returns the logits."""
        counts = self.unit_counts()
        valid = self.valid_tokens(batch)
        handles = []
        with removing(handles):
            for kind in (counts if kinds is None else kinds):
                for layer in range(len(counts[kind])):
                    site = self.unit_site(kind, layer)
                    if site is None:
                        continue

                    def show(t: torch.Tensor, kind=kind, layer=layer, site=site) -> None:
                        x = site.canonical(t)
                        if valid is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(valid.shape):
                            x = x[valid.to(x.device)]
                        x = x.reshape(-1, x.shape[-1])
                        observe(kind, layer, x.reshape(x.shape[0], -1, site.unit_size))

                    if site.output:
                        handles.append(site.module.register_forward_hook(lambda m, a, o, f=show: f(o)))
                    else:
                        handles.append(site.module.register_forward_pre_hook(lambda m, a, f=show: f(a[0])))
            return self.logits(batch)

    # --- trajectory support ----------------------------------------------------------------------
    def trace(self, batch: Batch) -> Trace:
        raise NotImplementedError(f"adapter {self.name!r} does not support trajectory scoring")

    def forward_embeddings(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One forward of ``batch`` with autograd on (and any ``masked`` context in effect): every block's
        trajectory embedding, in the layout of ``trace(batch).embeddings``, and the logits. The approximate
        trajectory differentiates them with respect to the masks."""
        raise NotImplementedError(f"adapter {self.name!r} does not support the approximate trajectory")

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

    def hf_model(self) -> nn.Module:
        """The (pruned) model as a plain transformers model whose config states its sizes, for ``optin export
        --format hf``: a folder ``from_pretrained`` loads without optin. Raises OptinError saying why where the
        model cannot be one (not a transformers model; layers of different sizes, which an HF config cannot
        state; a head size its config cannot state; a token schedule)."""
        raise OptinError(f"adapter {self.name!r} has no plain Hugging Face form (its models are not transformers "
                         "models with per-model sizes in their config); use --format onnx, or the optin export")


class TokenAdapter(Adapter):
    """An adapter whose model has tokens (ViT patches) that a ``Reducer`` can remove between blocks.

    ``n_tokens`` tokens enter the first block, the first ``protected`` of them (class, distillation) are
    never removed, and ``removals`` is the installed schedule (tokens removed in each block; zeros when no
    reducer is installed).
    """

    n_tokens: int
    protected: int
    removals: list[int]

    def token_units(self) -> int:
        """Token positions that can be scored and removed (all but the protected ones)."""
        return self.n_tokens - self.protected

    @abstractmethod
    def install_reducer(self, reducer: "Reducer", removals: list[int],
                        token_scorer: "TokenScorer | None" = None) -> None:
        """Run ``reducer`` in every block l with ``removals[l] > 0`` tokens removed there (between attention and
        MLP); ``token_scorer`` supplies per-token importances to reducers that need them."""

    @abstractmethod
    def cost_model(self, seq_len: float | None = None, removals: list[int] | None = None) -> CostModel:
        """MACs per unit with ``removals`` tokens removed per block (default: the installed schedule)."""


class Scorer(ABC):
    """Importance per unit (higher = keep).

    What a score must mean for the searcher: the damage (e.g. the expected increase of a loss) that
    removing that one unit does, so that a sum of scores is the damage of removing a set. ``scale`` says
    how far the numbers can be compared:

    - ``"global"``: across kinds and layers (scores in units of one loss); searchers use them as they are.
    - ``"kind"``: across the layers of one kind, not across kinds (e.g. weight norms: a head and a neuron
      own different numbers of weights). Before the search each kind is brought to a common scale: its
      scores are divided by the kind's mean score and multiplied by the kind's mean cost, so that an
      average unit of every kind is worth what it costs, and only the ranking inside the kind decides.
    - ``"layer"``: only inside one layer; the same per layer.

    The default is ``"kind"``: a scorer that does not know better cannot make one kind silently win.
    """

    name: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    scale: ClassVar[str] = "kind"
    # True when the scorer can also score token positions per block (OPTIN A.9) for a token searcher
    # that asks for them (``TokenSearcher.needs_token_scores``); see ``request_tokens``.
    scores_tokens: ClassVar[bool] = False
    # Optional by-products saved next to the scores (e.g. trajectory's md/kd components), set by score().
    extras: dict[str, UnitTensors] = {}

    @abstractmethod
    def score(self, adapter: Adapter, batches: list[Batch], ctx: "ScoreContext") -> UnitTensors:
        ...

    def describe(self) -> dict:
        """Options that change the scores (stored in the scores file)."""
        return {}

    def request_tokens(self, units: bool = True) -> None:
        """Also score token positions: ``extras["tokens"] = {"tokens": [(T,) per block]}``; with
        ``units=False`` only tokens (no head/neuron scores). Only for ``scores_tokens`` scorers."""
        raise NotImplementedError(f"scorer {self.name!r} does not score tokens")


@dataclass
class ScoreContext:
    """Services the core gives a scorer: a resumable checkpoint, progress reporting, a seed, and the share
    of the work this process does when several processes score together (``rank`` of ``world``)."""

    seed: int = 0
    checkpoint: Any = None  # optin.rankings.Checkpoint or None
    advance: Callable[[int], None] = lambda n: None  # progress: n units done
    total: Callable[[int], None] = lambda n: None  # progress: set the number of units to do
    rank: int = 0
    world: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # sum over the processes (all-reduce)
    note: Callable[[str], None] = lambda message: None  # tell the user something (e.g. the plan and an ETA)

    def cached(self, key: str) -> torch.Tensor | None:
        """The value ``store``d under ``key`` by an interrupted earlier run of the same job, else None."""
        return None if self.checkpoint is None else self.checkpoint.get(key)

    def store(self, key: str, value: torch.Tensor) -> None:
        """Keep a partial result so that an interrupted run resumes after it (no-op without a checkpoint).

        Durable as soon as it returns and cheap: the checkpoint appends only this value to a journal (its
        cost is the value's size, never the whole file's), so a scorer should store after every chunk of
        work, e.g. ``ctx.store(f"md/{kind}.{layer}#{start}", chunk_md)`` with ``ctx.cached`` of the same key
        before computing the chunk; an interrupt then loses at most the chunk in progress. The dtype is
        kept (store float64 partial sums to resume bitwise); keys are any strings."""
        if self.checkpoint is not None:
            self.checkpoint.put(key, value)

    def mine(self, n: int) -> list[int]:
        """The indices of ``range(n)`` this process works on (round robin; all of them for one process)."""
        return list(range(self.rank, n, self.world))


class Searcher(ABC):
    """Chooses which units to keep under a MACs budget (a fraction of the unpruned MACs).

    ``scores`` arrive on one common scale (``Scorer.scale`` already applied): a sum of scores is
    comparable across kinds and layers.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def search(self, scores: UnitTensors, costs: CostModel, budget: float) -> UnitTensors:
        ...

    def unit_budget_for(self, budget: float) -> float:
        """The MACs fraction the unit masks of ``search`` must fit (token searchers leave a part to tokens)."""
        return budget


MacsOf = Callable[[list[int]], float]  # tokens removed per block -> MACs


class TokenSearcher(Searcher):
    """A searcher that also schedules tokens: after ``search`` (unit masks for ``unit_budget_for(budget)``),
    ``removals`` says how many tokens each block removes so that the model fits the whole budget."""

    @abstractmethod
    def removals(self, n_tokens: int, protected: int, n_layers: int, macs_of: MacsOf, target: float,
                 token_importance: torch.Tensor | None = None) -> list[int]:
        """Tokens removed per block with ``macs_of(removals) <= target``; ``token_importance`` (blocks,
        token positions) when ``needs_token_scores()``."""

    def needs_token_scores(self) -> bool:
        """True when ``removals`` needs per-block token importances from the scorer."""
        return False

    def prunes_units(self) -> bool:
        """False when only tokens are reduced (every head and neuron kept)."""
        return True


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

    def method_options(self) -> dict[str, Any]:
        """Options this method sets on the token searcher and the reducer unless the user sets them (e.g.
        Zero-TPrune: the schedule of pruning layers, and the similarity stage of the prune reducer)."""
        return {}
