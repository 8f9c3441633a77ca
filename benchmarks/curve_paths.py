"""How long the measured allocation's removal curves take, restarted at each layer vs whole masked forwards.

``optin.measured.layer_curves`` restarts the forward at the layer (``trace``/``run_from``) where an adapter
can, and masks the whole model otherwise. Both on the same model, scores and calibration half, alternated
in one process (restarted, masked, restarted, masked):

    python benchmarks/curve_paths.py --model minilm-trec --scores benchmarks/runs/compare-minilm-trec/scores/trajectory-seed0.safetensors
"""
from __future__ import annotations

import argparse
import time

import torch

from optin import measured
from optin.allocation import split_for_trial
from optin.rankings import Scores
from optin.recipe import RunConfig, calibration_stage, load_stage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm-trec")
    ap.add_argument("--scores", required=True, help="a scores file of this model")
    args = ap.parse_args()
    cfg = RunConfig(model=args.model).checked()
    ad, task = load_stage(cfg)
    fit, _ = split_for_trial(calibration_stage(ad, task, cfg), ad.batch_size)  # what evaluate draws curves on
    values = {k: v for k, v in Scores.load(args.scores).values.items() if k in ad.unit_counts()}
    with torch.no_grad():
        reference = [ad.logits(b) for b in fit]
    restarted = measured._traces
    for path in ("restarted", "masked", "restarted", "masked"):
        measured._traces = restarted if path == "restarted" else (lambda a, batches: [None] * len(batches))
        t0 = time.perf_counter()
        measured.layer_curves(ad, values, fit, reference)
        print(f"{path}: {time.perf_counter() - t0:.2f} s", flush=True)
    measured._traces = restarted


if __name__ == "__main__":
    main()
