"""Fine-tuning a classifier on a task (used to build the embedded default and the benchmark models)."""
from __future__ import annotations

import random

import torch

from .contracts import Adapter
from .progress import bar
from .tasks import Task


def finetune(adapter: Adapter, task: Task, epochs: float = 2.0, lr: float = 1e-4, batch_size: int = 32,
             seed: int = 0, weight_decay: float = 0.01, max_examples: int | None = None) -> dict:
    """AdamW with linear warm-up/decay over the task's train split; returns the training log."""
    torch.manual_seed(seed)
    examples = list(task.examples("train"))
    random.Random(seed).shuffle(examples)
    if max_examples:
        examples = examples[:max_examples]
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = max(1, int(steps_per_epoch * epochs))
    warmup = max(1, total // 10)
    trainable = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    adapter.model.train()
    losses = []
    rng = random.Random(seed + 1)
    with bar(f"fine-tuning on {task.name}", total=total) as (advance, _):
        step = 0
        while step < total:
            rng.shuffle(examples)
            for i in range(0, len(examples), batch_size):
                if step >= total:
                    break
                loss = adapter.loss(adapter.collate(examples[i:i + batch_size]))
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                advance(1)
    adapter.model.eval()
    return {"steps": total, "final_loss": sum(losses[-20:]) / len(losses[-20:]), "examples": len(examples),
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
