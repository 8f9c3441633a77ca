"""How sure a classifier is on an unlabelled photo task: median top-class probability and how many examples
it predicts with probability >= 0.5 (the subset the confident agreement figures count).

    python benchmarks/photo_confidence.py --model mobilenetv2-imagenet --task photos
"""
from __future__ import annotations

import argparse

import torch

from optin.models import load_model
from optin.recipe import batches_of
from optin.tasks import get_task


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mobilenetv2-imagenet")
    ap.add_argument("--task", default="photos")
    args = ap.parse_args()
    ad, task = load_model(args.model), get_task(args.task)
    ad.model.eval()
    top = torch.cat([ad.logits(b).softmax(-1).max(-1).values for b in batches_of(ad, task.examples("test"), 64)])
    print(f"{len(top)} test examples: median top-class probability {top.median().item():.3f}; "
          f"{int((top >= 0.5).sum())} predicted with probability >= 0.5")


if __name__ == "__main__":
    main()
