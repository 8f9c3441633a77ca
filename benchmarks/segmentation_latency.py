"""Measured CPU latency of a full-size Mask2Former (Swin-T backbone) after FFN-neuron pruning, at several
MACs budgets. The architecture is built from a config (no hub access here, so the weights are random):
this measures what removing neurons buys in wall-clock time, not accuracy (see model_budgets.py for that).

Swin-T: embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7; Mask2Former: HF's default head (hidden 256,
100 queries, 6 pixel-decoder and 10 decoder layers), 19 classes (Cityscapes), one image per forward.

    python benchmarks/segmentation_latency.py --size 256 512 --budgets 0.95 0.9 0.85 0.82
    python benchmarks/segmentation_latency.py --front-end mmseg --size 256 512   # needs mmcv + optin[mmseg]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
from pathlib import Path

import torch

from optin.errors import BudgetError
from optin.measure import params, throughput
from optin.progress import set_quiet
from optin.recipe import score, search

SWIN_T = {"image_size": 224, "patch_size": 4, "num_channels": 3, "embed_dim": 96, "depths": [2, 2, 6, 2],
          "num_heads": [3, 6, 12, 24], "window_size": 7, "out_features": ["stage1", "stage2", "stage3", "stage4"]}
M2F = {"hidden_dim": 256, "num_queries": 100, "decoder_layers": 10, "mask_feature_size": 256,
       "feature_size": 256, "encoder_layers": 6}
MMSEG_CONFIG = "mask2former_swin-t_8xb2-90k_cityscapes-512x1024"


def hf_adapter(size: tuple[int, int]):
    from optin_plugins.adapters.mask2former import Mask2FormerAdapter
    from optin_plugins.zoo.mask2former_mosaic import make_mask2former

    return Mask2FormerAdapter(make_mask2former(num_labels=19, swin_args=SWIN_T, m2f_args=M2F), image_size=size)


def mmseg_adapter(size: tuple[int, int]):
    from optin_plugins.adapters.mmseg_mask2former import MMSegMask2FormerAdapter

    return MMSegMask2FormerAdapter.load(MMSEG_CONFIG)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--front-end", choices=["hf", "mmseg"], default="hf")
    ap.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.95, 0.9, 0.85, 0.8])
    ap.add_argument("--scorer", default="magnitude", help="random weights: a cheap scorer is as good as any")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    set_quiet(False)
    size = tuple(args.size)
    ad = (hf_adapter if args.front_end == "hf" else mmseg_adapter)(size)
    ad.model.eval()
    batch = {"pixel_values": torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))}
    seq = ad.seq_len([batch])  # fixes the input size the cost model counts at
    costs0 = ad.cost_model(seq)
    scores = score(ad, [batch], args.scorer)
    rows, skipped = [], {}
    for budget in args.budgets:
        pruned = copy.deepcopy(ad)
        try:
            masks, costs = search(pruned, scores, budget, seq, allow_degenerate=True)
        except BudgetError as exc:  # below what the FFN neurons can remove: say so, keep the other budgets
            skipped[budget] = str(exc)
            print(f"budget {budget}: {exc}", flush=True)
            continue
        pruned.prune(masks)
        speed = throughput({"before": lambda: ad.logits(batch), "after": lambda: pruned.logits(batch)},
                           examples=1, warmup=2, repeats=10, min_seconds=20.0)
        row = {"budget": budget, "macs_ratio": costs.macs_of_masks(masks) / costs0.macs(),
               "latency_ratio": speed["before"] / speed["after"], "seconds_before": 1 / speed["before"],
               "seconds_after": 1 / speed["after"], "params_ratio": params(pruned.model) / params(ad.model)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    units = sum(c * n for k in costs0.per_unit for c, n in zip(costs0.per_unit[k], costs0.counts[k]))
    result = {"front_end": args.front_end, "size": list(size), "date": dt.date.today().isoformat(),
              "macs_before": costs0.macs(), "unit_macs_fraction": units / costs0.macs(),
              "params_before": params(ad.model), "threads": torch.get_num_threads(), "scorer": args.scorer,
              "rows": rows, "skipped": skipped,
              "command": "python benchmarks/segmentation_latency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"segmentation_latency-{args.front_end}-{size[0]}x{size[1]}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
