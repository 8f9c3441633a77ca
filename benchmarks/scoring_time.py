"""Scoring time and peak memory vs model size (issue "Fast trajectory"): exact, approximate and fisher.

BERT-shaped classifiers built from configs (random weights: this measures time and memory, not accuracy):
MiniLM (6 x 384, FFN 1536, 12 heads), BERT-base (12 x 768, FFN 3072, 12 heads), BERT-large (24 x 1024, FFN
4096, 16 heads). One calibration batch of ``--calib-size`` examples of 20-60 tokens (mean 40). Each measurement
runs in its own process (peak memory = that process's maximum resident set, `getrusage`), on ``--threads``
threads:

- ``fisher``: measured in full;
- ``approximate``: the trajectory scorer's plan when exact scoring does not fit (heads exact, neurons by
  Gauss-Newton, 32 probes), measured in full;
- ``exact``: every unit by its own masked restart. Measured in full for the heads; for the neurons, the first
  ``--sample`` neurons of the first, middle and last layer are timed and the total is extrapolated with the
  per-layer restart cost (later layers restart shorter forwards).

    python benchmarks/scoring_time.py --models minilm bert-base bert-large --calib-size 32
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def measure(model: str, what: str, calib: int, sample: int, threads: int) -> dict:
    """One measurement (run in a fresh process by ``main``)."""
    import torch

    torch.set_num_threads(threads)
    import optin
    from optin.contracts import ScoreContext
    from optin_plugins.adapters.bert import BertAdapter
    from optin_plugins.scorers.trajectory import TrajectoryScorer
    from optin_plugins.scorers.trajectory_plan import restart_cost
    from transformers import BertConfig, BertForSequenceClassification

    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_figures import bert_batch

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=6, **CONFIGS[model])
    ad = BertAdapter(BertForSequenceClassification(cfg).eval())
    batch = bert_batch(n=calib)
    L, F = cfg.num_hidden_layers, cfg.intermediate_size
    t0 = time.perf_counter()
    out: dict = {"model": model, "what": what, "threads": threads, "calibration_examples": calib,
                 "tokens": int(batch["attention_mask"].sum()),
                 "units": L * (cfg.num_attention_heads + F)}
    if what == "fisher":
        optin.score(ad, [batch], "fisher")
    elif what == "approximate":
        s = optin.score(ad, [batch], "trajectory", {"target_minutes": 1e-3})
        out["plan"] = s.options.get("plan")
    else:
        layers = sorted({0, L // 2, L - 1})
        t_heads = time.perf_counter()
        TrajectoryScorer(estimator="exact", neuron_group=1, kinds=["heads"]).score(ad, [batch], ScoreContext())
        t_heads = time.perf_counter() - t_heads
        # neurons: the first chunks of masks of three layers, about `sample` neurons each (a neuron's restart
        # cost depends on its layer only); the rest extrapolated with the per-layer restart cost
        scorer = TrajectoryScorer(estimator="exact", neuron_group=1, kinds=["neurons"])
        original, done = scorer._exact_jobs, {}

        def sampled(kinds, counts, traces, plan):
            jobs = [j for j in original(kinds, counts, traces, plan) if j[1] in layers and j[3] < sample]
            for j in jobs:
                done[j[1]] = done.get(j[1], 0) + j[4]
            return jobs

        scorer._exact_jobs = sampled
        t_n = time.perf_counter()
        scorer.score(ad, [batch], ScoreContext())
        t_n = time.perf_counter() - t_n
        per_cost = t_n / sum(n * restart_cost(L, i, "neurons") for i, n in done.items())
        total = t_heads + per_cost * F * sum(restart_cost(L, i, "neurons") for i in range(L))
        out.update(exact_heads_seconds=t_heads, exact_neuron_sample_seconds=t_n, neurons_timed=done,
                   extrapolated=True, seconds=total)
    out.setdefault("seconds", time.perf_counter() - t0)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base", "bert-large"])
    ap.add_argument("--what", nargs="+", default=["fisher", "approximate", "exact"])
    ap.add_argument("--calib-size", type=int, default=32)
    ap.add_argument("--sample", type=int, default=48, help="neurons timed per sampled layer (exact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/scoring_time.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.calib_size, args.sample, args.threads)))
        return
    rows = []
    for model in args.models:
        for what in args.what:
            res = subprocess.run([sys.executable, __file__, "--one", model, what, "--calib-size", str(args.calib_size),
                                  "--sample", str(args.sample), "--threads", str(args.threads)],
                                 capture_output=True, text=True)
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            Path(args.out).write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv)}, indent=2))
    for model in args.models:
        got = {r["what"]: r for r in rows if r["model"] == model}
        if "exact" in got and "approximate" in got:
            print(f"{model}: approximate is {got['exact']['seconds'] / got['approximate']['seconds']:.0f}x faster than exact")


if __name__ == "__main__":
    main()
