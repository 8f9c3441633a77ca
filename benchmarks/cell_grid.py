"""The scorer x budget x seed grid the paired benchmarks share: resumable cells in a JSON file, scores from a
folder (``saved_scores``), and the groups of one scorer x budget whose every seed is done."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from saved_scores import scores_for

from optin import stats
from optin.recipe import batches_of
from optin.tasks import sample


def load_cells(raw: Path, unpruned: Callable[[], list]) -> dict:
    """The stored cells (``{"cells": {...}, "unpruned": [...]}``), the unpruned results computed when missing."""
    results = json.loads(raw.read_text()) if raw.is_file() else {"cells": {}}
    if "unpruned" not in results:
        results["unpruned"] = unpruned()
    return results


def run_cells(results: dict, raw: Path, base, task, args, scores_dir: Path,
              cell: Callable[..., dict], show: Callable[[str, dict], str]) -> None:
    """Every missing ``scorer|budget|seed`` cell: ``cell(scores, budget, seed, calib)`` on the seed's calibration
    sample (one batch), stored after each one so that an interrupted run resumes."""
    for seed in args.seeds:
        calib = batches_of(base, sample(task.examples("train"), args.calib_size, seed), args.calib_size)
        for scorer in args.scorers:
            scores = scores_for(base, calib, scorer, seed, scores_dir)
            for budget in args.budgets:
                key = f"{scorer}|{budget}|{seed}"
                if key in results["cells"]:
                    continue
                results["cells"][key] = cell(scores, budget, seed, calib)
                print(f"{key}: {show(key, results['cells'][key])}", flush=True)
                raw.parent.mkdir(parents=True, exist_ok=True)
                raw.write_text(json.dumps(results))


def complete(results: dict, args) -> Iterator[tuple[str, float, list[dict]]]:
    """``(scorer, budget, cells)`` for each scorer x budget whose cells exist for every seed."""
    for scorer in args.scorers:
        for budget in args.budgets:
            cells = [results["cells"].get(f"{scorer}|{budget}|{s}") for s in args.seeds]
            if all(c is not None for c in cells):
                yield scorer, budget, cells


def against_first(rows: dict, chosen: dict, reference: str, counts) -> None:
    """Add to each ``rows["scorer|budget"]`` the paired difference of its evaluated results (``chosen[(scorer,
    budget)]``, seeds x examples) against the ``reference`` scorer's at the same budget."""
    for (scorer, budget), v in chosen.items():
        if scorer != reference and (reference, budget) in chosen:
            rows[f"{scorer}|{budget}"][f"evaluate_vs_{reference}"] = stats.paired_difference(
                v, chosen[(reference, budget)], counts)
