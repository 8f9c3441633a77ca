"""Accuracy / MACs / measured CPU speedup of a pruned BERT-family model at several budgets, per scorer.

Each scorer scores the model once (scores are cached in the results folder, so an interrupted benchmark
resumes without rescoring); every budget then reuses the same scores, as `optin prune --scores` does.

    python benchmarks/bert_budgets.py --model minilm-trec --task trec
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import time
from pathlib import Path

import torch

from optin.errors import ScoresMismatchError
from optin.measure import accuracy, params, throughput
from optin.models import load_model
from optin.progress import set_quiet
from optin.rankings import Scores, fingerprint
from optin.recipe import batches_of, score, search
from optin.tasks import get_task, sample


def cached_scores(ad, calib, scorer: str, options: dict, path: Path, seed: int) -> tuple[Scores, float]:
    if path.is_file():
        try:
            s = Scores.load(path)
            s.check_matches(ad.name, fingerprint(ad.model), ad.unit_counts())
            if s.options == score_options_of(scorer, options):
                return s, json.loads(path.with_suffix(".json").read_text())["seconds"]
        except (ScoresMismatchError, OSError, KeyError, ValueError):
            pass
    t0 = time.perf_counter()
    s = score(ad, calib, scorer, options, seed, checkpoint=path.with_suffix(".partial.safetensors"))
    seconds = time.perf_counter() - t0
    s.save(path)
    path.with_suffix(".json").write_text(json.dumps({"seconds": seconds}))
    return s, seconds


def score_options_of(scorer: str, options: dict) -> dict:
    from optin.registry import create
    return create("scorer", scorer, options).describe()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec")
    ap.add_argument("--task", default="trec")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    ap.add_argument("--scorers", nargs="+", default=["trajectory", "magnitude", "fisher", "random"])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--trajectory-group", type=int, default=8, help="neuron_group for the trajectory scorer")
    ap.add_argument("--random-seeds", type=int, default=3, help="seeds averaged for the random scorer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    set_quiet(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ad = load_model(args.model)
    task = get_task(args.task)
    calib = batches_of(ad, sample(task.examples("train"), args.calib_size, args.seed), args.calib_size)
    evals = batches_of(ad, task.examples("test"), 64)
    seq_len = ad.seq_len(evals)
    base_acc = accuracy(ad, evals)
    bench = evals[0]
    rows = []
    for scorer in args.scorers:
        seeds = range(args.random_seeds) if scorer == "random" else [args.seed]
        for seed in seeds:
            options = {"neuron_group": args.trajectory_group} if scorer == "trajectory" else {}
            tag = f"{args.model}-{scorer}-c{args.calib_size}-s{seed}"
            scores, seconds = cached_scores(ad, calib, scorer, options, out / f"scores-{tag}.safetensors", seed)
            for budget in args.budgets:
                pruned = copy.deepcopy(ad)
                masks, costs = search(pruned, scores, budget, seq_len, allow_degenerate=True)
                pruned.prune(masks)
                acc = accuracy(pruned, evals)
                speed = throughput({"before": lambda: ad.logits(bench), "after": lambda: pruned.logits(bench)},
                                   examples=ad.batch_size(bench), repeats=10, min_seconds=1.0)
                row = {"scorer": scorer, "seed": seed, "budget": budget, "accuracy": acc,
                       "accuracy_before": base_acc, "macs_ratio": costs.macs_of_masks(masks) / costs.macs(),
                       "macs_after": costs.macs_of_masks(masks), "macs_before": costs.macs(),
                       "params_after": params(pruned.model), "params_before": params(ad.model),
                       "speedup": speed["after"] / speed["before"], "seconds_scoring": seconds,
                       "heads_kept": sum(int(m.sum()) for m in masks["heads"]),
                       "neurons_kept": sum(int(m.sum()) for m in masks["neurons"])}
                rows.append(row)
                print(json.dumps(row))
    result = {"model": args.model, "task": args.task, "date": dt.date.today().isoformat(),
              "calibration_examples": args.calib_size, "eval_examples": sum(ad.batch_size(b) for b in evals),
              "seq_len": seq_len, "trajectory_neuron_group": args.trajectory_group,
              "threads": torch.get_num_threads(), "rows": rows,
              "command": "python benchmarks/bert_budgets.py " + " ".join(
                  [f"--model {args.model}", f"--task {args.task}", f"--calib-size {args.calib_size}",
                   f"--trajectory-group {args.trajectory_group}"])}
    (out / f"bert_budgets-{args.model}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"bert_budgets-{args.model}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by: dict[str, dict[float, list[dict]]] = {}
    for r in result["rows"]:
        by.setdefault(r["scorer"], {}).setdefault(r["budget"], []).append(r)
    for scorer, budgets in by.items():
        xs = sorted(budgets)
        ys = [sum(r["accuracy"] for r in budgets[b]) / len(budgets[b]) for b in xs]
        ax.plot([sum(r["macs_ratio"] for r in budgets[b]) / len(budgets[b]) for b in xs], ys, marker="o",
                label=scorer)
    ax.axhline(result["rows"][0]["accuracy_before"], color="grey", ls="--", label="unpruned")
    ax.set_xlabel("MACs kept (fraction of unpruned encoder)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{result['model']} on {result['task']} ({result['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
