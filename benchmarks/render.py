"""Render benchmark result JSON files into the markdown tables of docs/benchmarks.md.

    python benchmarks/render.py benchmarks/results/bert_budgets-minilm-trec.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def budgets_table(result: dict) -> str:
    """Accuracy / MACs / speedup per scorer and budget (random averaged over its seeds)."""
    cells: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in result["rows"]:
        cells[(r["scorer"], r["budget"])].append(r)
    scorers = list(dict.fromkeys(r["scorer"] for r in result["rows"]))
    budgets = sorted({r["budget"] for r in result["rows"]}, reverse=True)
    base = result["rows"][0]["accuracy_before"]
    lines = [f"Unpruned accuracy: **{base:.4f}** ({result['eval_examples']} test examples).", "",
             "| scorer | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for s in scorers:
        row = []
        for b in budgets:
            rs = cells[(s, b)]
            acc = sum(r["accuracy"] for r in rs) / len(rs)
            spread = f" ±{(max(r['accuracy'] for r in rs) - min(r['accuracy'] for r in rs)) / 2:.3f}" if len(rs) > 1 else ""
            speed = sum(r["speedup"] for r in rs) / len(rs)
            row.append(f"{acc:.4f}{spread} ({speed:.2f}x)")
        lines.append(f"| {s}{' (' + str(len(cells[(s, budgets[0])])) + ' seeds)' if len(cells[(s, budgets[0])]) > 1 else ''} | "
                     + " | ".join(row) + " |")
    lines += ["", "| scorer | scoring time (s) | heads kept at " + " / ".join(str(b) for b in budgets) + " |",
              "|---|---|---|"]
    for s in scorers:
        rs = [cells[(s, b)][0] for b in budgets]
        lines.append(f"| {s} | {rs[0]['seconds_scoring']:.1f} | " + " / ".join(str(r["heads_kept"]) for r in rs) + " |")
    return "\n".join(lines)


def configs_table(result: dict) -> str:
    """ViT benchmark: accuracy (MACs kept, measured speedup) per configuration and budget."""
    budgets = sorted({r["budget"] for r in result["rows"]}, reverse=True)
    names = list(dict.fromkeys(r["config"] for r in result["rows"]))
    cell = {(r["config"], r["budget"]): r for r in result["rows"]}
    lines = [f"Unpruned accuracy: **{result['rows'][0]['accuracy_before']:.4f}** "
             f"({result['eval_examples']} test images).", "",
             "| configuration | " + " | ".join(f"budget {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for n in names:
        row = [f"{cell[(n, b)]['accuracy']:.4f} ({cell[(n, b)]['macs_ratio']:.2f}, {cell[(n, b)]['speedup']:.2f}x)"
               for b in budgets]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def model_budgets_table(result: dict) -> str:
    """CNN / segmentation benchmark: metric, fidelity and latency per scorer and budget."""
    budgets = sorted({r["budget"] for r in result["rows"]}, reverse=True)
    scorers = list(dict.fromkeys(r["scorer"] for r in result["rows"]))
    cell = {(r["scorer"], r["budget"]): r for r in result["rows"]}
    metric = result["metric"]
    recal = any(r.get("recalibrated") for r in result["rows"])
    confident = any(r.get("fidelity_confident") is not None for r in result["rows"])
    lines = [f"Unpruned {metric}: **{result['rows'][0]['metric_before']:.4f}** ({result['eval_examples']} test "
             f"examples, {result['macs_before'] / 1e6:.1f} M MACs). Cells: {metric}"
             + (" after BatchNorm recalibration [without]" if recal else "")
             + " / fidelity to the unpruned model" + (" (on examples it predicts with probability >= 0.5)" if confident else "")
             + " / latency ratio (pruned ÷ unpruned).", "",
             "| scorer | " + " | ".join(f"budget {b} (MACs {cell[(scorers[0], b)]['macs_ratio']:.2f})" for b in budgets)
             + " |", "|---|" + "---|" * len(budgets)]
    for s in scorers:
        row = []
        for b in budgets:
            r = cell[(s, b)]
            raw = f" [{r['metric_no_recalibration']:.3f}]" if r.get("recalibrated") else ""
            conf = f" ({r['fidelity_confident']:.3f})" if r.get("fidelity_confident") is not None else ""
            row.append(f"{r['metric']:.3f}{raw} / {r['fidelity']:.3f}{conf} / {r['latency_ratio']:.2f}")
        lines.append(f"| {s} ({cell[(s, budgets[0])]['seconds_scoring']:.0f} s) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        result = json.loads(open(path).read())
        if "rows" not in result:
            print(json.dumps(result, indent=2))
        elif "fidelity" in result["rows"][0]:
            print(model_budgets_table(result))
        elif "config" in result["rows"][0]:
            print(configs_table(result))
        else:
            print(budgets_table(result))


if __name__ == "__main__":
    main()
