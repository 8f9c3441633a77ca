"""How many examples should least-squares recovery fit on? (issue "Accuracy at budget").

For each scorer x budget x calibration seed: the run's default search (``--allocation evaluate``) on the
128-example calibration sample, then reconstruction on the calibration sample only
(``--recover-size calibration``) and on what ``--recover-size auto`` draws (the calibration sample plus more
training examples where a reading layer would get fewer than ``ROWS_PER_COLUMN`` rows per fitted column), and
any fixed ``--sizes``; each pruned, recalibrated on the same examples as it was recovered on and evaluated on
the same held-out examples; paired differences against ``calibration``.

Scores come from ``--scores-dir`` (``{scorer}-seed{seed}.safetensors``, e.g. an ``optin compare`` folder's
``scores/``) and are computed and saved there when missing.

    python benchmarks/recover_size.py --model vgg-fmnist --scorers trajectory fisher magnitude random
    python benchmarks/recover_size.py --own-cnn benchmarks/runs/own-cnn --scorers trajectory magnitude

``--own-cnn DIR`` first trains a CNN the project does not ship (a VGG-11-BN at width 0.5: other depth and
width than ``vgg-fmnist``) on Fashion-MNIST for one epoch into ``DIR/model`` (once), and uses it.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from cell_grid import complete, load_cells, run_cells
from compare_tables import fmt

from optin import stats
from optin.compare import EVAL_SEED
from optin.measure import metric_of_examples, per_example
from optin.models import load_model
from optin.rankings import Scores
from optin.recipe import RunConfig, allocate, batches_of, more_calibration, resolve_task
from optin.recovery import recover, recovery_size, steps_for
from optin.tasks import sample

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def build_own_cnn(folder: Path) -> str:
    """A VGG-11-BN (width 0.5, CIFAR-style, 28px input zero-padded to 32) trained one epoch on Fashion-MNIST with
    the recipe ``vgg-fmnist`` uses, saved as an optin CNN folder (architecture ``vgg``): built once."""
    from optin_plugins.adapters.cnn_common import save_cnn_folder
    from optin_plugins.adapters.vgg import VggAdapter, _init, assemble_vgg, vgg_spec
    from optin_plugins.zoo.cnn import VGG_RECIPE, train_vgg
    from optin_plugins.zoo.vit_fmnist import MEAN, STD, evaluate_vit
    from torch import nn

    from optin.tasks import get_task

    model_dir = folder / "model"
    if (model_dir / "optin-train.json").is_file():
        return str(model_dir)
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.ZeroPad2d(2)]
    c = 1
    for v in VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out = int(v) // 2
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
    model = _init(assemble_vgg(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(1), nn.Linear(c, 10)))
    task = get_task("fashion-mnist")
    t0 = time.perf_counter()
    log = train_vgg(model, task, **VGG_RECIPE)
    save_cnn_folder(model, model_dir, {"architecture": "vgg", "spec": vgg_spec(model), "task": "fashion-mnist",
                                       "image_size": 28, "mean": [MEAN], "std": [STD]})
    assert VggAdapter.claims(str(model_dir))
    record = {**log, "seconds_total": time.perf_counter() - t0, "threads": torch.get_num_threads(),
              "test_accuracy": evaluate_vit(model, task, "test")}
    (model_dir / "optin-train.json").write_text(json.dumps(record, indent=1))
    return str(model_dir)


def recovery_data(base, more, masks, calib: list, setting, extra: list) -> tuple[list, int, str]:
    """What recovery fits on for ``setting`` (as a run does): the calibration sample, then the first of the extra
    examples ``more`` draws (kept in ``extra`` for the next setting). Returns the batches, their size and why."""
    want, why = recovery_size(base, masks, calib, setting)
    have = sum(base.batch_size(b) for b in calib) + sum(base.batch_size(b) for b in extra)
    if want > have:
        extra += more(want - have)
    data, n = [], 0
    for b in calib + extra:  # the first ``want`` examples: the calibration sample, then the extra ones
        if n >= want:
            break
        data.append(b)
        n += base.batch_size(b)
    return data, n, why


def cell(base, task, scores: Scores, budget: float, seed: int, calib, evals, sizes: list, steps) -> dict:
    """The default search, then recovery on each size setting, pruned, recalibrated and evaluated."""
    seq_len = base.seq_len(evals)
    masks, _, info = allocate(base, scores, budget, seq_len, "ptf", None, True, "evaluate", calib, steps)
    more = more_calibration(base, task, RunConfig(seed=seed, calib_size=sum(base.batch_size(b) for b in calib)))
    out = {"alpha": info["alpha"], "sizes": {}}
    extra: list = []
    for setting in sizes:
        data, n, why = recovery_data(base, more, masks, calib, setting, extra)
        ad = copy.deepcopy(base)
        t0 = time.perf_counter()
        kept, _ = recover(ad, base, masks, data, steps)
        seconds = time.perf_counter() - t0
        ad.prune(kept)
        ad.recalibrate(data)
        ex = per_example(ad, evals, task.metric, base)
        out["sizes"][str(setting)] = {"examples": n, "why": why, "seconds": seconds, "metric": metric_of_examples(ex),
                                     "results": ex.numpy().tolist()}
    return out


def summarise(results: dict, args) -> dict:
    counts = stats.resample_counts(len(results["unpruned"]))
    rows = {}
    for scorer, budget, cells in complete(results, args):
        per = {k: np.asarray([c["sizes"][k]["results"] for c in cells]) for k in cells[0]["sizes"]}
        row = {k: {**stats.summarize(v, counts), "examples": [c["sizes"][k]["examples"] for c in cells],
                   "seconds": [round(c["sizes"][k]["seconds"], 2) for c in cells]} for k, v in per.items()}
        for k, v in per.items():
            if k != "calibration":
                row[k]["vs_calibration"] = stats.paired_difference(v, per["calibration"], counts)
        rows[f"{scorer}|{budget}"] = row
    return {"model": args.model, "seeds": args.seeds, "budgets": args.budgets, "scorers": args.scorers,
            "sizes": args.sizes, "eval_examples": len(results["unpruned"]),
            "unpruned": stats.summarize(np.asarray(results["unpruned"])[None], counts), "rows": rows,
            "threads": torch.get_num_threads(), "command": args.command}


def table(summary: dict) -> str:
    sizes = [str(s) for s in summary["sizes"]]
    lines = [f"{summary['model']}: unpruned {summary['unpruned']['mean']:.3f}",
             "| scorer | budget | " + " | ".join(sizes) + " |", "|---|---|" + "---|" * len(sizes)]
    for key, row in summary["rows"].items():
        scorer, budget = key.split("|")
        cells = []
        for s in sizes:
            r = row[s]
            text = f"{r['mean']:.3f} ({'/'.join(map(str, r['examples']))} ex.)"
            d = r.get("vs_calibration")
            if d:
                text += f" {fmt(d, signed=True)}"
            cells.append(text)
        lines.append(f"| {scorer} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vgg-fmnist")
    ap.add_argument("--own-cnn", default=None, help="train a VGG-11-BN (width 0.5) on Fashion-MNIST into this folder and use it")
    ap.add_argument("--scores-dir", default=None)
    ap.add_argument("--scorers", nargs="+", default=["trajectory"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", nargs="+", default=["calibration", "auto"])
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.command = "python benchmarks/recover_size.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if v is not None and k not in ("out", "command") and not (k == "model" and args.own_cnn))
    name = args.model
    if args.own_cnn:
        args.model = build_own_cnn(Path(args.own_cnn))
        name = "own-cnn"
    args.sizes = [s if s in ("calibration", "auto") else int(s) for s in args.sizes]
    scores_dir = Path(args.scores_dir or (Path(args.own_cnn) / "scores" if args.own_cnn
                                          else Path(f"benchmarks/runs/compare-{name}/scores")))
    out = Path(args.out or f"benchmarks/results/recover_size-{name}.json")
    raw = Path("benchmarks/runs") / f"recover_size-{name}.cells.json"
    base = load_model(args.model)
    task = resolve_task("fashion-mnist" if args.own_cnn else None, None, args.model)
    task.prepare(base, args.model)
    steps, _ = steps_for("auto", base)
    evals = batches_of(base, sample(task.examples("test"), args.eval_size, EVAL_SEED), 64)
    results = load_cells(raw, lambda: per_example(base, evals, task.metric, base).numpy().tolist())
    run_cells(results, raw, base, task, args, scores_dir,
              lambda scores, budget, seed, calib: cell(base, task, scores, budget, seed, calib, evals, args.sizes, steps),
              lambda key, c: ", ".join(f"{k}: {v['metric']:.4f} ({v['examples']} ex., {v['seconds']:.1f}s)"
                                       for k, v in c["sizes"].items()))
    summary = summarise(results, args)
    summary["model"] = name
    out.write_text(json.dumps(summary, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
