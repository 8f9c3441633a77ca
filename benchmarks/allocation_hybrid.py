"""Which units, or how many per layer? Two scorers' masks taken apart (issue "Accuracy at budget").

For scorers A and B at each budget and calibration seed: A's masks and B's masks (each at its own
allocation blend), then A's order inside each layer with B's kept count per layer, and B's order with A's
counts; each recovered (``--recover auto``), removed and evaluated on the same held-out examples, paired
against A. When "A's order, B's counts" closes most of the gap to B, the scorers differ in how many units
each layer keeps, not in which.

    python benchmarks/allocation_hybrid.py --model m2f-mosaic --a trajectory:0 --b magnitude:0.25 \\
        --budgets 0.8 0.7 --calib-size 64 --eval-size 500 --batch-size 50 --metric agreement

Each side's allocation is any ``--allocation`` value (``trajectory:evaluate`` is the default recipe's search).
Each variant is recovered as a run does (``--recover-size auto``: extra training examples where a layer has too
few rows); ``--recover-size calibration`` fits on the calibration sample alone, as this script did before
2026-11-30's last runs. ``--metric`` takes several metrics (e.g. ``agreement miou`` on a segmenter: fidelity to the unpruned
model and mIoU against the labels), each measured on the same pruned models.
Scores come from ``--scores-dir`` (default ``benchmarks/runs/compare-{model}/scores``), files
``{scorer}-seed{seed}.safetensors``; results go to ``benchmarks/results/allocation_hybrid-{name}.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from recover_size import recovery_data

from optin import stats
from optin.allocation import parse_allocation
from optin.compare import EVAL_SEED
from optin.measure import per_example
from optin.models import load_model
from optin.rankings import Scores
from optin.recipe import RunConfig, allocate, batches_of, more_calibration, resolve_task
from optin.recovery import recover, steps_for
from optin.tasks import sample
from optin.units import UnitTensors, kept_counts


def top_k(order: UnitTensors, counts: dict[str, list[int]]) -> UnitTensors:
    """Keep-masks that keep, in each layer, the ``counts`` units ranked highest by ``order``."""
    out: UnitTensors = {}
    for kind, layers in order.items():
        out[kind] = []
        for t, k in zip(layers, counts[kind]):
            m = torch.zeros(t.numel())
            m[torch.argsort(t.double().flatten(), descending=True, stable=True)[:k]] = 1.0
            out[kind].append(m)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="m2f-mosaic")
    ap.add_argument("--a", default="trajectory:0", help="scorer:allocation (a blend, evaluate, measured, ...)")
    ap.add_argument("--b", default="magnitude:0.25", help="scorer:allocation")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--metric", nargs="+", default=None, help="one or more metrics (default: the task's)")
    ap.add_argument("--scores-dir", default=None, help="default: benchmarks/runs/compare-{model}/scores")
    ap.add_argument("--recover-size", default="auto", help="auto (as a run does) or calibration")
    ap.add_argument("--name", default=None, help="results file suffix (default: the model)")
    args = ap.parse_args()
    (sa, ba), (sb, bb) = [(s.split(":")[0], parse_allocation(s.split(":")[1])) for s in (args.a, args.b)]
    base = load_model(args.model)
    task = resolve_task(None, None, args.model)
    task.prepare(base, args.model)
    metrics = args.metric or [task.metric]
    scores_dir = Path(args.scores_dir or f"benchmarks/runs/compare-{args.model}/scores")
    steps, _ = steps_for("auto", base)
    evals = batches_of(base, sample(task.examples("test"), args.eval_size, EVAL_SEED), args.batch_size)
    seq_len = base.seq_len(evals)
    results: dict[str, list] = {}
    counts_of: dict[str, list] = {}
    for seed in args.seeds:
        calib = batches_of(base, sample(task.examples("train"), args.calib_size, seed), args.calib_size)
        a, b = (Scores.load(scores_dir / f"{s}-seed{seed}.safetensors") for s in (sa, sb))
        more = more_calibration(base, task, RunConfig(seed=seed, calib_size=args.calib_size))
        extra: list = []
        for budget in args.budgets:
            ma, _, _ = allocate(base, a, budget, seq_len, "ptf", None, False, ba, calib, steps)
            mb, _, _ = allocate(base, b, budget, seq_len, "ptf", None, False, bb, calib, steps)
            ca, cb = kept_counts(ma), kept_counts(mb)
            counts_of[f"{budget}|{seed}"] = {sa: ca, sb: cb}
            variants = {sa: ma, sb: mb, f"{sa} order, {sb} counts": top_k(a.values, cb),
                        f"{sb} order, {sa} counts": top_k(b.values, ca)}
            for name, masks in variants.items():
                data, _, _ = recovery_data(base, more, masks, calib, args.recover_size, extra)
                ad = copy.deepcopy(base)
                kept, _ = recover(ad, base, masks, data, steps)
                ad.prune(kept)
                ad.recalibrate(data)
                for metric in metrics:
                    results.setdefault(f"{name}|{budget}|{metric}", []).append(
                        per_example(ad, evals, metric, base).numpy().tolist())
            print(f"seed {seed} budget {budget}: kept per layer {sa} {ca}, {sb} {cb}", flush=True)
    counts = stats.resample_counts(args.eval_size)
    unpruned = {m: stats.summarize(per_example(base, evals, m, base).numpy()[None], counts) for m in metrics}
    print("unpruned: " + ", ".join(f"{m} {u['mean']:.4f}" for m, u in unpruned.items()))
    rows = {}
    for key, v in results.items():
        name, budget, metric = key.split("|")
        ref = np.asarray(results[f"{sa}|{budget}|{metric}"])
        row = {**stats.summarize(np.asarray(v), counts), f"vs_{sa}": stats.paired_difference(np.asarray(v), ref, counts)}
        rows[key if len(metrics) > 1 else f"{name}|{budget}"] = row
        d = row[f"vs_{sa}"]
        print(f"{budget} {metric} {name}: {row['mean']:.4f}  vs {sa} {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")
    out = Path(f"benchmarks/results/allocation_hybrid-{args.name or args.model}.json")
    out.write_text(json.dumps({"command": "python benchmarks/allocation_hybrid.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None), "metric": metrics if len(metrics) > 1 else metrics[0], "unpruned": unpruned,
        "rows": rows, "kept": counts_of,
        "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
