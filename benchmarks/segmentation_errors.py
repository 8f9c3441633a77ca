"""Where a segmentation model's errors are: foreground/background mIoU vs the full class mIoU, and how often
a pixel found as an item gets the right class.

    python benchmarks/segmentation_errors.py --model m2f-mosaic --task fmnist-mosaic --eval-size 500
"""
from __future__ import annotations

import argparse

import torch

from optin.measure import confusion, miou_of
from optin.models import load_model
from optin.recipe import batches_of
from optin.tasks import get_task


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="m2f-mosaic")
    ap.add_argument("--task", default="fmnist-mosaic")
    ap.add_argument("--eval-size", type=int, default=500)
    args = ap.parse_args()
    ad, task = load_model(args.model), get_task(args.task)
    n = task.num_labels
    binary = torch.zeros(2, 2, dtype=torch.long)
    classes = torch.zeros(n, n, dtype=torch.long)
    for batch in batches_of(ad, task.examples("test")[:args.eval_size], 50):
        pred, target = ad.logits(batch).argmax(1), batch["masks"]
        binary += confusion((pred > 0).long(), (target > 0).long(), 2)
        classes += confusion(pred, target, n)
    found = classes[1:, 1:]
    print(f"foreground/background mIoU {miou_of(binary):.3f}; {n}-class mIoU {miou_of(classes):.3f}; "
          f"item pixels found as an item with the right class: {found.diag().sum().item() / max(1, found.sum().item()):.3f}")


if __name__ == "__main__":
    main()
