"""Recovery time vs fisher scoring time on the same calibration data (issue "Accuracy at budget": recovery
should cost at most what scoring with fisher costs). minilm-trec, 128 calibration questions, the default
trajectory masks at budget 0.6; each timed twice, in one process, alternating.

    python benchmarks/recovery_time.py
"""
import copy, time, torch
import optin
from optin.models import load_model
from optin.recipe import batches_of, resolve_task
from optin.tasks import sample
from optin.rankings import Scores
from optin.recovery import recover
ad = load_model("minilm-trec")
task = resolve_task(None, None, "minilm-trec")
calib = batches_of(ad, sample(task.examples("train"), 128, 0), 128)
scores = optin.score(copy.deepcopy(ad), calib, "trajectory")
masks, _ = optin.search(ad, scores, 0.6, 14.0)
rows = []
for rep in range(2):
    t = time.time(); optin.score(copy.deepcopy(ad), calib, "fisher"); tf = time.time() - t
    a = copy.deepcopy(ad); t = time.time(); recover(a, ad, masks, calib, ("reconstruct",)); tr = time.time() - t
    rows.append({"fisher_seconds": tf, "reconstruct_seconds": tr})
    print(f"fisher {tf:.2f}s reconstruct {tr:.2f}s", flush=True)
import json
from pathlib import Path
Path("benchmarks/results/recovery_time.json").write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(),
                                                                      "command": "python benchmarks/recovery_time.py"}, indent=2))
