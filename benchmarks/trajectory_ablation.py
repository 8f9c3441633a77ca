"""Ablation of the trajectory scorer at a budget (issue "Accuracy at budget"): what each choice is worth.

Every variant is scored on the same calibration samples (one per seed), searched with ``ptf`` at each budget,
optionally recovered (``--recover``), pruned, and evaluated on the same held-out examples, so that paired
differences against the default cancel the test-sample noise. Variants that only recombine the default's
MD/KD components or change the declared score scale reuse its scores (no rescoring):

- ``default``            estimator auto (heads exact, neurons/channels Gauss-Newton where exact does not fit)
- ``exact``              every unit exactly (``estimator=exact``; slow on large models: --skip it)
- ``exact-groups-32``    exact scores of groups of 32 neurons, spread as score/32 (the previous default)
- ``gauss-newton``       Gauss-Newton for heads too
- ``last-block-kd``      the last block's units by KD only
- ``rows-256``           256 sampled token rows instead of 768
- ``md-only`` / ``kd-only`` / ``lambda-x10``   the default's components recombined
- ``scale-kind`` / ``scale-layer``             the default's scores declared comparable per kind / per layer
- ``rank-layer``         the default's scores replaced by their quantile within their layer (every layer's
                         scores alike, so the search allocates by cost as it does for random scores)
- ``fisher``             the PTF baseline

    python benchmarks/trajectory_ablation.py --model minilm-trec --seeds 0 1 2 --budgets 0.6 0.4
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import optin
from optin import stats
from optin.measure import metric_of_examples, per_example
from optin.models import load_model
from optin.rankings import Scores
from optin.recipe import batches_of, resolve_task
from optin.recovery import parse_steps, recover
from optin.tasks import sample

SCORED = {  # variant: trajectory options (None: the baseline scorer of that name)
    "default": {},
    "exact": {"estimator": "exact", "neuron_group": 1},
    "exact-groups-32": {"neuron_group": 32},
    "gauss-newton": {"estimator": "gauss-newton"},
    "last-block-kd": {"last_block": "kd"},
    "rows-256": {"rows": 256},
    "fisher": None,
}
DERIVED = ("md-only", "kd-only", "lambda-x10", "scale-kind", "scale-layer", "rank-layer")


def derived(base: Scores, name: str) -> Scores:
    """A variant computed from the default's components: recombined MD/KD, or another declared scale."""
    md, kd = base.extras["md"], base.extras["kd"]
    lam = float(base.options.get("lambda_used") or _lambda(base))
    if name == "md-only":
        values = md
    elif name == "kd-only":
        values = kd
    elif name == "lambda-x10":
        values = {k: [m + 10 * lam * q for m, q in zip(md[k], kd[k])] for k in md}
    elif name in ("scale-kind", "scale-layer"):
        return dataclasses.replace(base, scale=name.split("-")[1])
    elif name == "rank-layer":  # each layer's scores replaced by their quantile in the layer: every layer alike
        ranked = {k: [(torch.argsort(torch.argsort(t.double())).double() + 1) / max(1, t.numel()) for t in v]
                  for k, v in base.values.items()}
        return dataclasses.replace(base, values={k: [t.float() for t in v] for k, v in ranked.items()}, scale="layer")
    else:
        raise ValueError(name)
    return dataclasses.replace(base, values={k: [t.float() for t in v] for k, v in values.items() if k in base.values})


def _lambda(s: Scores) -> float:
    """The lambda the default used: (score - md) / kd, on the unit with the largest KD."""
    kind = next(iter(s.values))
    v, m, q = (torch.cat(x[kind]).double() for x in (s.values, s.extras["md"], s.extras["kd"]))
    i = int(torch.argmax(q))
    return float((v[i] - m[i]) / q[i]) if q[i] > 0 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec")
    ap.add_argument("--task", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6])
    ap.add_argument("--recover", nargs="+", default=["none"])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=["exact"], help="variants not to run")
    ap.add_argument("--work", default=None, help="folder for the scores (reused on a rerun)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work or f"benchmarks/runs/ablation-{args.model}")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or f"benchmarks/results/trajectory_ablation-{args.model}.json")
    base = load_model(args.model)
    task = resolve_task(args.task, None, args.model)
    evals = batches_of(base, sample(task.examples("test"), args.eval_size, 0), args.batch_size)
    seq_len = base.seq_len(evals)
    kinds = base.unit_counts()
    scored = {k: v for k, v in SCORED.items() if k not in args.skip}
    variants = list(scored) + [d for d in DERIVED if d not in args.skip and
                               (not d.startswith("scale") or len(kinds) > 1 or d == "scale-layer")]
    results: dict = {"unpruned": per_example(base, evals, task.metric, base).numpy().tolist(), "cells": {},
                     "seconds": {}}
    t_all = time.perf_counter()
    for seed in args.seeds:
        calib = batches_of(base, sample(task.examples("train"), args.calib_size, seed), args.calib_size)
        made: dict[str, Scores] = {}
        for name, options in scored.items():
            path = work / f"{name}-seed{seed}.safetensors"
            if path.is_file():
                made[name] = Scores.load(path)
                continue
            ad = copy.deepcopy(base)
            t0 = time.perf_counter()
            made[name] = optin.score(ad, calib, "fisher" if options is None else "trajectory", options, seed=seed)
            results["seconds"][f"{name}/{seed}"] = time.perf_counter() - t0
            made[name].save(path)
            print(f"seed {seed} {name}: scored in {results['seconds'][f'{name}/{seed}']:.0f}s", flush=True)
        for name in variants:
            scores = made[name] if name in made else derived(made["default"], name)
            for budget in args.budgets:
                for rec in args.recover:
                    ad = copy.deepcopy(base)
                    try:
                        masks, _ = optin.search(ad, scores, budget, seq_len)
                    except optin.OptinError as exc:  # a degenerate result is a result too: report it
                        results["cells"][f"{name}|{budget}|{rec}|{seed}"] = {"error": str(exc)}
                        continue
                    masks, _ = recover(ad, base, masks, calib, parse_steps(rec))
                    ad.prune(masks)
                    ad.recalibrate(calib)
                    ex = per_example(ad, evals, task.metric, base).numpy().tolist()
                    results["cells"][f"{name}|{budget}|{rec}|{seed}"] = {
                        "examples": ex, "metric": metric_of_examples(torch.tensor(ex)),
                        "kept": {k: [int(m.sum()) for m in v] for k, v in masks.items()}}
                    print(f"seed {seed} {name} budget {budget} {rec}: {results['cells'][f'{name}|{budget}|{rec}|{seed}']['metric']:.4f}",
                          flush=True)
        out.write_text(json.dumps(summarise(results, variants, args), indent=1))
    summary = summarise(results, variants, args)
    summary["seconds_total"] = time.perf_counter() - t_all
    out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


def summarise(results: dict, variants: list[str], args) -> dict:
    """Mean and 95% bootstrap CI per variant x budget x recovery, and the paired difference vs the default."""
    n = len(results["unpruned"])
    counts = stats.resample_counts(n)
    rows = {}
    for budget in args.budgets:
        for rec in args.recover:
            ref = _per_seed(results, "default", budget, rec, args.seeds)
            for name in variants:
                got = _per_seed(results, name, budget, rec, args.seeds)
                if got is None:
                    continue
                row = stats.summarize(got, counts)
                if ref is not None and name != "default":
                    row["vs_default"] = stats.paired_difference(got, ref, counts)
                rows[f"{name}|{budget}|{rec}"] = row
    unpruned = np.asarray(results["unpruned"])[None]
    return {"model": args.model, "seeds": args.seeds, "budgets": args.budgets, "recover": args.recover,
            "calibration_examples": args.calib_size, "eval_examples": n,
            "unpruned": stats.summarize(unpruned, counts), "rows": rows, "seconds": results["seconds"],
            "errors": {k: v["error"] for k, v in results["cells"].items() if "error" in v},
            "command": f"python benchmarks/trajectory_ablation.py --model {args.model} --seeds "
                       f"{' '.join(map(str, args.seeds))} --budgets {' '.join(map(str, args.budgets))} --recover "
                       f"{' '.join(args.recover)} --calib-size {args.calib_size} --eval-size {args.eval_size}"}


def _per_seed(results: dict, name: str, budget: float, rec: str, seeds: list[int]) -> np.ndarray | None:
    cells = [results["cells"].get(f"{name}|{budget}|{rec}|{s}") for s in seeds]
    if any(c is None or "examples" not in c for c in cells):
        return None
    return np.asarray([c["examples"] for c in cells])


def table(summary: dict) -> str:
    lines = [f"unpruned {summary['unpruned']['mean']:.4f}", "| variant | budget | recover | metric [95% CI] (seeds min..max) "
             "| vs default [95% CI] |", "|---|---|---|---|---|"]
    for key, r in summary["rows"].items():
        name, budget, rec = key.split("|")
        diff = r.get("vs_default")
        d = f"{diff['mean']:+.4f} [{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]" if diff else ""
        lines.append(f"| {name} | {budget} | {rec} | {r['mean']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] "
                     f"({r['min']:.3f}..{r['max']:.3f}) | {d} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
