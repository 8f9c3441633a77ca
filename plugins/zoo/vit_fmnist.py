"""A small vision transformer trained from scratch on Fashion-MNIST: the named model ``vit-fmnist``.

A timm ``VisionTransformer`` (28x28 greyscale input, 4x4 patches: 49 patches + a class token = 50 tokens;
6 layers, 4 heads of dim 32, hidden 128, MLP 512, 10 classes) trained on the task ``fashion-mnist``
(official train split) on CPU the first time it is used, then cached under ``$OPTIN_CACHE/models/vit-fmnist``
as ``config.json`` (timm class and kwargs), ``model.safetensors`` (the state dict) and ``optin-train.json``
(the training log with the test accuracy). ``load_timm_folder`` rebuilds the module from such a folder.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from optin.errors import OptinError
from optin.hooks import hookimpl
from optin.models import NamedModel
from optin.tasks import Task, get_task

from .training import decay_groups, train_steps, warmup_cosine
from .cache import build_once
from ..adapters.timm_io import load_timm_folder, save_timm_folder, timm_class  # noqa: F401 (re-exported)

NAME = "vit-fmnist"
TASK = "fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # the task's normalisation (see optin_plugins.tasks.images)
MODEL_ARGS = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 128, "depth": 6,
              "num_heads": 4, "mlp_ratio": 4.0, "class_token": True, "global_pool": "token"}
# 15 epochs of the recipe below. A ViT learns slowly from scratch: on a GPU (benchmarks/gpu_figures.py,
# 2026-11-30) this recipe reached 84.7% test accuracy after 6 epochs and 87.5% after 12 at width 192, and
# 88.2% after 12 at width 128 (less than half the MACs per image), hence width 128 and 15 epochs. The CPU
# build reached 89.2% test accuracy in 63 minutes on 2 threads (docs/benchmarks.md, 2026-11-30).
RECIPE = {"epochs": 15.0, "lr": 1e-3, "batch_size": 128, "weight_decay": 0.05, "warmup_fraction": 0.05, "seed": 0}


def make_vit(model_args: dict | None = None, seed: int = 0) -> nn.Module:
    """A freshly initialised (seeded) timm VisionTransformer with ``model_args`` (default: MODEL_ARGS)."""
    torch.manual_seed(seed)
    return timm_class("VisionTransformer")(**(MODEL_ARGS if model_args is None else model_args))


def task_tensors(task: Task, split: str, max_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``[N, C, H, W]`` and labels ``[N]`` of an image task's split, stacked."""
    examples = task.examples(split)
    if max_examples:
        examples = examples[:max_examples]
    if not examples:
        raise OptinError(f"task {task.name!r} has no {split} examples")
    return (torch.stack([e["image"] for e in examples]),
            torch.tensor([int(e["label"]) for e in examples], dtype=torch.long))


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2, fill: float = -MEAN / STD) -> torch.Tensor:
    """Random horizontal flip and random crop (zero-padding by ``pad`` pixels) of a batch ``[B, C, H, W]``.
    ``fill`` is the normalised value of a black pixel."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def training_run(task: Task, batch_size: int, epochs: float, seed: int, max_examples: int | None,
                 max_steps: int | None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Seed torch with ``seed`` and give a classifier's training run on ``task``: the train split as tensors
    (x, y), the steps per epoch and the total steps (``epochs`` of them, at most ``max_steps``)."""
    torch.manual_seed(seed)
    x, y = task_tensors(task, "train", max_examples)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = max(1, round(steps_per_epoch * epochs))
    return x, y, steps_per_epoch, min(total, max_steps) if max_steps else total


def classification_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, augmentation: bool
                        ) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``loss_of(indices, generator)`` for ``train_steps``: cross-entropy of ``model`` on those examples,
    randomly flipped and cropped (``augment``) when ``augmentation``."""
    def loss_of(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        xb = augment(x[idx], gen) if augmentation else x[idx]
        return F.cross_entropy(model(xb), y[idx])

    return loss_of


@torch.no_grad()
def evaluate_vit(model: nn.Module, task: Task, split: str = "test", batch_size: int = 500,
                 max_examples: int | None = None) -> float:
    """Top-1 accuracy of an image classifier on a task's split."""
    x, y = task_tensors(task, split, max_examples)
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(y)


def train_vit(model: nn.Module, task: Task, epochs: float, lr: float = 1e-3, batch_size: int = 128,
              weight_decay: float = 0.05, warmup_fraction: float = 0.05, seed: int = 0, augmentation: bool = True,
              max_examples: int | None = None, max_steps: int | None = None) -> dict:
    """Train an image classifier on ``task``'s train split with AdamW, linear warm-up then cosine decay to 0,
    gradient clipping at 1.0, and (``augmentation``) random flips and crops with padding 2.

    ``epochs`` may be fractional; ``max_examples`` / ``max_steps`` cut the run short (for tests and timing).
    Returns the training log (steps, seconds, final loss, settings). The model is left in eval mode.
    """
    x, y, steps_per_epoch, total = training_run(task, batch_size, epochs, seed, max_examples, max_steps)
    n = len(y)
    warmup = max(1, int(total * warmup_fraction))
    # no weight decay on biases, norms, position embeddings and the class token
    groups = decay_groups(model, weight_decay, lambda name, p: p.dim() >= 2 and not name.endswith(("pos_embed", "cls_token")))
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup))

    log = train_steps(model, opt, sched, classification_loss(model, x, y, augmentation), n, total, batch_size, seed,
                      f"training on {task.name}", clip=1.0)
    return {**log, "epochs": total / steps_per_epoch, "lr": lr, "weight_decay": weight_decay,
            "warmup_fraction": warmup_fraction, "augmentation": augmentation}


def build(name: str = NAME) -> str:
    """Train ``vit-fmnist`` once (first use) and return its cached folder."""
    def train_into(tmp: Path) -> dict:
        task = get_task(TASK)
        model = make_vit(MODEL_ARGS, seed=RECIPE["seed"])
        log = train_vit(model, task, **RECIPE)
        save_timm_folder(model, tmp, MODEL_ARGS, architecture=name, num_classes=MODEL_ARGS["num_classes"], task=TASK,
                         mean=MEAN, std=STD)
        return {"task": TASK, **log, "test_accuracy": evaluate_vit(model, task, "test")}

    return build_once(name, train_into, f"training a 6-layer ViT on {TASK} from scratch on CPU, "
                                        f"{RECIPE['epochs']:g} epoch(s)", ("test_accuracy", "test accuracy"))


@hookimpl
def optin_models() -> dict[str, NamedModel]:
    return {NAME: NamedModel(NAME, f"ViT (6 layers, 4 heads, width 128, 50 tokens) trained on {TASK} (built on first use)",
                             TASK, build)}
