"""Does choosing the allocation on held-out calibration examples help (issue "Accuracy at budget")?

For each scorer x budget x calibration seed: ``--allocation evaluate`` tries the blends of
``optin.allocation.BLENDS`` on half of the calibration sample and keeps one; here every blend is also
recovered (on the whole calibration sample, as a run does), pruned, recalibrated and evaluated on the same
1,000 held-out examples, so the table shows what each fixed blend gives, what the evaluated choice gives,
and the paired difference of the choice against the scores' own allocation (blend 0, the default).

Scores come from an ``optin compare`` folder (same calibration samples as its cells), so nothing is rescored;
scores missing there are computed with the scorer's default options and saved in its ``scores/``:

    python benchmarks/allocation.py --model vgg-fmnist --compare benchmarks/runs/compare-vgg-fmnist \
        --scorers trajectory fisher --budgets 0.6 0.4 --seeds 0 1 2

``--metric agreement`` measures fidelity to the unpruned model instead of the task's metric (for a weak
model, e.g. m2f-mosaic, whose labelled mIoU hardly moves).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from cell_grid import against_first, complete, load_cells, run_cells

from optin import stats
from optin.allocation import BLENDS, Trial, choose
from optin.compare import EVAL_SEED
from optin.measure import metric_of_examples, per_example
from optin.models import load_model
from optin.rankings import Scores
from optin.recipe import allocate, batches_of, resolve_task
from optin.recovery import recover, steps_for
from optin.tasks import sample


def cell(base, scores: Scores, budget: float, calib, evals, metric: str, steps) -> dict:
    """Every blend's held-out results and the evaluated choice, for one scorer x budget x seed."""
    seq_len = base.seq_len(evals)
    t0 = time.perf_counter()
    _, _, info = allocate(base, scores, budget, seq_len, "ptf", None, False, "evaluate", calib, steps)
    seconds_choosing = time.perf_counter() - t0
    out = {"chosen": info["alpha"], "seconds_choosing": seconds_choosing, "blends": {}}  # chosen: by the rule then
    for trial in info["trials"]:
        if trial.get("error"):
            out["blends"][str(trial["alpha"])] = {"error": trial["error"]}
            continue
        ad = copy.deepcopy(base)
        masks, _, _ = allocate(ad, scores, budget, seq_len, "ptf", None, False, trial["alpha"], calib, steps)
        masks, _ = recover(ad, base, masks, calib, steps)
        ad.prune(masks)
        ad.recalibrate(calib)
        ex = per_example(ad, evals, metric, base)
        out["blends"][str(trial["alpha"])] = {"examples": ex.numpy().tolist(), "metric": metric_of_examples(ex),
                                             "divergence": trial["divergence"], "kept": trial["kept"]}
    return out


def chosen_blend(c: dict) -> float:
    """The blend ``evaluate`` keeps for a stored cell, by the current rule (``optin.allocation.choose``) from the
    stored held-out divergences: a changed rule re-summarises without rerunning."""
    trials = sorted((Trial(float(a), {}, b["divergence"]) for a, b in c["blends"].items()
                     if b.get("divergence") is not None), key=lambda t: t.alpha)  # choose's order of preference
    return choose(trials).alpha


def summarise(results: dict, args) -> dict:
    """Per scorer x budget: each blend's and the choice's mean with CI, the choice vs blend 0 (paired)."""
    n = len(results["unpruned"])
    counts = stats.resample_counts(n)
    rows, chosen_of = {}, {}
    for scorer, budget, cells in complete(results, args):
        per = {}
        for alpha in BLENDS:
            got = [c["blends"].get(str(alpha), {}) for c in cells]
            if all("examples" in g for g in got):
                per[str(alpha)] = np.asarray([g["examples"] for g in got])
        picks = [chosen_blend(c) for c in cells]
        chosen = np.asarray([c["blends"][str(p)]["examples"] for c, p in zip(cells, picks)])
        row = {k: stats.summarize(v, counts) for k, v in per.items()}
        row["evaluate"] = stats.summarize(chosen, counts)
        row["chosen"] = picks
        if "0.0" in per:
            row["evaluate_vs_scores"] = stats.paired_difference(chosen, per["0.0"], counts)
        row["seconds_choosing"] = float(np.mean([c["seconds_choosing"] for c in cells]))
        rows[f"{scorer}|{budget}"] = row
        chosen_of[(scorer, budget)] = chosen
    against_first(rows, chosen_of, args.scorers[0], counts)
    return {"model": args.model, "metric": args.metric or "the task's", "seeds": args.seeds, "budgets": args.budgets,
            "scorers": args.scorers,
            "recover": args.recover, "blends": list(BLENDS), "eval_examples": n,
            "unpruned": stats.summarize(np.asarray(results["unpruned"])[None], counts), "rows": rows,
            "command": f"python benchmarks/allocation.py --model {args.model} --compare {args.compare} --scorers "
                       f"{' '.join(args.scorers)} --budgets {' '.join(map(str, args.budgets))} --seeds "
                       f"{' '.join(map(str, args.seeds))} --recover {args.recover} --calib-size {args.calib_size} "
                       f"--eval-size {args.eval_size} --batch-size {args.batch_size}"
                       + (f" --metric {args.metric}" if args.metric else "")}


def table(summary: dict) -> str:
    blends = [str(float(b)) for b in summary["blends"]]
    lines = [f"{summary['model']}: unpruned {summary['unpruned']['mean']:.3f}",
             "| scorer | budget | " + " | ".join(f"blend {b}" for b in blends) + " | evaluate (chosen) | evaluate - blend 0 "
             f"| evaluate: scorer - {summary['scorers'][0]} |", "|---|---|" + "---|" * (len(blends) + 3)]
    for key, r in summary["rows"].items():
        scorer, budget = key.split("|")
        d = r.get("evaluate_vs_scores")
        cells = [f"{r[b]['mean']:.3f}" if b in r else "-" for b in blends]
        lines.append(f"| {scorer} | {budget} | " + " | ".join(cells) +
                     f" | {r['evaluate']['mean']:.3f} [{r['evaluate']['ci'][0]:.3f}, {r['evaluate']['ci'][1]:.3f}] "
                     f"({', '.join(f'{a:g}' for a in r['chosen'])}) | "
                     + _diff(d) + " | " + _diff(r.get(f"evaluate_vs_{summary['scorers'][0]}")) + " |")
    return "\n".join(lines)


def _diff(d: dict | None) -> str:
    return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec")
    ap.add_argument("--compare", default=None, help="the optin compare folder whose scores/ to use")
    ap.add_argument("--scorers", nargs="+", default=["trajectory"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recover", default="auto")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--metric", default=None, help="the task's metric (default), or agreement with the unpruned model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.compare = args.compare or f"benchmarks/runs/compare-{args.model}"
    out = Path(args.out or f"benchmarks/results/allocation-{args.model}.json")
    raw = out.with_suffix(".cells.json")
    base = load_model(args.model)
    task = resolve_task(None, None, args.model)
    task.prepare(base, args.model)
    steps, _ = steps_for(args.recover, base)
    metric = args.metric or task.metric
    evals = batches_of(base, sample(task.examples("test"), args.eval_size, EVAL_SEED), args.batch_size)
    results = load_cells(raw, lambda: per_example(base, evals, metric, base).numpy().tolist())
    run_cells(results, raw, base, task, args, Path(args.compare) / "scores",
              lambda scores, budget, seed, calib: cell(base, scores, budget, calib, evals, metric, steps),
              lambda key, c: f"chose {c['chosen']:g}; " + ", ".join(
                  f"{a}: {b.get('metric', float('nan')):.4f}" for a, b in c["blends"].items()))
    summary = summarise(results, args)
    out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
