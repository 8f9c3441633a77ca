"""Does the measured allocation help ``--allocation evaluate``? (issue "Accuracy at budget").

For each scorer x budget x calibration seed: ``--allocation evaluate`` as it is now (the blends of
``optin.allocation.BLENDS``, then the measured allocation, judged on held-out calibration examples) and as it
was (the blends only: the same trials' choice without the measured one), and the measured allocation on its
own (``--allocation measured``); each recovered as a run does (``--recover auto``, ``--recover-size auto``),
removed, recalibrated and evaluated on the same held-out examples. Paired differences against the blends-only
choice.

    python benchmarks/measured_allocation.py --model m2f-mosaic --scorers trajectory magnitude --budgets 0.8 0.7 \\
        --calib-size 64 --eval-size 500 --batch-size 50 --metric agreement

Scores come from ``--scores-dir`` (default: the ``optin compare`` folder ``benchmarks/runs/compare-{model}/scores``)
and are computed there when missing.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from cell_grid import against_first, complete, load_cells, run_cells
from compare_tables import fmt
from recover_size import recovery_data

from optin import stats
from optin.allocation import MEASURED, Trial, choose
from optin.compare import EVAL_SEED
from optin.measure import metric_of_examples, per_example
from optin.models import load_model
from optin.recipe import RunConfig, allocate, batches_of, more_calibration, resolve_task
from optin.recovery import recover, steps_for
from optin.tasks import sample
from optin.units import kept_counts, same_masks

VARIANTS = ("blends", "evaluate", MEASURED)


def cell(base, task, scores, budget: float, seed: int, calib, evals, metric: str, steps) -> dict:
    seq_len = base.seq_len(evals)
    t0 = time.perf_counter()
    new, _, info = allocate(base, scores, budget, seq_len, "ptf", None, False, "evaluate", calib, steps)
    seconds = time.perf_counter() - t0
    blends = [Trial(t["alpha"], {}, t["divergence"]) for t in info["trials"]
              if t["alpha"] != MEASURED and t.get("divergence") is not None]
    old_pick = choose(blends).alpha
    old, _, _ = allocate(base, scores, budget, seq_len, "ptf", None, False, old_pick, calib, steps)
    t1 = time.perf_counter()
    alone, _, _ = allocate(base, scores, budget, seq_len, "ptf", None, True, MEASURED, calib, steps)
    seconds_measured = time.perf_counter() - t1
    more = more_calibration(base, task, RunConfig(seed=seed, calib_size=sum(base.batch_size(b) for b in calib)))
    out = {"chosen": info["alpha"], "blends_chosen": old_pick, "trials": info["trials"], "seconds_choosing": seconds,
           "seconds_measured": seconds_measured, "variants": {}}
    extra: list = []
    done: list = []
    for name, masks in zip(VARIANTS, (old, new, alone)):
        same = next((v for m, v in done if same_masks(m, masks)), None)
        if same is None:
            data, _, _ = recovery_data(base, more, masks, calib, "auto", extra)
            ad = copy.deepcopy(base)
            kept, _ = recover(ad, base, masks, data, steps)
            ad.prune(kept)
            ad.recalibrate(data)
            ex = per_example(ad, evals, metric, base)
            same = {"results": ex.numpy().tolist(), "metric": metric_of_examples(ex),
                    "kept": kept_counts(masks)}
            done.append((masks, same))
        out["variants"][name] = same
    return out


def summarise(results: dict, args) -> dict:
    counts = stats.resample_counts(len(results["unpruned"]))
    rows, chosen = {}, {}
    for scorer, budget, cells in complete(results, args):
        per = {v: np.asarray([c["variants"][v]["results"] for c in cells]) for v in VARIANTS}
        row = {v: stats.summarize(per[v], counts) for v in VARIANTS}
        for v in VARIANTS[1:]:
            row[v]["vs_blends"] = stats.paired_difference(per[v], per["blends"], counts)
        row["chosen"] = [c["chosen"] for c in cells]
        row["blends_chosen"] = [c["blends_chosen"] for c in cells]
        row["seconds_choosing"] = [round(c["seconds_choosing"], 1) for c in cells]
        row["seconds_measured"] = [round(c["seconds_measured"], 1) for c in cells]
        rows[f"{scorer}|{budget}"] = row
        chosen[(scorer, budget)] = per["evaluate"]
    against_first(rows, chosen, args.scorers[0], counts)
    return {"model": args.name or args.model, "seeds": args.seeds, "budgets": args.budgets, "scorers": args.scorers,
            "eval_examples": len(results["unpruned"]), "metric": args.metric or "the task's",
            "unpruned": stats.summarize(np.asarray(results["unpruned"])[None], counts), "rows": rows,
            "threads": torch.get_num_threads(), "command": args.command}


def _diff(d: dict | None) -> str:
    return fmt(d, signed=True) if d else ""


def table(summary: dict) -> str:
    ref = summary["scorers"][0]
    lines = [f"{summary['model']}: unpruned {summary['unpruned']['mean']:.3f}",
             (f"| scorer | budget | evaluate, blends only (kept) | evaluate with measured (kept) | measured alone | "
              f"evaluate: scorer - {ref} |"), "|---|---|---|---|---|---|"]
    for key, r in summary["rows"].items():
        scorer, budget = key.split("|")
        kept = ", ".join(f"{a:g}" if not isinstance(a, str) else "m" for a in r["chosen"])
        lines.append(f"| {scorer} | {budget} | {r['blends']['mean']:.3f} ({', '.join(f'{a:g}' for a in r['blends_chosen'])}) "
                     f"| {r['evaluate']['mean']:.3f} ({kept}) {_diff(r['evaluate']['vs_blends'])} "
                     f"| {r[MEASURED]['mean']:.3f} {_diff(r[MEASURED]['vs_blends'])} | {_diff(r.get(f'evaluate_vs_{ref}'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec", help="a named model or a model folder")
    ap.add_argument("--task", default=None, help="the task, for a model folder (e.g. fashion-mnist)")
    ap.add_argument("--name", default=None, help="what the result files are called (default: --model)")
    ap.add_argument("--scores-dir", default=None)
    ap.add_argument("--scorers", nargs="+", default=["trajectory"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--metric", default=None, help="the task's metric (default), or agreement with the unpruned model")
    args = ap.parse_args()
    args.command = "python benchmarks/measured_allocation.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if v is not None)
    name = args.name or args.model
    scores_dir = Path(args.scores_dir or f"benchmarks/runs/compare-{name}/scores")
    out = Path(f"benchmarks/results/measured_allocation-{name}.json")
    raw = Path("benchmarks/runs") / f"measured_allocation-{name}.cells.json"
    base = load_model(args.model)
    task = resolve_task(args.task, None, args.model)
    task.prepare(base, args.model)
    steps, _ = steps_for("auto", base)
    metric = args.metric or task.metric
    evals = batches_of(base, sample(task.examples("test"), args.eval_size, EVAL_SEED), args.batch_size)
    results = load_cells(raw, lambda: per_example(base, evals, metric, base).numpy().tolist())
    run_cells(results, raw, base, task, args, scores_dir,
              lambda scores, budget, seed, calib: cell(base, task, scores, budget, seed, calib, evals, metric, steps),
              lambda key, c: f"kept {c['chosen']} (blends only: {c['blends_chosen']:g}); " + ", ".join(
                  f"{v}: {c['variants'][v]['metric']:.4f}" for v in VARIANTS))
    summary = summarise(results, args)
    out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
