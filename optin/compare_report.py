"""The outputs of ``optin compare`` (``optin.compare``) from its result: the markdown table, the plot of the
metric against the MACs kept, the JSON; each written to a temporary file and moved into place."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .progress import say


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its previous content or ``text``, never a part of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt_ci(summary: dict, signed: bool = False) -> str:
    """``0.917 [0.901, 0.931]`` (with a sign for differences)."""
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(summary['mean'])} [{f.format(summary['ci'][0])}, {f.format(summary['ci'][1])}]"


def table(result: dict) -> tuple[list[str], list[tuple[str, list[list[str]]]]]:
    """The comparison table: the header (configuration, then one column per budget) and per configuration
    its name and, per budget, the lines of its cell: the metric with its CI, the min..max over seeds (with
    more than one seed), and the paired difference with its CI (``*``: the CI excludes 0)."""
    budgets = result["grid"]["budgets"]
    header = ["configuration"] + [f"budget {b:g}" for b in budgets]
    by_label: dict[str, dict[float, dict]] = {}
    for row in result["aggregates"]:
        by_label.setdefault(row["label"], {})[row["budget"]] = row
    body = []
    for name, cells in by_label.items():
        line = []
        for b in budgets:
            row = cells[b]
            m, d = row["metric"], row["difference"]
            text = [fmt_ci(m)]
            if len(m["per_seed"]) > 1:
                text.append(f"seeds {m['min']:.3f}..{m['max']:.3f}")
            if row["scorer"] == d["reference"]:
                text.append("(reference)")
            else:
                text.append(f"Δ {fmt_ci(d, signed=True)}" + (" *" if d["excludes_zero"] else ""))
            line.append(text)
        body.append((name, line))
    return header, body


def markdown(result: dict) -> str:
    s = result["settings"]
    header, body = table(result)
    level = int(round(100 * result["grid"]["level"]))
    lines = [f"# optin compare: {s['model']} on {s['task']}", "",
             f"{result['metric']} on the same {result['unpruned']['examples']}-example held-out sample for every cell; "
             "mean over "
             f"calibration seeds {', '.join(map(str, result['grid']['seeds']))} with a {level}% bootstrap CI over "
             f"the examples ({result['grid']['resamples']} resamples); Δ: paired difference against "
             f"{result['grid']['reference']} at the same budget (* its CI excludes 0). Allocation of units to "
             f"layers: {s.get('allocation', 'scores')}.", "",
             f"unpruned: {fmt_ci(result['unpruned']['summary'])}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, cells in body:
        lines.append("| " + " | ".join([name] + ["<br>".join(text) for text in cells]) + " |")
    lines += ["", "MACs kept (fraction of the unpruned model) and measured speedup (median [IQR] of per-round "
              "time ratios, first seed):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_label: dict[str, dict[float, dict]] = {}
    for row in result["aggregates"]:
        by_label.setdefault(row["label"], {})[row["budget"]] = row
    for name, cells in by_label.items():
        parts = []
        for b in result["grid"]["budgets"]:
            row, sp = cells[b], cells[b]["speedup"]
            speed = f", {sp['median']:.2f}x [{sp['q1']:.2f}, {sp['q3']:.2f}]" if sp else ""
            parts.append(f"{row['macs_ratio']:.3f}{speed}")
        lines.append("| " + " | ".join([name] + parts) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Metric vs MACs kept, one line per configuration with CI error bars and the unpruned metric as a
    horizontal line, written to ``path`` (PNG). False (and a note) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        say("no compare.png: matplotlib is not installed (pip install 'optin\\[plots]')")  # \\[ escapes rich markup
        return False
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lines: dict[str, list[dict]] = {}
    for row in result["aggregates"]:
        lines.setdefault(row["label"], []).append(row)
    for name, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["macs_ratio"])
        x = [r["macs_ratio"] for r in rows]
        y = [r["metric"]["mean"] for r in rows]
        err = [[max(0.0, r["metric"]["mean"] - r["metric"]["ci"][0]) for r in rows],
               [max(0.0, r["metric"]["ci"][1] - r["metric"]["mean"]) for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(result["unpruned"]["metric"], color="gray", linestyle="--", label="unpruned")
    ax.set_xlabel("MACs kept (fraction of the unpruned model)")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"{result['settings']['model']} on {result['settings']['task']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return True


def write_outputs(result: dict, folder: Path) -> None:
    """``compare.json``, ``compare.md`` and ``compare.png``, each written to a temporary file and moved into
    place."""
    write_text_atomic(folder / "compare.json", json.dumps(result, indent=1))
    write_text_atomic(folder / "compare.md", markdown(result))
    plot(result, folder / "compare.png")
