"""OPTIN trajectory importance (Khaki & Plataniotis, ICLR 2024, Eq. 3), exact or by its Gauss-Newton estimate.

For unit j of block i: mask it, rerun the model from block i on (cached inputs, several masks per
forward), and measure how far the later blocks' embeddings (manifold distillation) and the logits
(knowledge distillation) move:  I(i, j) = sum_{z > i} L_MD(F'_z, F_z) + lambda * L_KD(logits', logits).
The last block uses its own embedding. One fixed token sample per calibration batch (and per token
count, for models whose stages change it, e.g. Swin) serves every unit. CNN adapters
(``trajectory_distance = "feature-mse"``) compare batch-averaged feature maps by MSE instead (A.10).

The same quantity is estimated for every unit at once to second order by ``gauss_newton``. A plan, made from
the model's size and a timed forward pass before any work, chooses per kind between the two (and the neuron
group size) so that the job fits ``target_minutes``; it is printed, stored with the scores and followed by a
resumed job and by every process of a ``torchrun`` job.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from optin.contracts import SCALES, Adapter, Batch, RowSelect, ScoreContext, Scorer, TokenAdapter, Trace
from optin.devices import available_bytes
from optin.errors import OptinError
from optin.units import UnitTensors

from . import gauss_newton as gn
from .trajectory_plan import Plan, minutes, restart_cost
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

    def selector(self, replicas: int) -> RowSelect:
        """What run_from keeps of each block's embedding: the sampled rows of each of ``replicas``."""
        return RowSelect(self.rows, replicas)

    def distance(self, z: int, selected: torch.Tensor) -> torch.Tensor:
        return manifold_distance(relation_map(selected), self.refs[z])

    def duals(self, z: int, probes: int, generator: torch.Generator, batch: int) -> torch.Tensor:
        return gn.manifold_duals(self.ref_rows[z], probes, generator)

    def gradient(self, z: int, features: torch.Tensor, start: int, stop: int, duals: torch.Tensor
                 ) -> torch.Tensor | None:
        per = features.numel() // features.shape[-1] // (stop - start)  # token rows per example
        rows = self.rows[per * self.examples]
        inside = (rows >= start * per) & (rows < stop * per)
        if not bool(inside.any()):
            return None
        local = (rows[inside] - start * per).to(features.device)
        reference = F.normalize(self.ref_rows[z].detach().double(), dim=-1)
        return gn.manifold_gradient(features, local, reference, duals[inside.to(duals.device)])


class _FeatureMSE(gn.ProbeDistance):
    """CNN trajectory (OPTIN A.10): MSE between batch-averaged feature maps."""

    def __init__(self, trace: Trace) -> None:
        self.refs = [batch_mean(e, 1)[0] for e in trace.embeddings]

    @staticmethod
    def select(features: torch.Tensor, replicas: int) -> torch.Tensor:
        return batch_mean(features, replicas)

    def selector(self, replicas: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda features: batch_mean(features, replicas)

    def distance(self, z: int, selected: torch.Tensor) -> torch.Tensor:
        return feature_mse(selected, self.refs[z])

    def duals(self, z: int, probes: int, generator: torch.Generator, batch: int) -> torch.Tensor:
        return gn.feature_duals(self.refs[z], probes, generator, batch)

    def gradient(self, z: int, features: torch.Tensor, start: int, stop: int, duals: torch.Tensor
                 ) -> torch.Tensor | None:
        return duals.to(device=features.device, dtype=torch.float64).unsqueeze(0).expand(features.shape)


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
                 rows: int = 768, neuron_group: int | str = "auto", tokens_per_forward: int | str = "auto",
                 kd_divide_by_t: bool = True, kinds: list[str] | None = None, tokens: bool = False,
                 estimator: str = "auto", probes: int = 32, tokens_per_backward: int = 512,
                 target_minutes: float = 5.0, last_block: str = "own", scale: str = "global") -> None:
        if neuron_group != "auto" and int(neuron_group) < 1:
            raise OptinError(f"neuron_group must be >= 1 (or auto), got {neuron_group}")
        if estimator not in ESTIMATORS + ("auto",):
            raise OptinError(f"unknown trajectory estimator {estimator!r}; use auto, {', '.join(ESTIMATORS)}")
        if int(probes) < 1 or int(tokens_per_backward) < 1 or (tokens_per_forward != "auto" and int(tokens_per_forward) < 1):
            raise OptinError(f"probes, tokens_per_backward and tokens_per_forward must be >= 1, got {probes}, "
                             f"{tokens_per_backward} and {tokens_per_forward}")
        if last_block not in ("own", "kd"):
            raise OptinError(f"last_block must be own (its own embedding and KD) or kd (KD only), got {last_block!r}")
        if scale not in SCALES:
            raise OptinError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.last_block = last_block
        self.scale = scale  # "global" (the default): one distance for every unit; "kind"/"layer" for ablations
        if not float(target_minutes) > 0:
            raise OptinError(f"target_minutes must be positive, got {target_minutes}")
        self.estimator = estimator
        self.probes = int(probes)
        self.tokens_per_backward = int(tokens_per_backward)
        self.target_minutes = float(target_minutes)
        self.temperature = float(temperature)
        self.lambda_kd = lambda_kd if lambda_kd == "auto" else float(lambda_kd)
        self.contribution = float(lambda_contribution)
        self.rows = int(rows)
        self.neuron_group = neuron_group if neuron_group == "auto" else int(neuron_group)
        self.tokens_per_forward = tokens_per_forward if tokens_per_forward == "auto" else int(tokens_per_forward)
        self.kd_divide_by_t = bool(kd_divide_by_t)
        self.kinds = kinds
        self.tokens = bool(tokens)
        self.extras: dict[str, UnitTensors] = {}
        self.plan: Plan | None = None

    def request_tokens(self, units: bool = True) -> None:
        self.tokens = True
        if not units:
            self.kinds = []

    def describe(self) -> dict:
        """The options that change the scores (the plan chosen for "auto" options is added once known)."""
        out = {"temperature": self.temperature, "lambda_kd": self.lambda_kd,
               "lambda_contribution": self.contribution, "rows": self.rows, "neuron_group": self.neuron_group,
               "kd_divide_by_t": self.kd_divide_by_t, "kinds": self.kinds, "tokens": self.tokens,
               "estimator": self.estimator, "probes": self.probes}
        if self.last_block != "own":
            out["last_block"] = self.last_block
        if self.plan is not None:
            out["plan"] = {"estimator": self.plan.estimator, "group": self.plan.group, "probes": self.plan.probes}
        return out

    # --- planning -------------------------------------------------------------------------------
    def make_plan(self, adapter: Adapter, kinds: list[str], counts: dict[str, list[int]], n_layers: int,
                  traces: list[Trace], forward_seconds: float, restart_factor: float = 1.0) -> Plan:
        """Choose, per kind, exact or Gauss-Newton scoring and the neuron group size, so that the job fits
        ``target_minutes`` on this machine (estimated from the measured forward time; exact restarts from
        ``restart_factor`` x their modelled share of it, ``time_restart``).

        ``estimator="auto"``: every unit exactly when that fits the target; otherwise the few, costly units
        (heads, tokens) exactly and the many (neurons, channels) by Gauss-Newton, where the adapter supports
        it; with an explicit ``neuron_group`` exactly in groups (the user asked for exact groups)."""
        supports_gn = type(adapter).forward_embeddings is not Adapter.forward_embeddings
        if self.estimator == "gauss-newton" and not supports_gn:
            raise OptinError(f"adapter {adapter.name!r} does not support the approximate trajectory "
                             "(no forward_embeddings); use estimator=exact")
        few = ("heads", "tokens")
        budget = 60 * self.target_minutes
        passes = sum(len(gn.split_examples(int(t.logits.shape[0]), self._examples_per_pass(t))) for t in traces)

        def seconds(estimator: dict[str, str], group: dict[str, int]) -> float:
            exact = forward_seconds * restart_factor * sum(len(unit_groups(n, group[k])) * restart_cost(n_layers, i, k)
                                          for k in kinds if estimator[k] == "exact" for i, n in enumerate(counts[k]))
            approx = forward_seconds * (1 + 2.7 * self.probes) * (1 + 0.05 * (passes - 1)) \
                if "gauss-newton" in estimator.values() else 0.0
            return exact + approx

        group = {k: 1 if k in few or self.neuron_group == "auto" else int(self.neuron_group) for k in kinds}
        every = {k: "exact" for k in kinds}
        if self.estimator == "exact" or not supports_gn or \
                (self.estimator == "auto" and (self.neuron_group != "auto" or seconds(every, group) <= budget)):
            estimator = every
        else:
            estimator = {k: "exact" if (k in few and self.estimator == "auto") or k == "tokens" else "gauss-newton"
                         for k in kinds}
        if self.neuron_group == "auto":  # exact neurons/channels in the smallest power-of-two groups that fit
            many = [k for k in kinds if estimator[k] == "exact" and k not in few]
            while many and seconds(estimator, group) > budget and any(group[k] < 256 for k in many):
                for k in many:
                    group[k] = min(256, group[k] * 2)
        return Plan(estimator, group, self.probes, seconds(estimator, group), forward_seconds, restart_factor)

    def time_restart(self, adapter: Adapter, batch: Batch, trace: Trace, probe: Any, kind: str, n: int,
                     n_layers: int, forward_seconds: float, traces: list[Trace]) -> float:
        """How much longer a real masked restart takes than ``restart_cost`` models: two restarts of one chunk
        of units of ``kind`` at the first layer (the costliest), the second timed, against their modelled
        share of ``forward_seconds`` (the distances on the sampled rows and the replicas are not in the
        model, and their weight differs between models)."""
        if n < 2 or forward_seconds <= 0:
            return 1.0
        per = min(n // 2, self.masks_per_forward(trace, self.forward_tokens(traces)))
        self._chunk(adapter, batch, trace, probe, kind, 0, n, [[i] for i in range(per)], n_layers)  # warm-up
        t0 = time.perf_counter()
        self._chunk(adapter, batch, trace, probe, kind, 0, n, [[i] for i in range(per, 2 * per)], n_layers)
        measured = time.perf_counter() - t0
        return min(20.0, max(0.25, measured / (per * restart_cost(n_layers, 0, kind) * forward_seconds)))

    # --- scoring --------------------------------------------------------------------------------
    def score(self, adapter: Adapter, batches: list[Batch], ctx: ScoreContext) -> UnitTensors:
        counts = dict(adapter.unit_counts())
        kinds = list(counts) if self.kinds is None else list(self.kinds)
        n_layers = len(next(iter(counts.values())))
        if self.tokens:  # OPTIN A.9: token positions as units, removed from their block on
            if not isinstance(adapter, TokenAdapter):
                raise OptinError(f"adapter {adapter.name!r} has no tokens to score (tokens=true)")
            counts["tokens"] = [adapter.token_units()] * n_layers
            kinds.append("tokens")
        distance = adapter.trajectory_distance
        if distance not in ("manifold", "feature-mse"):
            raise OptinError(f"adapter {adapter.name!r} asks for trajectory distance {distance!r}; known: manifold, "
                             "feature-mse")
        traces = [adapter.trace(b) for b in batches]
        t0 = time.perf_counter()  # one warm forward pass, for the plan (the traces paid the first-call costs)
        with torch.no_grad():
            adapter.logits(batches[0])
        forward_seconds = time.perf_counter() - t0
        samples = [_Manifold(tr, self.rows, ctx.seed + b) if distance == "manifold" else _FeatureMSE(tr)
                   for b, tr in enumerate(traces)]
        factor = 1.0
        if ctx.cached("plan") is None and self.estimator != "gauss-newton":  # a resumed job keeps its plan
            kind = max((k for k in kinds if k != "tokens"), key=lambda k: sum(counts[k]), default=kinds[0])
            factor = self.time_restart(adapter, batches[0], traces[0], samples[0], kind, counts[kind][0], n_layers,
                                       forward_seconds, traces)
        plan = self.make_plan(adapter, kinds, counts, n_layers, traces, forward_seconds, factor)
        self.plan = plan = self._agreed(plan, ctx)
        ctx.note(f"trajectory: {plan.describe(counts)} on {sum(int(t.logits.shape[0]) for t in traces)} "
                 f"calibration examples; one forward pass takes {forward_seconds:.2f} s"
                 + (f" and a masked restart {plan.restart_factor:.1f}x its share of one"
                    if abs(plan.restart_factor - 1) > 0.05 else "")
                 + f", so about {minutes(plan.seconds)} in all" + (f" on {ctx.world} processes (less)" if ctx.world > 1 else ""))
        approximate = [k for k in kinds if plan.estimator[k] == "gauss-newton"]
        exact = [k for k in kinds if plan.estimator[k] == "exact"]
        jobs = self._exact_jobs(exact, counts, traces, plan)
        mine_jobs = ctx.mine(len(jobs))
        mine_probes = ctx.mine(self.probes) if approximate else []
        passes = sum(len(gn.split_examples(int(t.logits.shape[0]), self._examples_per_pass(t))) for t in traces)
        ctx.total(sum(jobs[j][-1] for j in mine_jobs) + passes * len(mine_probes))
        md: UnitTensors = {k: [] for k in kinds}
        kd: UnitTensors = {k: [] for k in kinds}
        if approximate:
            got_md, got_kd = self._gauss_newton(adapter, batches, traces, samples, approximate, counts, n_layers,
                                                mine_probes, ctx)
            md.update(got_md)
            kd.update(got_kd)
        if exact:
            got_md, got_kd = self._exact(adapter, batches, traces, samples, exact, counts, n_layers, plan, jobs,
                                         mine_jobs, ctx)
            md.update(got_md)
            kd.update(got_kd)
        md = {k: md[k] for k in kinds}
        kd = {k: kd[k] for k in kinds}
        values, self.lambda_used = combine(md, kd, self.lambda_kd, self.contribution)
        self.extras = {"md": md, "kd": kd}
        if "tokens" in values:
            self.extras["tokens"] = {"tokens": values.pop("tokens")}
        return values

    @staticmethod
    def _agreed(plan: Plan, ctx: ScoreContext) -> Plan:
        """The plan every process and every resumed run follows: an interrupted job resumes with the plan it
        started with (kept in the checkpoint: the work is stored per chunk of that plan), and under torchrun
        rank 0's plan is everyone's (each process times its own forward pass)."""
        stored = ctx.cached("plan")
        if stored is not None:
            plan = Plan.decode(stored)
        if ctx.world > 1:
            plan = Plan.decode(ctx.reduce(plan.encode() if ctx.rank == 0 else torch.zeros(Plan.SIZE, dtype=torch.float64)))
        if stored is None:
            ctx.store("plan", plan.encode())
        return plan

    def forward_tokens(self, traces: list[Trace]) -> int:
        """Token rows one batched exact restart may hold: ``tokens_per_forward``, or ("auto") what a quarter of
        the memory available now allows for a block's activations (about 16 floats per feature of a row,
        all replicas at once), at most 8,192 on a CPU: a CPU matrix product is at full speed well below that,
        and larger restarts only raise the peak memory (a BERT-base block holds about 1 GB at 32,768 rows)."""
        if self.tokens_per_forward != "auto":
            return int(self.tokens_per_forward)
        e = traces[0].embeddings[0]
        per_row = 16 * max(t.shape[-1] if t.dim() >= 3 else t[0].numel() for t in traces[0].embeddings) * e.element_size()
        fits = available_bytes(e.device) // 4 // max(1, per_row)
        return int(max(1024, min(fits, 8192 if e.device.type == "cpu" else 1 << 20)))

    @staticmethod
    def masks_per_forward(trace: Trace, token_rows: int) -> int:
        """How many masks one batched exact restart of ``trace``'s batch holds within ``token_rows`` rows."""
        tokens = max(1, max(e.numel() // e.shape[-1] for e in trace.embeddings))
        return max(1, token_rows // tokens)

    def _exact_jobs(self, kinds: list[str], counts: dict[str, list[int]], traces: list[Trace], plan: Plan
                    ) -> list[tuple[str, int, int, int, int]]:
        """The exact work in chunks of masks sharing one forward: (kind, layer, batch, first group, groups)."""
        jobs = []
        budget = self.forward_tokens(traces)
        for kind in kinds:
            for layer, n in enumerate(counts[kind]):
                n_groups = len(unit_groups(n, plan.group[kind]))
                for b, tr in enumerate(traces):
                    per = self.masks_per_forward(tr, budget)
                    for start in range(0, n_groups, per):
                        jobs.append((kind, layer, b, start, min(per, n_groups - start)))
        return jobs

    def _exact(self, adapter: Adapter, batches: list[Batch], traces: list[Trace], samples: list, kinds: list[str],
               counts: dict[str, list[int]], n_layers: int, plan: Plan, jobs: list, mine: list[int],
               ctx: ScoreContext) -> tuple[UnitTensors, UnitTensors]:
        """One masked restart per group, in chunks; each chunk's result is stored (resumable) and, with several
        processes, each chunk is computed by one of them and the sums are shared (``ctx.reduce``)."""
        groups = {(k, i): unit_groups(n, plan.group[k]) for k in kinds for i, n in enumerate(counts[k])}
        sums = {key: torch.zeros(2, len(g), dtype=torch.float64) for key, g in groups.items()}
        for j in mine:
            kind, layer, b, start, size = jobs[j]
            key = f"{kind}.{layer}#{b}.{start}"
            got = ctx.cached(key)
            if got is None:
                got = self._chunk(adapter, batches[b], traces[b], samples[b], kind, layer, counts[kind][layer],
                                  groups[(kind, layer)][start:start + size], n_layers)
                ctx.store(key, got)
            sums[(kind, layer)][:, start:start + size] += got
            ctx.advance(size)
        flat = ctx.reduce(torch.cat([v.flatten() for v in sums.values()]))
        at, md, kd = 0, {k: [] for k in kinds}, {k: [] for k in kinds}
        for (kind, layer), v in sums.items():
            both = flat[at:at + v.numel()].reshape(v.shape)
            at += v.numel()
            md[kind].append(self._expand(both[0].float(), groups[(kind, layer)], counts[kind][layer]))
            kd[kind].append(self._expand(both[1].float(), groups[(kind, layer)], counts[kind][layer]))
        return md, kd

    def _examples_per_pass(self, trace: Trace) -> int:
        """Examples per forward+backward pass of the approximate estimator (memory: about
        ``tokens_per_backward`` token rows of activations kept for the backward passes)."""
        rows = max(1, max(e.numel() // e.shape[-1] for e in trace.embeddings) // int(trace.logits.shape[0]))
        return max(1, self.tokens_per_backward // rows)

    def _gauss_newton(self, adapter: Adapter, batches: list[Batch], traces: list[Trace], samples: list,
                      kinds: list[str], counts: dict[str, list[int]], n_layers: int, mine: list[int],
                      ctx: ScoreContext) -> tuple[UnitTensors, UnitTensors]:
        """Every unit of ``kinds`` at once: Gauss-Newton estimates of L_MD and L_KD (see gauss_newton); with
        several processes each does its share of the probes."""
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        for p in params:  # gradients to the masks only
            p.requires_grad_(False)
        try:
            dtype = next(adapter.model.parameters()).dtype
            masks = {k: [torch.ones(n, dtype=dtype, requires_grad=True) for n in counts[k]] for k in kinds}
            md, kd = gn.estimate(adapter, batches, traces, samples, masks, n_layers, probes=self.probes,
                                 temperature=self.temperature, divide_by_t=self.kd_divide_by_t,
                                 examples_per_pass=min(self._examples_per_pass(t) for t in traces), seed=ctx.seed,
                                 mine=mine, cached=ctx.cached, store=ctx.store, advance=ctx.advance,
                                 last_own=self.last_block == "own")
        finally:
            for p in params:
                p.requires_grad_(True)
        both = ctx.reduce(torch.cat([md, kd])) / self.probes
        n = md.numel()
        return ({k: [t.float() for t in v] for k, v in gn.unflat(both[:n], masks).items()},
                {k: [t.float() for t in v] for k, v in gn.unflat(both[n:], masks).items()})

    @staticmethod
    def _expand(group_scores: torch.Tensor, groups: list[list[int]], n: int) -> torch.Tensor:
        """Spread each group's importance evenly over its units, so that sums over units (what the
        searcher maximises) count a group once whatever the group size."""
        out = torch.zeros(n)
        for s, g in zip(group_scores, groups):
            out[g] = s / len(g)
        return out

    def _chunk(self, adapter: Adapter, batch: Batch, trace: Trace, probe: Any, kind: str, layer: int, n: int,
               groups: list[list[int]], n_layers: int) -> torch.Tensor:
        """MD and KD (2, len(groups)) float64 for one forward of ``len(groups)`` masks at ``layer``."""
        masks = group_masks(n, groups)
        reps = masks.shape[0]
        targets = [z for z in range(layer + 1, n_layers)] or ([layer] if self.last_block == "own" else [])
        emb, logits = adapter.run_from(trace, kind, layer, masks, batch, select=probe.selector(reps))
        loss = torch.zeros(reps, dtype=torch.float64)  # (no target: the last block scored by KD only)
        for z in targets:
            loss += probe.distance(z, emb[z]).double().cpu()
        kl = kd_divergence(logits.reshape(reps, *trace.logits.shape), trace.logits, self.temperature,
                           self.kd_divide_by_t)
        return torch.stack([loss, kl.cpu()])
