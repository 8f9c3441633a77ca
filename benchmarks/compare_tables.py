"""Compact tables of an ``optin compare`` folder for docs/benchmarks.md: the metric per configuration and
budget (mean over seeds [95% CI]), and paired differences on the same test examples that ``compare.md`` does
not show: each recovery setting against the first one (same scorer), and every scorer against ``--against``
(same recovery setting).

    python benchmarks/compare_tables.py benchmarks/runs/compare-minilm-trec --against fisher

Given a ``trajectory_ablation`` JSON instead of a folder, it prints the ablation as one table: per variant
and (budget, recovery) the metric and the paired difference against the default.

    python benchmarks/compare_tables.py benchmarks/results/trajectory_ablation-minilm-trec.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from optin import stats
from optin.compare import Journal, cell_key, decode


def load(folder: Path) -> tuple[dict, np.ndarray, list]:
    """Per (scorer, recover, budget): (seeds, N) results; the unpruned results; the grid's cells."""
    journal = Journal(folder / "cells.jsonl")
    cells = journal.find("cell")
    grid: dict[tuple, list] = {}
    for c in cells:
        grid.setdefault((c["scorer"], c["recover"], float(c["budget"])), []).append(c)
    arrays = {k: np.stack([decode(c["results"]) for c in sorted(v, key=lambda c: c["seed"])]) for k, v in grid.items()}
    return arrays, decode(journal.find("unpruned")[0]["results"]), cells


def fmt(s: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f"{f.format(s['mean'])} [{f.format(s['ci'][0])}, {f.format(s['ci'][1])}]"
    return f"**{text}**" if signed and s.get("excludes_zero") else text


def ablation(path: Path) -> None:
    """One table of a trajectory_ablation result: metric (difference vs the default [95% CI])."""
    import json

    d = json.loads(path.read_text())
    cols = [(b, r) for b in d["budgets"] for r in d["recover"]]
    variants = list(dict.fromkeys(k.split("|")[0] for k in [*d["rows"], *d.get("errors", {})]))
    print(f"unpruned: {fmt(d['unpruned'])}\n")
    print("| variant | " + " | ".join(f"{b:g}, {r}" for b, r in cols) + " |\n|---|" + "---|" * len(cols))
    for v in variants:
        cells = []
        for b, r in cols:
            row = d["rows"].get(f"{v}|{b}|{r}")
            if row is None:
                bad = [k.split("|")[-1] for k in d.get("errors", {}) if k.startswith(f"{v}|{b}|{r}|")]
                cells.append(f"refused as degenerate (seed {', '.join(bad)})" if bad else "")
                continue
            diff = row.get("vs_default")
            cells.append(f"{row['mean']:.3f}" + (f" ({fmt(diff, True)})" if diff else ""))
        print(f"| {v} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--against", default="fisher", help="the scorer the others are compared with")
    args = ap.parse_args()
    if args.folder.suffix == ".json":
        return ablation(args.folder)
    arrays, base, _ = load(args.folder)
    counts = stats.resample_counts(len(base))
    scorers = list(dict.fromkeys(k[0] for k in arrays))
    recovers = list(dict.fromkeys(k[1] for k in arrays))
    budgets = sorted({k[2] for k in arrays}, reverse=True)
    head = "| | " + " | ".join(f"{b:g}" for b in budgets) + " |\n|---|" + "---|" * len(budgets)
    print(f"unpruned: {fmt(stats.summarize(base[None], counts))} ({len(base)} examples)\n")
    print("metric, mean over seeds [95% CI]\n\n| scorer, recover" + head[1:])
    for s in scorers:
        for r in recovers:
            print(f"| {s}, {r} | " + " | ".join(fmt(stats.summarize(arrays[(s, r, b)], counts)) if (s, r, b) in arrays
                                            else "" for b in budgets) + " |")
    for r in recovers[1:]:
        print(f"\npaired difference, recover {r} minus {recovers[0]} (bold: CI excludes 0)\n\n| scorer" + head[1:])
        for s in scorers:
            print(f"| {s} | " + " | ".join(
                fmt(stats.paired_difference(arrays[(s, r, b)], arrays[(s, recovers[0], b)], counts), True)
                for b in budgets) + " |")
    if args.against in scorers:
        print(f"\npaired difference, scorer minus {args.against}, same recovery (bold: CI excludes 0)\n\n"
              f"| scorer, recover" + head[1:])
        for s in scorers:
            if s == args.against:
                continue
            for r in recovers:
                print(f"| {s}, {r} | " + " | ".join(
                    fmt(stats.paired_difference(arrays[(s, r, b)], arrays[(args.against, r, b)], counts), True)
                    for b in budgets) + " |")


if __name__ == "__main__":
    main()
