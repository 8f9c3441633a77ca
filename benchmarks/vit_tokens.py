"""ViT on Fashion-MNIST: heads+neurons, tokens only, and both (the paper's "expanded" setting).

(a) heads+neurons with the PTF search: trajectory vs magnitude vs fisher vs random;
(b) tokens only at the same MACs: OPTIN token schedule + ToMe, ToMe constant r, ToMe decreasing r,
    Zero-TPrune (WPR + prune, its layer/retention pattern scaled to the budget), random dropping;
(c) expanded: trajectory heads/neurons (half of the reduction) + OPTIN token schedule + ToMe.

    python benchmarks/vit_tokens.py --model vit-fmnist
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import time
from pathlib import Path

import torch

from optin.measure import accuracy, params, throughput
from optin.models import load_model
from optin.progress import set_quiet
from optin.recipe import _token_importance, batches_of, reduce_tokens, score, search
from optin.registry import create
from optin.tasks import get_task, sample

CONFIGS = {  # name: (family, scorer for units or None, reducer, searcher options, token scorer)
    "trajectory": ("units", "trajectory", None, {}, None),
    "magnitude": ("units", "magnitude", None, {}, None),
    "fisher": ("units", "fisher", None, {}, None),
    "random": ("units", "random", None, {}, None),
    "optin-schedule+tome": ("tokens", None, "tome", {"schedule": "trajectory", "units": False}, None),
    "tome-constant": ("tokens", None, "tome", {"schedule": "constant", "units": False}, None),
    "tome-decreasing": ("tokens", None, "tome", {"schedule": "decreasing", "units": False}, None),
    "zero-tprune (wpr+prune)": ("tokens", None, "prune",
                                {"schedule": "layers", "units": False, "pruning_layers": [0, 1, 2, 3, 4],
                                 "retention": [1.0, 0.9, 0.8, 0.7, 1.0]}, "wpr"),
    "random-drop": ("tokens", None, "random", {"schedule": "constant", "units": False}, None),
    "optin expanded (trajectory + schedule + tome)": ("expanded", "trajectory", "tome",
                                                      {"schedule": "trajectory", "units": True}, None),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit-fmnist")
    ap.add_argument("--task", default="fashion-mnist")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--neuron-group", type=int, default=16)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    set_quiet(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ad = load_model(args.model)
    task = get_task(args.task)
    calib = batches_of(ad, sample(task.examples("train"), args.calib_size, 0), args.calib_size)
    evals = batches_of(ad, sample(task.examples("test"), args.eval_size, 0), 250)
    base_acc = accuracy(ad, evals)
    base_macs = ad.cost_model().macs()
    bench = evals[0]
    cache: dict[str, object] = {}
    timings: dict[str, float] = {}

    def scores_for(name: str, tokens: bool):
        key = f"{name}-{tokens}"
        if key not in cache:
            opts = {"neuron_group": args.neuron_group, "tokens": tokens} if name == "trajectory" else {}
            t0 = time.perf_counter()
            cache[key] = score(ad, calib, name, opts, 0, out / f"scores-{args.model}-{key}.partial.safetensors")
            timings[key] = time.perf_counter() - t0
        return cache[key]

    rows = []
    for cname in args.configs:
        family, unit_scorer, reducer, sopts, tscorer = CONFIGS[cname]
        for budget in args.budgets:
            pruned = copy.deepcopy(ad)
            tokens_scores = None
            if unit_scorer:
                sc = scores_for(unit_scorer, tokens=unit_scorer == "trajectory")  # one scoring serves all
                tokens_scores = _token_importance(sc)
                searcher = "token-schedule" if family == "expanded" else "ptf"
                masks, costs = search(pruned, sc, budget, 0, searcher, sopts, allow_degenerate=True)
                pruned.prune(masks)
            elif sopts.get("schedule") == "trajectory":
                tokens_scores = _token_importance(scores_for("trajectory", tokens=True))
            removals = None
            if reducer:
                removals = reduce_tokens(pruned, reducer, budget, base_macs, options=sopts,
                                         token_importance=tokens_scores,
                                         token_scorer=create("scorer", tscorer) if tscorer else None)
            macs = pruned.cost_model(removals=removals).macs()
            acc = accuracy(pruned, evals)
            speed = throughput({"before": lambda: ad.logits(bench), "after": lambda: pruned.logits(bench)},
                               examples=ad.batch_size(bench), repeats=8, min_seconds=1.0)
            row = {"config": cname, "family": family, "budget": budget, "accuracy": acc, "accuracy_before": base_acc,
                   "macs_ratio": macs / base_macs, "speedup": speed["after"] / speed["before"],
                   "params_ratio": params(pruned.model) / params(ad.model), "removals": removals,
                   "heads_kept": sum(pruned.unit_counts()["heads"]), "neurons_kept": sum(pruned.unit_counts()["neurons"])}
            rows.append(row)
            print(json.dumps(row))
    result = {"model": args.model, "task": args.task, "date": dt.date.today().isoformat(),
              "calibration_examples": args.calib_size, "eval_examples": args.eval_size,
              "neuron_group": args.neuron_group, "macs_before": base_macs, "scoring_seconds": timings,
              "threads": torch.get_num_threads(), "rows": rows,
              "command": f"python benchmarks/vit_tokens.py --model {args.model} --calib-size {args.calib_size} "
                         f"--eval-size {args.eval_size} --neuron-group {args.neuron_group}"}
    (out / f"vit_tokens-{args.model}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"vit_tokens-{args.model}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, family, title in zip(axes, ("units", "tokens", "expanded"),
                                 ("(a) heads + neurons", "(b) tokens only", "(c) expanded")):
        names = dict.fromkeys(r["config"] for r in result["rows"] if r["family"] == family or
                              (family == "expanded" and r["config"] in ("trajectory", "optin-schedule+tome")))
        for name in names:
            rs = sorted((r for r in result["rows"] if r["config"] == name), key=lambda r: r["macs_ratio"])
            ax.plot([r["macs_ratio"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=name)
        ax.axhline(result["rows"][0]["accuracy_before"], color="grey", ls="--", label="unpruned")
        ax.set_title(title)
        ax.set_xlabel("MACs kept (fraction)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy")
    fig.suptitle(f"{result['model']} on {result['task']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
