"""The approximate trajectory: a Gauss-Newton estimate of every unit's trajectory distances at once.

Both trajectory distances are squared distances from the unmasked model, zero with zero gradient at the
all-ones mask m = 1 (DESIGN.md 3.10). To second order, removing unit u (m -> 1 - e_u) costs

    L_MD(u) ~ sum_{z > i} || J_z e_u ||^2            J_z = d vec(M_z) / d m, M_z block z's relation map
    L_KD(u) ~ (T^2 / t^2) / 2 * sum_b (J_b e_u)^T S_b (J_b e_u)   J_b = d logits_b / d m, S_b = diag(p) - p p^T

(p = softmax(logits_b / t), t = T or 1 as the exact KD divides by it or not). Squared column norms of a
Jacobian are estimated with random probes (Hutchinson): for a probe v with E[v v^T] = I (Rademacher),
E[(v^T J e_u)^2] = ||J e_u||^2, and ``v^T J`` for every unit at once is one backward pass of
``<v, M(m)>``. For the KD term the probe is ``onehot(c) - p`` with c drawn from p (covariance S: the
Fisher of the model's own predictive distribution, not of the true labels).

Only later blocks count for a unit of block i (its own block only for the last block). A backward pass
of ``sum_z <v_z, M_z>`` gives unit u of block i the terms of every z >= i (earlier blocks do not depend on
it); the z = i term is removed by a second, local backward of ``<v_i, M_i>`` with respect to block i's
masks alone (autograd only walks block i for it).

Relation maps couple token rows of different examples, so with micro-batches the probe's dual
``G = (V + V^T) f`` (f the unmasked normalised rows) is fixed once per batch and each micro-batch
contributes ``sum_{rows in it} <G_row, normalize(F_row(m))>``, whose gradient is that micro-batch's part of
``V^T J``; gradients are summed over micro-batches before squaring.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from optin.contracts import Adapter, Batch, Trace
from optin.units import UnitTensors


def rademacher(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Independent +-1 entries (probes with E[v v^T] = I and the lowest-variance Hutchinson estimate)."""
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype)


def manifold_duals(reference_rows: torch.Tensor, probes: int, generator: torch.Generator) -> torch.Tensor:
    """(P, K, K) int8: ``V + V^T`` for P Rademacher probes V (K, K), entries in {-2, 0, 2}. The gradient of
    ``<V, f f^T>`` with respect to the rows f is ``(V + V^T) f``; it is formed one probe at a time
    (``manifold_gradient``), so a block holds P K^2 bytes instead of 8 P K D."""
    k = reference_rows.shape[0]
    v = rademacher((probes, k, k), generator, torch.int8)
    return v + v.transpose(1, 2)


def manifold_gradient(features: torch.Tensor, local: torch.Tensor, reference: torch.Tensor,
                      dual_rows: torch.Tensor) -> torch.Tensor:
    """The gradient, with respect to ``features`` (..., D), of ``<G, normalize(features rows local)>`` with
    ``G = dual_rows @ reference`` (dual_rows (k, K) int8 of one probe, reference the unmasked normalised rows
    (K, D), float64): ``(G - u (u.G)) / |x|`` on each selected row x (u = x / |x|), zero elsewhere."""
    flat = features.reshape(-1, features.shape[-1])
    x = flat[local].double()
    g = dual_rows.to(device=x.device, dtype=torch.float64) @ reference.to(x.device)
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
    u = x / norm
    out = torch.zeros(flat.shape, dtype=torch.float64, device=x.device)
    out.index_add_(0, local, (g - u * (u * g).sum(-1, keepdim=True)) / norm)
    return out.reshape(features.shape)


def feature_duals(reference: torch.Tensor, probes: int, generator: torch.Generator, batch: int) -> torch.Tensor:
    """(P, *map): probes for the CNN distance ``mean((mean_b F' - mean_b F)^2)``, scaled so that the squared
    gradient of ``sum_b <V, F_b>`` estimates it: V / (batch * sqrt(numel))."""
    v = rademacher((probes, *reference.shape), generator)  # on the CPU, like every probe
    return v / (batch * math.sqrt(reference.numel()))


def kd_duals(logits: torch.Tensor, probes: int, generator: torch.Generator, temperature: float,
             divide_by_t: bool) -> torch.Tensor:
    """(P, B, C, *spatial): ``(onehot(c) - p) * T / (t * sqrt(2 * pixels))`` with c drawn from
    p = softmax(logits / t) at every example (and pixel). The squared gradient of ``<U, logits(m)>``
    estimates the KD term of ``kd_divergence`` (KL x T^2, averaged over pixels, summed over the batch)."""
    t = temperature if divide_by_t else 1.0
    p = torch.softmax(logits.double() / t, dim=1)
    classes = p.shape[1]
    flat = p.movedim(1, -1).reshape(-1, classes)
    draws = torch.multinomial(flat.float().expand(probes, *flat.shape).reshape(-1, classes), 1, replacement=True,
                              generator=generator).reshape(probes, -1)
    onehot = F.one_hot(draws, classes).double().reshape(probes, *p.movedim(1, -1).shape).movedim(-1, 2)
    pixels = p[0, 0].numel()
    return (onehot - p.unsqueeze(0)) * (temperature / (t * math.sqrt(2.0 * pixels)))


def split_examples(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) example ranges of at most ``size``."""
    return [(s, min(n, s + size)) for s in range(0, n, max(1, size))]


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of a batch (tensors split on dim 0, other values shared)."""
    return {k: (v[start:stop] if torch.is_tensor(v) else v) for k, v in batch.items()}


def _flat(grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]) -> torch.Tensor:
    """One float64 CPU vector of per-unit gradients (zeros for masks the output does not reach)."""
    return torch.cat([(g.detach().double().cpu() if g is not None else torch.zeros(m.numel(), dtype=torch.float64))
                      .flatten() for g, m in zip(grads, like)])


class ProbeDistance:
    """What the estimator needs from a trajectory distance: per block, fixed probe duals for a batch, and
    for one probe the gradient of its probe term ``<V_z, M_z>`` with respect to a micro-batch's embedding."""

    def duals(self, z: int, probes: int, generator: torch.Generator, batch: int) -> torch.Tensor:
        raise NotImplementedError

    def gradient(self, z: int, features: torch.Tensor, start: int, stop: int, duals: torch.Tensor
                 ) -> torch.Tensor | None:
        """``d<V_z, M_z>/dF_z`` (float64, the shape of ``features``) of the probe whose ``duals`` are given
        (one probe's slice), for examples ``start:stop``; None where the micro-batch holds no sampled row."""
        raise NotImplementedError


def probe_generator(seed: int, batch: int, probe: int) -> torch.Generator:
    """The random stream of one probe of one batch: the same whichever process draws it."""
    return torch.Generator().manual_seed(((seed * 1000003 + batch) * 1000003 + probe) % (2**63))


def estimate(adapter: Adapter, batches: list[Batch], traces: list[Trace], distances: list[ProbeDistance],
             masks: dict[str, list[torch.Tensor]], n_layers: int, *, probes: int, temperature: float,
             divide_by_t: bool, examples_per_pass: int, seed: int, mine: list[int] | None = None,
             last_own: bool = True,
             cached: Callable[[str], torch.Tensor | None] = lambda key: None,
             store: Callable[[str, torch.Tensor], None] = lambda key, value: None,
             advance: Callable[[int], None] = lambda n: None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the probes ``mine`` (default all of ``range(probes)``) of the squared probe gradients for
    L_MD and L_KD: two flat float64 vectors over the units of ``masks`` (leaf tensors of ones with
    ``requires_grad``, one per kind and layer, in that order). Divide by ``probes`` (after summing over the
    processes that share the probes) for the estimates. Each micro-batch's contribution is ``store``d
    under ``gn/{batch}.{start}`` and taken from ``cached`` when an interrupted run resumes."""
    mine = list(range(probes)) if mine is None else list(mine)
    kinds = list(masks)
    flat_masks = [m for k in kinds for m in masks[k]]
    offsets = [0]
    for m in flat_masks:
        offsets.append(offsets[-1] + m.numel())
    where = {(k, i): offsets[j] for j, (k, i) in enumerate((k, i) for k in kinds for i in range(len(masks[k])))}
    md_sum = torch.zeros(offsets[-1], dtype=torch.float64)
    kd_sum = torch.zeros(offsets[-1], dtype=torch.float64)
    for b, (batch, trace, dist) in enumerate(zip(batches, traces, distances)):
        n_ex = int(trace.logits.shape[0])
        device = trace.logits.device
        gens = [probe_generator(seed, b, p) for p in mine]
        duals = [torch.cat([dist.duals(z, 1, g, n_ex) for g in gens]).to(device) for z in range(n_layers)]
        kd = torch.cat([kd_duals(trace.logits.cpu(), 1, g, temperature, divide_by_t) for g in gens]).to(device)
        g_md = torch.zeros(len(mine), offsets[-1], dtype=torch.float64)
        g_kd = torch.zeros(len(mine), offsets[-1], dtype=torch.float64)
        for start, stop in split_examples(n_ex, examples_per_pass):
            key = f"gn/{b}.{start}"
            got_md, got_kd = cached(f"{key}/md"), cached(f"{key}/kd")
            if got_md is None or got_kd is None:
                got_md, got_kd = _pass(adapter, slice_batch(batch, start, stop), dist, duals, kd[:, start:stop],
                                       flat_masks, masks, where, offsets[-1], n_layers, start, stop, advance,
                                       n_layers - 1 if last_own else n_layers)
                store(f"{key}/md", got_md)
                store(f"{key}/kd", got_kd)
            else:
                advance(len(mine))
            g_md += got_md
            g_kd += got_kd
        md_sum += g_md.pow(2).sum(0)  # a probe's gradient is summed over micro-batches before squaring
        kd_sum += g_kd.pow(2).sum(0)
    return md_sum, kd_sum


def _pass(adapter: Adapter, batch: Batch, dist: ProbeDistance, duals: list[torch.Tensor], kd: torch.Tensor,
          flat_masks: list[torch.Tensor], masks: dict[str, list[torch.Tensor]], where: dict[tuple[str, int], int],
          n_units: int, n_layers: int, start: int, stop: int, advance: Callable[[int], None], local_layers: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: one forward with the masks, then per probe the backward passes; returns the
    per-probe gradients (P, units) of the MD probe (own-block term removed) and of the KD probe.

    The probes enter the model's backward as gradients of its outputs: ``G_z = d<V_z, M_z>/dF_z`` (formed
    by the distance for one probe at a time) for every block, ``U`` for the logits; so each backward
    carries one probe's tensors, never all of them."""
    probes = kd.shape[0]
    g_md = torch.zeros(probes, n_units, dtype=torch.float64)
    g_kd = torch.zeros(probes, n_units, dtype=torch.float64)
    with torch.enable_grad(), adapter.masked(masks):
        embeddings, logits = adapter.forward_embeddings(batch)
    detached = [e.detach() for e in embeddings]
    first = {z: dist.gradient(z, detached[z], start, stop, duals[z][0]) for z in range(n_layers)}
    reached = [z for z in range(n_layers) if first[z] is not None and embeddings[z].requires_grad]
    own = {i: [(k, masks[k][i]) for k in masks if masks[k][i].numel()] for i in range(local_layers)}
    scale = kd.to(logits.dtype)
    for p in range(probes):
        last = p + 1 == probes
        outs = {z: (first[z] if p == 0 else dist.gradient(z, detached[z], start, stop, duals[z][p]))
                .to(embeddings[z].dtype) for z in reached}  # d<V_z, M_z>/dF_z for this probe alone
        first = {}
        grads = torch.autograd.grad([embeddings[z] for z in reached], flat_masks,
                                    grad_outputs=[outs[z] for z in reached], retain_graph=True, allow_unused=True)
        g_md[p] = _flat(grads, flat_masks)
        for i in range(local_layers):  # the unit's own block: a backward from F_i to block i's masks only
            if own[i] and i in reached:
                local = torch.autograd.grad(embeddings[i], [m for _, m in own[i]], grad_outputs=outs[i],
                                            retain_graph=True, allow_unused=True)
                for (k, m), g in zip(own[i], local):
                    if g is not None:
                        g_md[p, where[(k, i)]:where[(k, i)] + m.numel()] -= g.detach().double().cpu()
        g_kd[p] = _flat(torch.autograd.grad(logits, flat_masks, grad_outputs=scale[p], retain_graph=not last,
                                            allow_unused=True), flat_masks)
        advance(1)
    return g_md, g_kd


def unflat(values: torch.Tensor, masks: dict[str, list[torch.Tensor]]) -> UnitTensors:
    """A flat vector over the units of ``masks`` (kind by kind, layer by layer) as UnitTensors."""
    kinds = list(masks)
    out: UnitTensors = {k: [] for k in kinds}
    at = 0
    for k in kinds:
        for m in masks[k]:
            out[k].append(values[at:at + m.numel()].clone())
            at += m.numel()
    return out
