"""What choosing the allocation costs on BERT-shaped models (issue "Accuracy at budget").

``--allocation evaluate`` (the default) searches, recovers and judges five blends and the measured allocation
(whose removal curves cost five masked forwards per layer and kind); ``evaluate-blends`` skips the measured
one; ``scores`` is one search. Timed on BERT-shaped classifiers built from configs (random weights: this
measures time, not accuracy; the sizes of ``scoring_time.py``), magnitude scores, one calibration batch of
``--calib-size`` texts of 20-60 tokens (mean 40), at ``--budget``; the settings alternate in one process,
``--repeats`` rounds, with one forward of the batch timed in each round as the unit of scale:

    python benchmarks/allocation_time.py --models minilm bert-base --repeats 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu_figures import bert_batch
from scoring_time import CONFIGS

import optin
from optin.recipe import allocate
from optin.recovery import steps_for

SETTINGS = ("scores", "evaluate-blends", "evaluate")


def rounds(model: str, calib_size: int, budget: float, repeats: int) -> dict:
    """Seconds per setting and per forward of the batch, ``repeats`` alternated rounds."""
    from optin_plugins.adapters.bert import BertAdapter
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    ad = BertAdapter(BertForSequenceClassification(BertConfig(num_labels=6, **CONFIGS[model])).eval())
    batch = bert_batch(n=calib_size)
    scores = optin.score(ad, [batch], "magnitude")
    steps, _ = steps_for("auto", ad)
    seq_len = ad.seq_len([batch])
    out: dict = {"model": model, "calibration_examples": calib_size, "tokens": int(batch["attention_mask"].sum()),
                 "budget": budget, "seconds": {s: [] for s in (*SETTINGS, "forward")}, "chosen": []}
    for r in range(repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            ad.logits(batch)
            out["seconds"]["forward"].append(time.perf_counter() - t0)
        for setting in SETTINGS:
            t0 = time.perf_counter()
            _, _, info = allocate(ad, scores, budget, seq_len, "ptf", None, False, setting, [batch], steps)
            out["seconds"][setting].append(time.perf_counter() - t0)
            if setting == "evaluate":
                out["chosen"].append(info["alpha"])
        print(f"{model} round {r}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in out["seconds"].items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=sorted(CONFIGS))
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results = [rounds(m, args.calib_size, args.budget, args.repeats) for m in args.models]
    out = Path("benchmarks/results/allocation_time.json")
    out.write_text(json.dumps({"command": "python benchmarks/allocation_time.py --models " + " ".join(args.models)
                               + f" --calib-size {args.calib_size} --budget {args.budget} --repeats {args.repeats}",
                               "threads": torch.get_num_threads(), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
