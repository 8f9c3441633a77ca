"""Measuring a model: accuracy on labelled batches, parameter count, and throughput."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from .contracts import Adapter, Batch


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def accuracy(adapter: Adapter, batches: list[Batch], advance: Callable[[int], None] = lambda n: None) -> float:
    """Top-1 accuracy of ``adapter``'s model over labelled batches."""
    adapter.model.eval()
    correct = total = 0
    for batch in batches:
        pred = adapter.logits(batch).argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += int(batch["labels"].numel())
        advance(1)
    return correct / max(total, 1)


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) counts of (target, prediction) pixel pairs, ``ignore`` targets skipped."""
    keep = target != ignore
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def miou_of(conf: torch.Tensor) -> float:
    """Mean intersection-over-union over the classes that occur in the target or the prediction."""
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


@torch.no_grad()
def miou(adapter: Adapter, batches: list[Batch], advance: Callable[[int], None] = lambda n: None,
         reference: Adapter | None = None) -> float:
    """Segmentation mIoU against the batches' ``masks``, or against ``reference``'s predictions (fidelity)."""
    adapter.model.eval()
    conf = None
    for batch in batches:
        logits = adapter.logits(batch)
        target = reference.logits(batch).argmax(1) if reference is not None else batch["masks"]
        c = confusion(logits.argmax(1), target, logits.shape[1])
        conf = c if conf is None else conf + c
        advance(1)
    return miou_of(conf) if conf is not None else 1.0


@torch.no_grad()
def agreement(a: Adapter, b: Adapter, batches: list[Batch], advance: Callable[[int], None] = lambda n: None,
              min_confidence: float = 0.0) -> float:
    """Fraction of examples where two models predict the same class. With ``min_confidence``, only the
    examples where ``b`` (the reference) gives its top class at least that probability count: on
    unlabelled out-of-distribution photos many predictions are near-ties that any perturbation flips."""
    same = total = 0
    for batch in batches:
        la, lb = a.logits(batch), b.logits(batch)
        pa, pb = la.argmax(-1), lb.argmax(-1)
        keep = lb.softmax(-1).max(-1).values >= min_confidence
        same += int((pa == pb)[keep].sum())
        total += int(keep.sum())
        advance(1)
    return same / max(total, 1)


def evaluate(adapter: Adapter, batches: list[Batch], metric: str, reference: Adapter,
             advance: Callable[[int], None] = lambda n: None) -> float:
    """A task's metric: "accuracy", "miou" (against labels), or "agreement" with ``reference`` (top-1 for
    classifiers, mIoU of the predictions for segmentation)."""
    if metric == "accuracy":
        return accuracy(adapter, batches, advance)
    if metric == "miou":
        return miou(adapter, batches, advance)
    if metric == "agreement":
        if adapter.output == "segmentation":
            return miou(adapter, batches, advance, reference=reference)
        return agreement(adapter, reference, batches, advance)
    raise ValueError(f"unknown metric {metric!r}")


@torch.no_grad()
def per_example(adapter: Adapter, batches: list[Batch], metric: str, reference: Adapter,
                advance: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """What ``evaluate`` measures, example by example, so that the metric can be recomputed on any resample
    of the examples (``metric_of_examples``): (N,) 0/1 correctness for "accuracy" and classifier
    "agreement" (with ``reference``), (N, C, C) confusion matrices (target x prediction) for "miou" and
    segmentation "agreement"."""
    if metric not in ("accuracy", "miou", "agreement"):
        raise ValueError(f"unknown metric {metric!r}")
    adapter.model.eval()
    rows = []
    for batch in batches:
        logits = adapter.logits(batch)
        segmentation = metric == "miou" or (metric == "agreement" and adapter.output == "segmentation")
        if metric == "agreement":
            target = reference.logits(batch).argmax(1 if segmentation else -1)
        else:
            target = batch["masks"] if segmentation else batch["labels"]
        if segmentation:
            pred = logits.argmax(1)
            rows += [confusion(p, t, logits.shape[1]) for p, t in zip(pred, target)]
        else:
            rows.append((logits.argmax(-1) == target).to(torch.uint8).cpu())
        advance(1)
    if not rows:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.stack(rows).cpu() if rows[0].dim() == 2 else torch.cat(rows)


def metric_of_examples(results: torch.Tensor) -> float:
    """``evaluate``'s metric from ``per_example`` results: the mean correctness, or the mIoU of the summed
    confusion matrices."""
    if results.dim() == 3:
        return miou_of(results.sum(0)) if len(results) else 1.0
    return float(results.double().mean()) if len(results) else 0.0


@torch.no_grad()
def timings(runs: dict[str, Callable[[], object]], warmup: int = 3, repeats: int = 15, min_seconds: float = 0.0,
            sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each callable, timed interleaved in one process: entry i of every list is round
    i, so ratios of entries of the same round pair the models under the same machine noise.

    Each callable is warmed up, then the callables take turns for at least ``repeats`` rounds and
    ``min_seconds``; ``sync`` waits for an asynchronous device (CUDA) before each clock reading.
    """
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in runs}
    start = time.perf_counter()
    i = 0
    while i < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        i += 1
    return times


@torch.no_grad()
def throughput(runs: dict[str, Callable[[], object]], examples: int, warmup: int = 3, repeats: int = 15,
               min_seconds: float = 0.0, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Examples per second of each callable on the same batch, timed interleaved in one process.

    Each callable is warmed up, then the callables take turns so that machine noise hits all of them;
    the figure is ``examples / median(seconds per call)``. ``sync`` waits for an asynchronous device
    (CUDA) before each clock reading (``timings`` gives the seconds of every call).
    """
    times = timings(runs, warmup, repeats, min_seconds, sync)
    return {k: examples / statistics.median(v) for k, v in times.items()}
