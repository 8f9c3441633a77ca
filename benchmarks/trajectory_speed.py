"""Exact trajectory scoring vs the naive loop (issue: scoring speed).

The naive loop masks one unit at a time and runs the whole model from the embeddings on the padded
calibration batch (what the official code does). optin's exact engine starts each unit's forward at its own
block from cached inputs with nothing before the unit recomputed (the masked unit's contribution is
subtracted from the unmasked output projection), batches many masks per forward, skips padding and keeps
only the sampled token rows. Both compute the same quantity on the same token sample, so the scores must
agree; the script prints the max relative difference and the speed ratio.

    python benchmarks/trajectory_speed.py --model minilm-trec --calib-size 32
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from optin.contracts import ScoreContext
from optin_plugins.scorers.distances import kd_divergence, manifold_distance, relation_map, sample_rows, select_rows
from optin.models import load_model
from optin.recipe import batches_of
from optin.registry import create
from optin.tasks import get_task, sample
from optin_plugins.scorers.trajectory import combine


@torch.no_grad()
def naive_trajectory(adapter, batch, rows_k: int, temperature: float, seed: int) -> tuple[dict, dict]:
    """One full masked forward per unit; returns (md, kd) per kind per layer."""
    trace = adapter.trace(batch)
    first = trace.embeddings[0]
    rows = sample_rows(trace.valid, first.shape[0] * first.shape[1], rows_k, seed)
    refs = [relation_map(select_rows(e, 1, rows))[0] for e in trace.embeddings]
    counts = adapter.unit_counts()
    n_layers = len(counts["heads"])
    md = {k: [torch.zeros(n) for n in ns] for k, ns in counts.items()}
    kd = {k: [torch.zeros(n) for n in ns] for k, ns in counts.items()}
    emb: dict[int, torch.Tensor] = {}
    hooks = [adapter.layers[z].output.dense.register_forward_hook(lambda m, a, o, z=z: emb.__setitem__(z, o))
             for z in range(n_layers)]
    try:
        for kind, ns in counts.items():
            for layer, n in enumerate(ns):
                targets = list(range(layer + 1, n_layers)) or [layer]
                for j in range(n):
                    mask = torch.ones(n)
                    mask[j] = 0
                    masks = {k: [None] * n_layers for k in counts}
                    masks[kind][layer] = mask
                    with adapter.masked(masks):
                        logits = adapter.logits(batch)
                    md[kind][layer][j] = float(sum(manifold_distance(relation_map(select_rows(emb[z], 1, rows)),
                                                                     refs[z]) for z in targets))
                    kd[kind][layer][j] = float(kd_divergence(logits.unsqueeze(0), trace.logits, temperature)[0])
    finally:
        for h in hooks:
            h.remove()
    return md, kd


def compare(adapter, batch, seed: int) -> dict:
    """Score every unit both ways; return times and the largest differences."""
    scorer = create("scorer", "trajectory", {"estimator": "exact", "neuron_group": 1})  # every unit, exactly
    t0 = time.perf_counter()
    fast = scorer.score(adapter, [batch], ScoreContext(seed=seed))
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    md, kd = naive_trajectory(adapter, batch, scorer.rows, scorer.temperature, seed)
    t_naive = time.perf_counter() - t0
    slow, lam = combine(md, kd, "auto", scorer.contribution)
    a = torch.cat([torch.cat(fast[k]) for k in fast]).double()
    b = torch.cat([torch.cat(slow[k]) for k in fast]).double()
    nonzero = b.abs() > 1e-12 * b.abs().max()
    return {"units": int(a.numel()), "seconds_naive": t_naive, "seconds_optin": t_fast, "speedup": t_naive / t_fast,
            "max_rel_diff": float(((a - b).abs() / b.abs())[nonzero].max()),
            "max_abs_diff_over_max_score": float((a - b).abs().max() / b.abs().max()), "lambda": lam}


def shrink(adapter, neurons: int):
    counts = adapter.unit_counts()
    adapter.prune({"neurons": [(torch.arange(n) < neurons).float() for n in counts["neurons"]]})
    return adapter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec")
    ap.add_argument("--task", default="trec")
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--neurons-per-layer", type=int, default=128,
                    help="shrink each FFN to its first N neurons first, so the naive loop finishes in minutes")
    ap.add_argument("--exact-neurons", type=int, default=16,
                    help="neurons per layer for the float64 exactness check")
    ap.add_argument("--out", default="benchmarks/results/trajectory_speed.json")
    args = ap.parse_args()
    task = get_task(args.task)
    adapter = load_model(args.model)
    batch = batches_of(adapter, sample(task.examples("train"), args.calib_size, args.seed), args.calib_size)[0]
    exact = copy.deepcopy(adapter)
    speed = compare(shrink(adapter, args.neurons_per_layer), batch, args.seed)  # float32, as used
    exact.model.double()
    check = compare(shrink(exact, args.exact_neurons), batch, args.seed)  # float64: the algorithm itself
    result = {"model": args.model, "calibration_examples": args.calib_size, "threads": torch.get_num_threads(),
              "float32_speed": {"neurons_per_layer": args.neurons_per_layer, **speed},
              "float64_exactness": {"neurons_per_layer": args.exact_neurons, **check},
              "command": f"python benchmarks/trajectory_speed.py --model {args.model} --calib-size {args.calib_size} "
                         f"--neurons-per-layer {args.neurons_per_layer} --exact-neurons {args.exact_neurons}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
