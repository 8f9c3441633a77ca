"""Image preprocessing shared by the built-in vision adapters (``Adapter.image_transform``).

A transform takes a PIL image of any mode and returns the model's input tensor (C, H, W): converted to the
model's channels (greyscale "L" for one, "RGB" for three), resized and normalised from the model's own
preprocessing config (timm's ``pretrained_cfg``, an HF image processor, or a folder's mean/std/image_size),
so that image files given with ``--data`` need no sizes or statistics from the user.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from optin.errors import OptinError
from optin.progress import say

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pil_mode(channels: int) -> str:
    """The PIL mode images are converted to for a model with ``channels`` input channels."""
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    raise OptinError(f"the model takes {channels}-channel input; image files give 1 (greyscale) or 3 (RGB) "
                     "channels, so this model cannot read image files (pass a task that makes its tensors)")


def fit_channels(values: Sequence[float] | float | None, channels: int, default: Sequence[float],
                 what: str) -> tuple[float, ...]:
    """Per-channel ``values`` (a mean or std) for ``channels`` channels: one value repeated, or RGB values
    averaged for a greyscale model (timm's rule)."""
    values = default if values is None else values
    values = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise OptinError(f"the model's {what} has {len(values)} values but it takes {channels} channels")


class ImageTransform:
    """A PIL image -> tensor (C, H, W): converted to the model's channels, then ``pipeline``."""

    def __init__(self, channels: int, pipeline: Callable[[Any], torch.Tensor], description: str) -> None:
        self.channels, self.mode = channels, pil_mode(channels)
        self.pipeline, self.description = pipeline, description

    def __call__(self, image: Any) -> torch.Tensor:
        return self.pipeline(image.convert(self.mode))

    def __repr__(self) -> str:
        return f"ImageTransform({self.mode}: {self.description})"


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = [int(s) for s in size]
    return (size[0], size[0]) if len(size) == 1 else (size[-2], size[-1])


def resize_normalize(size: int | Sequence[int], mean: Sequence[float] | None, std: Sequence[float] | None,
                     channels: int, crop_pct: float = 1.0, interpolation: str = "bilinear") -> ImageTransform:
    """Resize to ``size`` (H, W) (with ``crop_pct`` < 1: resize to size / crop_pct, then centre-crop), scale to
    [0, 1] and normalise with ``mean``/``std`` (ImageNet's when None)."""
    from torchvision import transforms as T

    h, w = _hw(size)
    mode = getattr(T.InterpolationMode, interpolation.upper(), T.InterpolationMode.BILINEAR)
    mean = fit_channels(mean, channels, IMAGENET_MEAN, "mean")
    std = fit_channels(std, channels, IMAGENET_STD, "std")
    if crop_pct < 1.0:
        steps = [T.Resize((int(h / crop_pct), int(w / crop_pct)), interpolation=mode), T.CenterCrop((h, w))]
    else:
        steps = [T.Resize((h, w), interpolation=mode)]
    pipeline = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    return ImageTransform(channels, pipeline, f"resize to {h}x{w}, mean {mean}, std {std}")


def timm_transform(model: torch.nn.Module, config: dict) -> ImageTransform:
    """timm's own evaluation transform for ``model`` (``timm.data.create_transform`` on the data config
    resolved against the model's input size and channels and its ``pretrained_cfg``). A folder in optin's own
    format (``timm_class`` + ``model_args``, free ``mean``/``std`` keys) carries no crop recommendation:
    its images are resized to the model's input size without a crop."""
    from timm.data import create_transform

    channels = int(_timm_channels(model))
    args: dict[str, Any] = {}
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        value = config.get(key) if isinstance(config, dict) else None
        if value is None:
            value = (getattr(model, "pretrained_cfg", None) or {}).get(key)
        args[key] = fit_channels(value, channels, default, key)
    if isinstance(config, dict) and "timm_class" in config:
        args["crop_pct"] = float(config.get("crop_pct", 1.0))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # the size the model was built for (a class built directly has no pretrained_cfg)
        args["input_size"] = (channels, *_hw(img_size))
    try:
        from timm.data import resolve_input_data_config
    except ImportError:  # older timm
        from timm.data import resolve_data_config

        data = resolve_data_config(args, model=model)
    else:
        data = resolve_input_data_config(model, args=args)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    data = {k: data[k] for k in keys if k in data}
    pipeline = create_transform(**data, is_training=False)
    return ImageTransform(channels, pipeline, f"timm {', '.join(f'{k} {v}' for k, v in data.items())}")


def _timm_channels(model: torch.nn.Module) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, torch.nn.Conv2d):
        return proj.in_channels
    return int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0])


def hf_image_processor(source: str) -> Any:
    """The HF image processor of a model folder (``preprocessor_config.json``), or None when it has none or it
    cannot be read (the adapter then falls back to the config's image size and ImageNet statistics)."""
    path = Path(source)
    if path.is_dir() and not (path / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    from optin.safety import NO_REMOTE_CODE

    try:
        return AutoImageProcessor.from_pretrained(source, **NO_REMOTE_CODE)
    except Exception:  # noqa: BLE001 - a missing or odd processor is not fatal: the fallback is announced
        return None


def hf_transform(processor: Any, config: Any, channels: int, image_size: Any = None, name: str = "model",
                 resize_only: bool = False) -> ImageTransform:
    """The transform of an HF vision model: its image processor itself (RGB models), or its statistics with a
    plain resize to ``image_size`` (greyscale models, and ``resize_only`` for segmentation); without a
    processor the config's ``image_size`` with ImageNet mean/std, said in one note."""
    size = image_size if image_size is not None else getattr(config, "image_size", 224)
    if processor is None or not hasattr(processor, "image_mean"):
        say(f"{name}: no preprocessor_config.json; images are resized to {_hw(size)[0]}x{_hw(size)[1]} and "
            "normalised with the ImageNet mean/std (save the model's image processor into the folder to use its own)")
        return resize_normalize(size, None, None, channels)
    if channels == 3 and not resize_only:
        def pipeline(image: Any) -> torch.Tensor:
            return processor(images=image, return_tensors="pt")["pixel_values"][0]

        return ImageTransform(3, pipeline, type(processor).__name__)
    normalize = getattr(processor, "do_normalize", True)
    return resize_normalize(size, processor.image_mean if normalize else (0.0,),
                            processor.image_std if normalize else (1.0,), channels)
