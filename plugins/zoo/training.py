"""The training loop the named models share (they are trained from scratch on CPU on first use).

Each zoo module picks its optimiser, schedule and loss; this module owns the loop: shuffled epochs from a
seeded generator, progress bar, optional gradient clipping, and the training log.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn

from optin.progress import bar


def decay_groups(model: nn.Module, weight_decay: float, decays: Callable[[str, torch.Tensor], bool]) -> list[dict]:
    """AdamW/SGD parameter groups: ``weight_decay`` on the parameters ``decays(name, p)`` picks, none on the rest."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                loss_of: Callable[[torch.Tensor, torch.Generator], torch.Tensor], n: int, total: int,
                batch_size: int, seed: int, label: str, clip: float | None = None,
                drop_last: bool = False) -> dict:
    """Run ``total`` optimiser steps over shuffled epochs of ``n`` examples. ``loss_of(indices, generator)``
    returns the batch loss (the generator serves augmentation). Leaves the model in eval mode and returns
    the log: steps, seconds, final loss (mean of the last 50 steps) and the loss curve (means of 50)."""
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    losses: list[float] = []
    step, start = 0, time.perf_counter()
    stop = n - batch_size + 1 if drop_last else n
    with bar(label, total=total) as (advance, _):
        while step < total:
            order = torch.randperm(n, generator=gen)
            for i in range(0, stop, batch_size):
                if step >= total:
                    break
                loss = loss_of(order[i:i + batch_size], gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                advance(1)
    seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-50:]
    return {"steps": total, "seconds": round(seconds, 1), "final_loss": sum(tail) / len(tail),
            "loss_curve": [round(sum(c) / len(c), 4) for c in (losses[i:i + 50] for i in range(0, len(losses), 50))],
            "examples": n, "batch_size": batch_size, "seed": seed, "threads": torch.get_num_threads()}
