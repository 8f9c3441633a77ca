"""Loading and saving timm models for the timm adapters (``vit``, ``swin``): hub names and model folders, and
what the two adapters share (``TimmImageClassifier``).

A timm model folder holds ``config.json`` (``timm_class`` + ``model_args``: the constructor's keyword
arguments, plus free keys such as ``mean``/``std``) and ``model.safetensors`` (the state dict). Only the
classes in ``TIMM_CLASSES`` are rebuilt: a config never names arbitrary code to import.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optin.errors import OptinError
from optin.export import check_layer_count, rebuild_device, shape_differences, weight_shapes

from .common import image_collate

TIMM_CLASSES = ("VisionTransformer", "SwinTransformer")


def timm_class(name: str) -> type[nn.Module]:
    """The timm model class called ``name`` (one of ``TIMM_CLASSES``)."""
    if name not in TIMM_CLASSES:
        raise OptinError(f"unsupported timm class {name!r} in config.json (supported: {', '.join(TIMM_CLASSES)})")
    if name == "SwinTransformer":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def save_timm_folder(model: nn.Module, path: str | Path, model_args: dict, **extra: Any) -> Path:
    """Write ``config.json`` (timm class, kwargs and ``extra`` keys) and ``model.safetensors`` into ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"architecture": extra.pop("architecture", type(model).__name__), "timm_class": type(model).__name__,
              "model_args": dict(model_args), **extra}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def load_timm_folder(path: str | Path) -> nn.Module:
    """Rebuild the timm model described by ``path/config.json`` (``timm_class`` + ``model_args``) and load
    ``path/model.safetensors`` into it (strict); returned in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "config.json", path / "model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise OptinError(f"{path} is not a timm model folder: {f.name} is missing")
    shapes = weight_shapes(weights)
    try:
        config = json.loads(config_file.read_text())
        cls = timm_class(config.get("timm_class", "VisionTransformer"))
        args = config["model_args"]
        for key in ("depth", "depths"):  # no more blocks than the weights file has tensors
            n = args.get(key)
            n = sum(n) if isinstance(n, (list, tuple)) and all(isinstance(v, int) for v in n) else n
            if isinstance(n, int) and n > len(shapes):
                raise OptinError(f"{config_file} declares {key} {n} but {weights.name} holds {len(shapes)} tensors; "
                                 "the config does not belong to these weights")
        with torch.device("meta"):  # shapes first, without memory: a wrong config fails before allocating
            differ = shape_differences(cls(**args), shapes)
        if differ:
            raise OptinError(f"{weights} does not match the model in {config_file}: {differ}; the weights belong to "
                             "another config (re-save the folder with the config the weights were trained with)")
        model = cls(**args)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OptinError(f"cannot rebuild the model from {config_file}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise OptinError(f"{weights} does not match the model in {config_file}: {' '.join(str(exc).split())[:300]}") \
            from None
    return model.eval()


def load_timm(source: str, num_labels: int | None = None) -> tuple[nn.Module, dict]:
    """A timm model and its processor config from ``timm:NAME`` (hub weights) or a timm model folder.

    With ``num_labels`` a classifier of another size is replaced by a fresh one (fine-tuning)."""
    if source.startswith("timm:"):
        import timm

        name = source[5:]
        try:
            model = timm.create_model(name, pretrained=True, **({"num_classes": num_labels} if num_labels else {}))
        except Exception as exc:
            raise OptinError(f"cannot load timm model {name!r} with pretrained weights ({exc}); offline, "
                             "use a local folder with config.json + model.safetensors") from exc
        cfg = model.pretrained_cfg or {}
        return model.eval(), {"timm_name": name, "num_classes": model.num_classes, "mean": cfg.get("mean"),
                              "std": cfg.get("std")}
    model = load_timm_folder(source)
    if num_labels and num_labels != model.num_classes:
        model.reset_classifier(num_labels)
    return model.eval(), json.loads((Path(source) / "config.json").read_text())


class TimmImageClassifier:
    """Loading, batching, logits and the saved timm config shared by the adapters of timm image classifiers
    (``processor`` is the timm config: ``timm_class`` + ``model_args``, or ``timm_name``)."""

    @classmethod
    def load(cls, source: str, num_labels: int | None = None):
        return cls(*load_timm(source, num_labels))

    def collate(self, examples: list[dict]) -> dict:
        return image_collate(examples)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(batch["pixel_values"])

    def timm_config(self) -> dict:
        """The timm config this model was loaded with (recorded in the export plan; {} when unknown)."""
        return self.processor if isinstance(self.processor, dict) else {}

    def save_extras(self, directory: str) -> None:
        if isinstance(self.processor, dict) and "model_args" in self.processor:
            (Path(directory) / "config.json").write_text(json.dumps(self.processor, indent=2))


def timm_from_config(cfg: dict, expected: str) -> nn.Module:
    """A randomly initialised timm model of class ``expected`` as a pruned export's config describes it:
    ``timm_class`` + ``model_args`` (a model folder), or ``timm_name`` + ``num_classes`` (a hub model)."""
    if "model_args" in cfg:
        if cfg.get("timm_class", expected) != expected:
            raise OptinError(f"cannot rebuild timm class {cfg.get('timm_class')!r} here (supported: {expected})")
        args = cfg["model_args"]
        if not isinstance(args, dict):
            raise OptinError(f"the plan's timm model_args must be a mapping, got {type(args).__name__}")
        for key in ("depth", "depths"):  # bounded by the weights file before anything is built
            value = args.get(key)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and all(isinstance(v, int) for v in values):
                check_layer_count(sum(values), f"model_args.{key}")
        with rebuild_device():
            return timm_class(expected)(**args).eval()
    if "timm_name" in cfg:
        import timm

        with rebuild_device():
            return timm.create_model(cfg["timm_name"], pretrained=False, num_classes=cfg["num_classes"]).eval()
    raise OptinError(f"this pruned {expected} was exported without its timm config (timm_class + model_args, or "
                     "timm_name); pass the model with processor={'timm_class': ..., 'model_args': {...}} before "
                     "pruning")
