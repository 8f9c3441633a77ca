"""Does walking downhill on the ridge grid (``optin.recovery.downhill``) pick the grid's minimum?

Records, for every reading layer refit by ``reconstruct`` on several models, scorers, budgets and seeds,
the held-out error of the fit at every ridge of ``RIDGES`` (fit on the even calibration rows, scored on the
odd ones, as ``_solve`` does), and compares the walk's choice with the grid's minimum.

    python benchmarks/ridge_curves.py --models minilm-trec vgg-fmnist vit-fmnist m2f-mosaic

Scores come from ``benchmarks/runs/compare-{model}/scores/``.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from optin import recovery
from optin.errors import BudgetError
from optin.models import load_model
from optin.rankings import Scores
from optin.recipe import batches_of, resolve_task, search
from optin.tasks import sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm-trec", "vgg-fmnist", "vit-fmnist", "m2f-mosaic"])
    ap.add_argument("--scorers", nargs="+", default=["trajectory", "magnitude"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    curves: list[dict] = []
    solve = recovery._solve

    def recording(r, halves, how):  # the held-out error at every grid ridge, then the library's own solve
        (a1, c1, _), (a2, c2, y2) = halves
        cols = r.columns()
        if cols.numel():
            w = recovery._weight_matrix(r.module).double().cpu()
            b0 = r.module.bias.detach().double().cpu() if r.module.bias is not None else torch.zeros(w.shape[0])
            wk = torch.cat([w[:, cols], b0.double()[:, None]], 1)
            scale = float(torch.diagonal(a1 + a2)[:-1].mean())
            errors = [recovery._residual(a2, c2, y2, recovery.ridge_fit(a1, c1, wk, lam * scale))
                      for lam in recovery.RIDGES]
            grid = min(range(len(errors)), key=errors.__getitem__)
            walked = recovery.downhill(errors.__getitem__, len(errors), recovery.RIDGE_START)
            curves.append({"model": model, "kind": r.kind, "layer": r.layer, "errors": errors, "grid": grid,
                           "downhill": walked})
        return solve(r, halves, how)

    recovery._solve = recording
    for model in args.models:
        base = load_model(model)
        task = resolve_task(None, None, model)
        task.prepare(base, model)
        n = 64 if model == "m2f-mosaic" else 128
        budgets = (0.8, 0.6) if model == "m2f-mosaic" else (0.8, 0.6, 0.4)
        for seed in args.seeds:
            calib = batches_of(base, sample(task.examples("train"), n, seed), n)
            for scorer in args.scorers:
                scores = Scores.load(f"benchmarks/runs/compare-{model}/scores/{scorer}-seed{seed}.safetensors")
                for budget in budgets:
                    try:
                        masks, _ = search(base, scores, budget, base.seq_len(calib), allow_degenerate=True)
                    except BudgetError as exc:  # a budget this model cannot reach (m2f-mosaic below 0.64)
                        print(f"{model} {scorer} {budget}: {exc}")
                        continue
                    recovery.recover(copy.deepcopy(base), base, masks, calib, ("reconstruct",))
    same = sum(c["grid"] == c["downhill"] for c in curves)
    summary = {"layers": len(curves), "same_choice": same, "ridges": list(recovery.RIDGES),
               "start": recovery.RIDGE_START, "command": "python benchmarks/ridge_curves.py --models "
               + " ".join(args.models), "curves": curves}
    Path("benchmarks/results/ridge_curves.json").write_text(json.dumps(summary, indent=1))
    print(f"{same} of {len(curves)} layers: the walk picks the grid's minimum")


if __name__ == "__main__":
    main()
