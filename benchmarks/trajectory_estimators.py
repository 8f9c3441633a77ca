"""Approximate vs exact trajectory scores (issue "Fast trajectory"): rank agreement and time.

Scores every unit of a model exactly (one masked restart per unit) and with the Gauss-Newton estimator at
several probe counts, on the same calibration batch and token sample, and reports per kind and layer the
Spearman correlation of the combined score (and of its MD and KD parts) and the time ratio. Exact scores
are cached (``--exact-cache``) because they are the slow part.

    python benchmarks/trajectory_estimators.py --model minilm-trec --calib-size 32 --probes 8 16 32
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

import optin
from optin.models import load_model
from optin.rankings import Scores
from optin.recipe import batches_of, resolve_task
from optin.tasks import sample


def agreement(a: Scores, b: Scores) -> dict:
    """Spearman per (part, kind, layer) between two score sets, and the worst of each part."""
    rows = {}
    for part, ua, ub in (("score", a.values, b.values), ("md", a.extras["md"], b.extras["md"]),
                         ("kd", a.extras["kd"], b.extras["kd"])):
        for kind in ua:
            for layer, (x, y) in enumerate(zip(ua[kind], ub[kind])):
                if x.numel() > 2:
                    rows[f"{part}/{kind}.{layer}"] = float(spearmanr(x.numpy(), y.numpy()).correlation)
    worst = {part: min(v for k, v in rows.items() if k.startswith(part + "/")) for part in ("score", "md", "kd")}
    return {"per_layer": rows, "worst": worst}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec")
    ap.add_argument("--task", default=None)
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--exact-cache", default=None, help="scores file of the exact scores (made if missing)")
    ap.add_argument("--options", default="{}", help="JSON trajectory options for both estimators")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ad = load_model(args.model)
    task = resolve_task(args.task, None, args.model)
    batch = batches_of(ad, sample(task.examples("train"), args.calib_size, args.seed), args.calib_size)
    options = json.loads(args.options)
    cache = Path(args.exact_cache or f"benchmarks/runs/exact-{args.model}-c{args.calib_size}-s{args.seed}.safetensors")
    cache.parent.mkdir(parents=True, exist_ok=True)
    if cache.is_file():
        exact, t_exact = Scores.load(cache), json.loads(cache.with_suffix(".json").read_text())["seconds"]
    else:
        t0 = time.perf_counter()
        exact = optin.score(ad, batch, "trajectory", {**options, "estimator": "exact", "neuron_group": 1},
                            seed=args.seed)
        t_exact = time.perf_counter() - t0
        exact.save(cache)
        cache.with_suffix(".json").write_text(json.dumps({"seconds": t_exact}))
    result = {"model": args.model, "calibration_examples": args.calib_size, "threads": torch.get_num_threads(),
              "seconds_exact": t_exact, "units": sum(t.numel() for v in exact.values.values() for t in v),
              "approximate": {}}
    for probes in args.probes:
        t0 = time.perf_counter()
        approx = optin.score(ad, batch, "trajectory", {**options, "estimator": "gauss-newton", "probes": probes},
                             seed=args.seed)
        seconds = time.perf_counter() - t0
        result["approximate"][probes] = {"seconds": seconds, "speedup": t_exact / seconds, **agreement(exact, approx)}
        print(probes, f"{seconds:.1f}s", f"{t_exact / seconds:.1f}x", result["approximate"][probes]["worst"], flush=True)
    out = Path(args.out or f"benchmarks/results/trajectory_estimators-{args.model}.json")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({p: r["worst"] for p, r in result["approximate"].items()}, indent=2))


if __name__ == "__main__":
    main()
