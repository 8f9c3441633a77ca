"""OPTIN trajectory importance (Khaki & Plataniotis, ICLR 2024, Eq. 3), computed exactly.

For unit j of block i: mask it, rerun the model from block i on (cached inputs, several masks per
forward), and measure how far the later blocks' embeddings (manifold distillation) and the logits
(knowledge distillation) move:  I(i, j) = sum_{z > i} L_MD(F'_z, F_z) + lambda * L_KD(logits', logits).
The last block uses its own embedding. One fixed token sample per calibration batch (and per token
count, for models whose stages change it, e.g. Swin) serves every unit. CNN adapters
(``trajectory_distance = "feature-mse"``) compare batch-averaged feature maps by MSE instead (A.10).
"""
from __future__ import annotations

import math

import torch

import torch.nn.functional as F

from optin.contracts import Adapter, Batch, ScoreContext, Scorer, TokenAdapter, Trace
from optin.errors import OptinError
from optin.units import UnitTensors

from . import gauss_newton as gn
from .distances import (batch_mean, feature_mse, kd_divergence, manifold_distance, relation_map, sample_rows,
                        select_rows)

ESTIMATORS = ("exact", "gauss-newton")


def unit_groups(n: int, size: int) -> list[list[int]]:
    """Consecutive groups of ``size`` unit indices covering ``range(n)``."""
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def group_masks(n: int, groups: list[list[int]]) -> torch.Tensor:
    """(len(groups), n) masks of ones with group g's units zeroed in row g."""
    masks = torch.ones(len(groups), n)
    for r, g in enumerate(groups):
        masks[r, g] = 0.0
    return masks


class _Manifold(gn.ProbeDistance):
    """L_MD on one calibration batch: fixed token-row samples (one per rows-per-replica count) and the
    unmasked relation maps of every block."""

    def __init__(self, trace: Trace, k: int, seed: int) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        valid = trace.valid
        for e in trace.embeddings:
            n = e.numel() // e.shape[-1]
            if n not in self.rows:
                ok = valid if valid is not None and valid.numel() == n else None
                self.rows[n] = sample_rows(ok, n, k, seed)
        self.examples = int(trace.logits.shape[0])
        self.ref_rows = [self.select(e, 1)[0] for e in trace.embeddings]
        self.refs = [relation_map(r.unsqueeze(0))[0] for r in self.ref_rows]

    def select(self, features: torch.Tensor, replicas: int) -> torch.Tensor:
        return select_rows(features, replicas, self.rows[features.numel() // features.shape[-1] // replicas])

    def distance(self, z: int, selected: torch.Tensor) -> torch.Tensor:
        return manifold_distance(relation_map(selected), self.refs[z])

    def duals(self, z: int, probes: int, generator: torch.Generator, batch: int) -> torch.Tensor:
        return gn.manifold_duals(self.ref_rows[z], probes, generator)

    def terms(self, z: int, features: torch.Tensor, start: int, stop: int, duals: torch.Tensor) -> torch.Tensor:
        per = features.numel() // features.shape[-1] // (stop - start)  # token rows per example
        rows = self.rows[per * self.examples]
        inside = (rows >= start * per) & (rows < stop * per)
        f = F.normalize(features.reshape(-1, features.shape[-1])[rows[inside] - start * per].double(), dim=-1)
        return (duals[:, inside] * f.unsqueeze(0)).sum(dim=(1, 2))


class _FeatureMSE(gn.ProbeDistance):
    """CNN trajectory (OPTIN A.10): MSE between batch-averaged feature maps."""

    def __init__(self, trace: Trace) -> None:
        self.refs = [batch_mean(e, 1)[0] for e in trace.embeddings]

    @staticmethod
    def select(features: torch.Tensor, replicas: int) -> torch.Tensor:
        return batch_mean(features, replicas)

    def distance(self, z: int, selected: torch.Tensor) -> torch.Tensor:
        return feature_mse(selected, self.refs[z])

    def duals(self, z: int, probes: int, generator: torch.Generator, batch: int) -> torch.Tensor:
        return gn.feature_duals(self.refs[z], probes, generator, batch)

    def terms(self, z: int, features: torch.Tensor, start: int, stop: int, duals: torch.Tensor) -> torch.Tensor:
        return (duals * features.double().sum(0).unsqueeze(0)).flatten(1).sum(1)


def combine(md: UnitTensors, kd: UnitTensors, lambda_kd: float | str, contribution: float) -> tuple[UnitTensors, float]:
    """``md + lambda * kd``. With ``lambda_kd="auto"`` lambda is the power of ten that makes the KD term
    about ``1/contribution`` of the MD term on average (the official code's rescaling)."""
    if lambda_kd == "auto":
        md_mean = torch.cat([t for v in md.values() for t in v]).mean().item()
        kd_mean = torch.cat([t for v in kd.values() for t in v]).mean().item()
        lam = 10.0 ** round(math.log10(md_mean / (contribution * kd_mean))) if md_mean > 0 and kd_mean > 0 else 1.0
    else:
        lam = float(lambda_kd)
    return {k: [m + lam * q for m, q in zip(md[k], kd[k])] for k in md}, lam


class TrajectoryScorer(Scorer):
    """OPTIN: manifold + logit distillation along the forward trajectory when a unit is masked."""

    name = "trajectory"
    scale = "global"  # distances along the trajectory, in one unit for every kind and layer
    scores_tokens = True

    def __init__(self, temperature: float = 4.0, lambda_kd: float | str = "auto", lambda_contribution: float = 10.0,
                 rows: int = 768, neuron_group: int = 1, tokens_per_forward: int = 32768,
                 kd_divide_by_t: bool = True, kinds: list[str] | None = None, tokens: bool = False,
                 estimator: str = "exact", probes: int = 16, tokens_per_backward: int = 2048) -> None:
        if int(neuron_group) < 1:
            raise OptinError(f"neuron_group must be >= 1, got {neuron_group}")
        if estimator not in ESTIMATORS:
            raise OptinError(f"unknown trajectory estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
        if int(probes) < 1 or int(tokens_per_backward) < 1:
            raise OptinError(f"probes and tokens_per_backward must be >= 1, got {probes} and {tokens_per_backward}")
        self.estimator = estimator
        self.probes = int(probes)
        self.tokens_per_backward = int(tokens_per_backward)
        self.temperature = float(temperature)
        self.lambda_kd = lambda_kd if lambda_kd == "auto" else float(lambda_kd)
        self.contribution = float(lambda_contribution)
        self.rows = int(rows)
        self.neuron_group = int(neuron_group)
        self.tokens_per_forward = int(tokens_per_forward)
        self.kd_divide_by_t = bool(kd_divide_by_t)
        self.kinds = kinds
        self.tokens = bool(tokens)
        self.extras: dict[str, UnitTensors] = {}

    def request_tokens(self, units: bool = True) -> None:
        self.tokens = True
        if not units:
            self.kinds = []

    def describe(self) -> dict:
        out = {"temperature": self.temperature, "lambda_kd": self.lambda_kd,
               "lambda_contribution": self.contribution, "rows": self.rows, "neuron_group": self.neuron_group,
               "kd_divide_by_t": self.kd_divide_by_t, "kinds": self.kinds, "tokens": self.tokens}
        if self.estimator != "exact":  # (kept out for exact scores: their files and checkpoints stay valid)
            out.update(estimator=self.estimator, probes=self.probes)
        return out

    def _group_size(self, kind: str) -> int:
        return 1 if kind in ("heads", "tokens") else self.neuron_group

    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        counts = dict(adapter.unit_counts())
        kinds = list(counts) if self.kinds is None else list(self.kinds)
        n_layers = len(next(iter(counts.values())))
        if self.tokens:  # OPTIN A.9: token positions as units, removed from their block on
            if not isinstance(adapter, TokenAdapter):
                raise OptinError(f"adapter {adapter.name!r} has no tokens to score (tokens=true)")
            counts["tokens"] = [adapter.token_units()] * n_layers
            kinds.append("tokens")
        traces = [adapter.trace(b) for b in batches]
        distance = adapter.trajectory_distance
        if distance not in ("manifold", "feature-mse"):
            raise OptinError(f"adapter {adapter.name!r} asks for trajectory distance {distance!r}; known: manifold, "
                             "feature-mse")
        samples = [_Manifold(tr, self.rows, ctx.seed + b) if distance == "manifold" else _FeatureMSE(tr)
                   for b, tr in enumerate(traces)]
        approximate = [k for k in kinds if k != "tokens"] if self.estimator == "gauss-newton" else []
        exact = [k for k in kinds if k not in approximate]
        passes = sum(len(gn.split_examples(int(tr.logits.shape[0]), self._examples_per_pass(tr))) for tr in traces)
        ctx.total(sum(len(unit_groups(n, self._group_size(k))) for k in exact for n in counts[k])
                  + (passes * self.probes if approximate else 0))
        md: UnitTensors = {k: [] for k in kinds}
        kd: UnitTensors = {k: [] for k in kinds}
        if approximate:
            got_md, got_kd = self._gauss_newton(adapter, batches, traces, samples, approximate, counts, n_layers, ctx)
            md.update(got_md)
            kd.update(got_kd)
        for kind in exact:
            for layer, n in enumerate(counts[kind]):
                groups = unit_groups(n, self._group_size(kind))
                key = f"{kind}.{layer}"
                got_md, got_kd = ctx.cached(f"md/{key}"), ctx.cached(f"kd/{key}")
                if got_md is None or got_kd is None:
                    got_md, got_kd = self._score_layer(adapter, batches, traces, samples, kind, layer, n, groups,
                                                       n_layers, ctx)
                    ctx.store(f"md/{key}", got_md)
                    ctx.store(f"kd/{key}", got_kd)
                else:
                    ctx.advance(len(groups))
                md[kind].append(self._expand(got_md, groups, n))
                kd[kind].append(self._expand(got_kd, groups, n))
        values, self.lambda_used = combine(md, kd, self.lambda_kd, self.contribution)
        self.extras = {"md": md, "kd": kd}
        if "tokens" in values:
            self.extras["tokens"] = {"tokens": values.pop("tokens")}
        return values

    def _examples_per_pass(self, trace: Trace) -> int:
        """Examples per forward+backward pass of the approximate estimator (memory: about
        ``tokens_per_backward`` token rows of activations kept for the backward passes)."""
        rows = max(1, max(e.numel() // e.shape[-1] for e in trace.embeddings) // int(trace.logits.shape[0]))
        return max(1, self.tokens_per_backward // rows)

    def _gauss_newton(self, adapter: Adapter, batches: list[Batch], traces: list[Trace], samples: list,
                      kinds: list[str], counts: dict[str, list[int]], n_layers: int, ctx: ScoreContext
                      ) -> tuple[UnitTensors, UnitTensors]:
        """Every unit of ``kinds`` at once: Gauss-Newton estimates of L_MD and L_KD (see gauss_newton)."""
        cached = {k: [(ctx.cached(f"gn-md/{k}.{i}"), ctx.cached(f"gn-kd/{k}.{i}")) for i in range(len(counts[k]))]
                  for k in kinds}
        if all(a is not None and b is not None for v in cached.values() for a, b in v):
            ctx.advance(sum(len(gn.split_examples(int(t.logits.shape[0]), self._examples_per_pass(t))) for t in traces)
                        * self.probes)
            return ({k: [a for a, _ in v] for k, v in cached.items()}, {k: [b for _, b in v] for k, v in cached.items()})
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        for p in params:  # gradients to the masks only
            p.requires_grad_(False)
        try:
            dtype = next(adapter.model.parameters()).dtype
            masks = {k: [torch.ones(n, dtype=dtype, requires_grad=True) for n in counts[k]] for k in kinds}
            md, kd = gn.estimate(adapter, batches, traces, samples, masks, n_layers, probes=self.probes,
                                 temperature=self.temperature, divide_by_t=self.kd_divide_by_t,
                                 examples_per_pass=min(self._examples_per_pass(t) for t in traces), seed=ctx.seed,
                                 advance=ctx.advance)
        finally:
            for p in params:
                p.requires_grad_(True)
        for k in kinds:
            for i in range(len(counts[k])):
                ctx.store(f"gn-md/{k}.{i}", md[k][i].float())
                ctx.store(f"gn-kd/{k}.{i}", kd[k][i].float())
        return ({k: [t.float() for t in v] for k, v in md.items()}, {k: [t.float() for t in v] for k, v in kd.items()})

    @staticmethod
    def _expand(group_scores: torch.Tensor, groups: list[list[int]], n: int) -> torch.Tensor:
        """Spread each group's importance evenly over its units, so that sums over units (what the
        searcher maximises) count a group once whatever the group size."""
        out = torch.zeros(n)
        for s, g in zip(group_scores, groups):
            out[g] = s / len(g)
        return out

    def _score_layer(self, adapter: Adapter, batches: list[Batch], traces: list, samples: list, kind: str,
                     layer: int, n: int, groups: list[list[int]], n_layers: int,
                     ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
        md = torch.zeros(len(groups), dtype=torch.float64)
        kd = torch.zeros(len(groups), dtype=torch.float64)
        targets = [z for z in range(layer + 1, n_layers)] or [layer]
        for b, (batch, tr, probe) in enumerate(zip(batches, traces, samples)):
            tokens = max(1, max(e.numel() // e.shape[-1] for e in tr.embeddings))
            per = max(1, self.tokens_per_forward // tokens)
            for start in range(0, len(groups), per):
                chunk = groups[start:start + per]
                masks = group_masks(n, chunk)
                reps = masks.shape[0]
                emb, logits = adapter.run_from(tr, kind, layer, masks, batch,
                                               select=lambda o, r=reps: probe.select(o, r))
                loss = sum(probe.distance(z, emb[z]) for z in targets)
                md[start:start + reps] += loss.double().cpu()
                kd[start:start + reps] += kd_divergence(logits.reshape(reps, *tr.logits.shape), tr.logits,
                                                        self.temperature, self.kd_divide_by_t).cpu()
                if b == len(batches) - 1:
                    ctx.advance(reps)
        return md.float(), kd.float()
