"""Recovery time vs fisher scoring time on the same calibration data (issue "Accuracy at budget": recovery
should cost at most what scoring with fisher costs). minilm-trec, 128 calibration questions, the default
trajectory masks at budget 0.6; each timed twice, in one process, alternating.

    python benchmarks/recovery_time.py
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

import optin
from optin.models import load_model
from optin.recipe import batches_of, resolve_task
from optin.recovery import recover
from optin.tasks import sample


def main() -> None:
    ad = load_model("minilm-trec")
    task = resolve_task(None, None, "minilm-trec")
    calib = batches_of(ad, sample(task.examples("train"), 128, 0), 128)
    scores = optin.score(copy.deepcopy(ad), calib, "trajectory")
    masks, _ = optin.search(ad, scores, 0.6, 14.0)
    rows = []
    for _ in range(2):
        t = time.perf_counter()
        optin.score(copy.deepcopy(ad), calib, "fisher")
        fisher = time.perf_counter() - t
        work = copy.deepcopy(ad)
        t = time.perf_counter()
        recover(work, ad, masks, calib, ("reconstruct",))
        reconstruct = time.perf_counter() - t
        rows.append({"fisher_seconds": fisher, "reconstruct_seconds": reconstruct})
        print(f"fisher {fisher:.2f}s reconstruct {reconstruct:.2f}s", flush=True)
    Path("benchmarks/results/recovery_time.json").write_text(json.dumps(
        {"rows": rows, "threads": torch.get_num_threads(), "command": "python benchmarks/recovery_time.py"}, indent=2))


if __name__ == "__main__":
    main()
