"""GPU figures (run on a lent GPU; nothing in optin needs one).

1. ``vit`` : a recipe sweep for the ``vit-fmnist`` named model (test accuracy after E epochs of the zoo's
   recipe, for the model's architecture and a narrower one), to choose a CPU build that reaches 88%.
2. ``bert``: trajectory scoring time of a BERT-base-shaped model (12 x 768, FFN 3072, random weights: this
   measures time, not accuracy) on one calibration batch of 128 examples of 20-60 tokens, float32 and
   bfloat16: the approximate plan (heads exact, neurons by Gauss-Newton, 32 probes) in full, and exact
   per-unit scores of every head and of the neurons of layers 0, 6 and 11, extrapolated to all layers with
   the planner's restart-cost model.

    python benchmarks/gpu_figures.py --parts vit bert --out results.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def vit_sweep(configs: list[dict], device: str, log) -> list[dict]:
    from optin.tasks import get_task
    from optin_plugins.zoo.training import decay_groups, warmup_cosine
    from optin_plugins.zoo.vit_fmnist import MODEL_ARGS, augment, make_vit, task_tensors

    task = get_task("fashion-mnist")
    x, y = task_tensors(task, "train")
    xt, yt = task_tensors(task, "test")
    out = []
    for cfg in configs:
        args = {**MODEL_ARGS, **cfg.get("args", {})}
        model = make_vit(args, seed=0).to(device)
        epochs, lr, bs = cfg["epochs"], cfg.get("lr", 1e-3), 128
        steps = math.ceil(len(y) / bs)
        total = steps * epochs
        groups = decay_groups(model, 0.05, lambda n, p: p.dim() >= 2 and not n.endswith(("pos_embed", "cls_token")))
        opt = torch.optim.AdamW(groups, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, max(1, int(total * 0.05))))
        gen = torch.Generator().manual_seed(1)
        accs, t0 = [], time.perf_counter()
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), bs):
                idx = order[i:i + bs]
                loss = F.cross_entropy(model(augment(x[idx], gen).to(device)), y[idx].to(device),
                                       label_smoothing=cfg.get("smoothing", 0.0))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            model.eval()
            with torch.no_grad():
                pred = torch.cat([model(xt[j:j + 1000].to(device)).argmax(-1).cpu() for j in range(0, len(yt), 1000)])
            accs.append(float((pred == yt).float().mean()))
            log(f"vit {cfg['name']} epoch {epoch + 1}/{epochs}: test {accs[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
        out.append({**cfg, "args": args, "test_accuracy_per_epoch": accs, "seconds": time.perf_counter() - t0})
    return out


def bert_batch(n: int = 128, lo: int = 20, hi: int = 60, vocab: int = 30522, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    t = int(lengths.max())
    ids = torch.randint(1000, vocab, (n, t), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 6, (n,), generator=g)}


def bert_timings(device: str, dtypes: list[str], log, smoke: bool = False) -> list[dict]:
    import optin
    from optin.contracts import ScoreContext
    from optin.devices import resolve_dtype, to_device
    from optin_plugins.adapters.bert import BertAdapter
    from optin_plugins.scorers.trajectory import TrajectoryScorer
    from optin_plugins.scorers.trajectory_plan import restart_cost
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, num_labels=6)
    if smoke:  # a quick check of this script on a small model
        cfg = BertConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128, num_labels=6)
    out = []
    for name in dtypes:
        dtype = resolve_dtype(name)
        torch.manual_seed(0)
        ad = BertAdapter(BertForSequenceClassification(cfg).to(device=device, dtype=dtype).eval())
        batch = to_device(bert_batch(), torch.device(device), dtype)
        tokens = int(batch["attention_mask"].sum())
        row = {"dtype": name, "tokens": tokens, "examples": 128}
        # warm-up
        with torch.no_grad():
            ad.logits(batch)
        sync()
        t0 = time.perf_counter()
        approx = optin.score(ad, [batch], "trajectory", {"target_minutes": 0.01, "probes": 32})
        sync()
        row["approximate_seconds"] = time.perf_counter() - t0
        row["approximate_plan"] = approx.options.get("plan")
        log(f"bert {name}: approximate {row['approximate_seconds']:.1f}s {row['approximate_plan']}")
        # exact: every head, and the neurons of three layers, timed; the rest extrapolated
        scorer = TrajectoryScorer(estimator="exact", neuron_group=1, tokens_per_forward=262144)
        layers = {"heads": list(range(12)), "neurons": [0, 6, 11]}
        scorer.rows = 64 if smoke else scorer.rows
        original = scorer._exact_jobs
        scorer._exact_jobs = lambda kinds, counts, traces, plan: [j for j in original(kinds, counts, traces, plan)
                                                                  if j[1] in layers[j[0]]]
        per_layer = {}
        for kind in ("heads", "neurons"):
            scorer.kinds = [kind]
            sync()
            t0 = time.perf_counter()
            scorer.score(ad, [batch], ScoreContext())
            sync()
            per_layer[kind] = time.perf_counter() - t0
        L = 12
        measured = sum(restart_cost(L, i, "neurons") for i in layers["neurons"])
        every = sum(restart_cost(L, i, "neurons") for i in range(L))
        row["exact_heads_seconds"] = per_layer["heads"]
        row["exact_neurons_3_layers_seconds"] = per_layer["neurons"]
        row["exact_seconds_extrapolated"] = per_layer["heads"] + per_layer["neurons"] * every / measured
        row["speedup_approximate"] = row["exact_seconds_extrapolated"] / row["approximate_seconds"]
        log(f"bert {name}: exact heads {per_layer['heads']:.1f}s, neurons of layers 0/6/11 "
            f"{per_layer['neurons']:.1f}s, all units ~{row['exact_seconds_extrapolated']:.0f}s; "
            f"approximate is {row['speedup_approximate']:.0f}x faster")
        out.append(row)
        del ad
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["vit", "bert"])
    ap.add_argument("--out", default="gpu_figures.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: check the script itself")
    args = ap.parse_args()
    result: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__}
    out = Path(args.out)

    def log(msg: str) -> None:
        print(msg, flush=True)
        out.write_text(json.dumps(result, indent=2))

    if "vit" in args.parts:
        configs = [{"name": "vit-fmnist x 6 epochs", "epochs": 6},
                   {"name": "vit-fmnist x 12 epochs", "epochs": 12},
                   {"name": "width 128 x 12 epochs", "epochs": 12, "args": {"embed_dim": 128, "num_heads": 4}}]
        if args.smoke:
            configs = [{"name": "smoke", "epochs": 1, "args": {"depth": 1, "embed_dim": 32, "num_heads": 2}}]
        result["vit"] = vit_sweep(configs, args.device, log)
        log("vit done")
    if "bert" in args.parts:
        result["bert_base"] = bert_timings(args.device, ["float32", "bfloat16"], log, args.smoke)
        log("bert done")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
