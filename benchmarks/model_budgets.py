"""Any adapter, any task: metric / fidelity / MACs / measured latency of a pruned model at several budgets,
per scorer. Used for the CNN (VGG, MobileNetV2) and segmentation (Mask2Former) tables of docs/benchmarks.md.

Each scorer scores the model once (cached in the results folder, so an interrupted benchmark resumes);
every budget reuses those scores. Columns: the task's metric (accuracy / mIoU against labels), the
fidelity to the unpruned model (top-1 agreement for classifiers, mIoU of the pruned model's prediction
against the unpruned one's for segmentation), both after BatchNorm recalibration on the calibration
images where the adapter offers it (CNNs; ``optin run``'s default) and without it, the MACs kept, and the
latency ratio (pruned / unpruned,
median of interleaved timings on one batch, in one process).

    python benchmarks/model_budgets.py --model vgg-fmnist --task fashion-mnist
    python benchmarks/model_budgets.py --model mobilenetv2-imagenet --task photos --scorers trajectory magnitude random
    python benchmarks/model_budgets.py --model m2f-mosaic --task fmnist-mosaic
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bert_budgets import cached_scores  # noqa: E402

from optin.measure import agreement, evaluate, params, throughput  # noqa: E402
from optin.models import load_model  # noqa: E402
from optin.progress import set_quiet  # noqa: E402
from optin.recipe import batches_of, search  # noqa: E402
from optin.tasks import get_task, sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="named model or folder")
    ap.add_argument("--task", required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    ap.add_argument("--scorers", nargs="+", default=["trajectory", "magnitude", "random"])
    ap.add_argument("--options", default="{}", help="scorer options as JSON, e.g. '{\"neuron_group\": 4}'")
    ap.add_argument("--search-options", default="{}",
                    help="searcher options as JSON (over the adapter's defaults), e.g. '{\"normalize\": \"none\"}'")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_quiet(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = json.loads(args.options)
    search_options = json.loads(args.search_options)
    ad = load_model(args.model)
    ad.model.eval()
    task = get_task(args.task)
    calib = batches_of(ad, sample(task.examples("train"), args.calib_size, args.seed), args.calib_size)
    evals = batches_of(ad, sample(task.examples("test"), args.eval_size, args.seed), args.batch_size)
    base_metric = evaluate(ad, evals, task.metric, ad)
    costs0 = ad.cost_model(ad.seq_len(evals))
    bench = evals[0]
    name = f"{args.model}-{args.task}{args.tag}"
    rows = []
    for scorer in args.scorers:
        opts = options if scorer == "trajectory" else {}
        scores, seconds = cached_scores(ad, calib, scorer, opts,
                                        out / f"scores-{name}-{scorer}-c{args.calib_size}-s{args.seed}.safetensors",
                                        args.seed)
        for budget in args.budgets:
            pruned = copy.deepcopy(ad)
            masks, costs = search(pruned, scores, budget, ad.seq_len(evals), options=search_options,
                                  allow_degenerate=True)
            pruned.prune(masks)
            raw = {"metric": evaluate(pruned, evals, task.metric, ad), "fidelity": evaluate(pruned, evals, "agreement", ad)}
            recalibrated = pruned.recalibrate(calib)  # what `optin run` does by default (--recalibrate)
            metric = evaluate(pruned, evals, task.metric, ad) if recalibrated else raw["metric"]
            fidelity = evaluate(pruned, evals, "agreement", ad) if recalibrated else raw["fidelity"]
            confident = agreement(pruned, ad, evals, min_confidence=0.5) if ad.output == "classes" else None
            speed = throughput({"before": lambda: ad.logits(bench), "after": lambda: pruned.logits(bench)},
                               examples=ad.batch_size(bench), repeats=10, min_seconds=2.0)
            row = {"scorer": scorer, "budget": budget, "metric": metric, "metric_before": base_metric,
                   "fidelity": fidelity, "fidelity_confident": confident, "recalibrated": recalibrated, "metric_no_recalibration": raw["metric"],
                   "fidelity_no_recalibration": raw["fidelity"], "macs_ratio": costs.macs_of_masks(masks) / costs0.macs(),
                   "latency_ratio": speed["before"] / speed["after"], "speedup": speed["after"] / speed["before"],
                   "params_ratio": params(pruned.model) / params(ad.model), "seconds_scoring": seconds,
                   "kept": {k: sum(v) for k, v in pruned.unit_counts().items()},
                   "total": {k: sum(v) for k, v in ad.unit_counts().items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model": args.model, "task": args.task, "metric": task.metric, "date": dt.date.today().isoformat(),
              "adapter": ad.name, "calibration_examples": args.calib_size,
              "eval_examples": sum(ad.batch_size(b) for b in evals), "batch_size": args.batch_size,
              "macs_before": costs0.macs(), "params_before": params(ad.model), "threads": torch.get_num_threads(),
              "options": options, "search_options": search_options, "rows": rows,
              "command": "python benchmarks/model_budgets.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    (out / f"model_budgets-{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"model_budgets-{name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for scorer in dict.fromkeys(r["scorer"] for r in result["rows"]):
        rs = sorted((r for r in result["rows"] if r["scorer"] == scorer), key=lambda r: r["macs_ratio"])
        x = [r["macs_ratio"] for r in rs]
        axes[0].plot(x, [r["metric"] for r in rs], marker="o", label=scorer)
        axes[1].plot(x, [r["fidelity"] for r in rs], marker="o", label=scorer)
        axes[2].plot(x, [r["latency_ratio"] for r in rs], marker="o", label=scorer)
    axes[0].axhline(result["rows"][0]["metric_before"], color="grey", ls="--", label="unpruned")
    axes[2].plot([0, 1], [0, 1], color="grey", ls=":", label="latency = MACs")
    for ax, label in zip(axes, (result["metric"], "fidelity to the unpruned model", "latency ratio (pruned / unpruned)")):
        ax.set_xlabel("MACs kept (fraction)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{result['model']} on {result['task']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
