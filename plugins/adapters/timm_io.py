"""Loading and saving timm models for the timm adapters (``vit``, ``swin``): hub names, model folders and bare
checkpoints, and what the two adapters share (``TimmImageClassifier``).

Three sources:

- optin's own folder: ``config.json`` with ``timm_class`` + ``model_args`` (the class's constructor keyword
  arguments, plus free keys such as ``mean``/``std``) and ``model.safetensors``. Only the classes in
  ``TIMM_CLASSES`` are rebuilt;
- timm's own folder, as ``timm.models.save_for_hf(model, DIR, model_args=...)`` writes it: ``config.json``
  with ``architecture``, ``num_classes``, ``model_args`` and ``pretrained_cfg``, weights in
  ``model.safetensors`` and/or ``pytorch_model.bin``; rebuilt with ``timm.create_model(architecture,
  pretrained=False, **model_args)``;
- ``timm:NAME`` (hub weights) or ``timm:NAME`` with a checkpoint file (a state dict: safetensors, or a
  ``.pth``/``.bin`` read with ``torch.load(weights_only=True)``).

A config never names code to import: only timm's registered architectures and the classes above are built,
and pickled weights are never unpickled beyond tensors.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from optin.errors import OptinError
from optin.export import check_layer_count, rebuild_device, shape_differences, weight_shapes
from optin.registry import one_line

from .common import config_json, image_collate

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


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference (timm's save_for_hf writes either)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: safetensors, or a ``torch.save``d ``.pth``/``.bin``/``.pt`` read with
    ``torch.load(weights_only=True)`` (tensors and plain containers only: no pickled object is ever run),
    unwrapped from ``{"state_dict": ...}`` or ``{"model": ...}``, with DDP's ``module.`` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise OptinError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a weights file is user input
        text = " ".join(str(exc).split())
        if "weights_only" in text or "Unsupported global" in text or type(exc).__name__ == "UnpicklingError":
            raise OptinError(f"{path} holds pickled Python objects besides tensors, which optin never loads "
                             "(torch.load(weights_only=True) only); save the state dict alone: "
                             "torch.save(model.state_dict(), 'weights.pth') or safetensors") from None
        raise OptinError(f"cannot read weights {path}: {type(exc).__name__}: {text[:200]}; the file is damaged or "
                         "not a PyTorch/safetensors weights file") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise OptinError(f"{path} does not hold a state dict (a mapping of parameter names to tensors, possibly "
                         "under 'state_dict' or 'model'); save model.state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def folder_weights(path: Path) -> Path:
    """The weights file of a timm model folder: ``model.safetensors``, else ``pytorch_model.bin``."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise OptinError(f"{path} is not a timm model folder: it has neither {' nor '.join(WEIGHT_FILES)}")


def _shapes(weights: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor] | None]:
    """Tensor shapes of a weights file (safetensors: from the header, nothing read) and, for a pickle-free
    ``torch.load`` file, the state dict itself (it has to be read to know its shapes)."""
    if weights.suffix == ".safetensors":
        return weight_shapes(weights), None
    state = read_state_dict(weights)
    return {k: tuple(v.shape) for k, v in state.items()}, state


def check_timm_architecture(name: Any) -> str:
    """``name`` if it is a model name timm knows (``timm.list_models``; a ``.tag`` suffix allowed)."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name.split(".")[0]):
        raise OptinError(f"timm (version {timm.__version__}) has no model architecture {str(name)[:80]!r}; "
                         "see timm.list_models() for the names, or update timm")
    return name


def build_timm(config: dict, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised timm model as a folder's config describes it: ``timm_class`` + ``model_args``
    (optin's format: the class's constructor arguments) or ``architecture`` (+ ``model_args``,
    ``pretrained_cfg``: what ``timm.models.save_for_hf`` writes), built with
    ``timm.create_model(architecture, pretrained=False, **model_args)`` with ``pretrained_cfg`` kept on the
    model (its mean/std/input size give the image transform). On the current device context (meta allowed)."""
    args = config.get("model_args", {})
    if not isinstance(args, dict):
        raise OptinError(f"model_args must be a mapping of keyword arguments, got {type(args).__name__}")
    if num_classes is not None:
        args = {**args, "num_classes": num_classes}
    if "timm_class" in config or "architecture" not in config:
        return timm_class(config.get("timm_class", "VisionTransformer"))(**args)
    import timm

    name = check_timm_architecture(config["architecture"])
    if num_classes is None and isinstance(config.get("num_classes"), int):
        args.setdefault("num_classes", config["num_classes"])
    overlay = config.get("pretrained_cfg")
    kwargs = {"pretrained_cfg_overlay": overlay} if isinstance(overlay, dict) else {}
    return timm.create_model(name, pretrained=False, **kwargs, **args)


def load_timm_folder(path: str | Path) -> nn.Module:
    """Rebuild the timm model of a folder and load its weights (strict); returned in eval mode.

    Two folder formats: optin's own (``config.json`` with ``timm_class`` + ``model_args``) and timm's
    ``save_for_hf`` (``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``); weights in
    ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (``torch.load(weights_only=True)``). The
    architecture is built on the meta device first and compared with the weights, so a config that does not
    belong to its weights fails in one line before anything is allocated."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise OptinError(f"{path} is not a timm model folder: config.json is missing")
    weights = folder_weights(path)
    shapes, state = _shapes(weights)
    try:
        config = json.loads(config_file.read_text())
        if not isinstance(config, dict):
            raise OptinError(f"{config_file} does not hold a JSON object")
        for key in ("depth", "depths"):  # no more blocks than the weights file has tensors
            n = (config.get("model_args") or {}).get(key)
            n = sum(n) if isinstance(n, (list, tuple)) and all(isinstance(v, int) for v in n) else n
            if isinstance(n, int) and n > len(shapes):
                raise OptinError(f"{config_file} declares {key} {n} but {weights.name} holds {len(shapes)} tensors; "
                                 "the config does not belong to these weights")
        with torch.device("meta"):  # shapes first, without memory: a wrong config fails before allocating
            differ = shape_differences(build_timm(config), shapes)
        if differ:
            raise OptinError(f"{weights} does not match the model in {config_file}: {differ}; the weights belong to "
                             "another config (re-save the folder with the config the weights were trained with)")
        model = build_timm(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise OptinError(f"cannot rebuild the model from {config_file}: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    try:
        model.load_state_dict(state if state is not None else read_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise OptinError(f"{weights} does not match the model in {config_file}: {' '.join(str(exc).split())[:300]}") \
            from None
    return model.eval()


def head_classes(state: dict[str, torch.Tensor], classifier: str) -> int | None:
    """The number of classes of a state dict's classifier ``classifier`` (timm's ``pretrained_cfg``
    "classifier", e.g. "head" or "head.fc"): the rows of its weight; None when it has none."""
    weight = state.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def load_timm_checkpoint(name: str, checkpoint: str | Path) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` with the weights of ``checkpoint`` (a state dict in
    safetensors, or a ``.pth``/``.bin``/``.pt`` read with ``weights_only=True``); ``num_classes`` is read from
    the checkpoint's classifier when it differs from the architecture's default."""
    import timm

    check_timm_architecture(name)
    state = read_state_dict(checkpoint)
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False)
    head = probe.get_classifier() if hasattr(probe, "get_classifier") else None
    classifier = next((n for n, m in probe.named_modules() if m is head and n), None)
    kwargs = {}
    if classifier is not None and f"{classifier}.weight" in probe.state_dict():
        n = head_classes(state, classifier)
        if n is None:
            kwargs = {"num_classes": 0}  # a headless checkpoint (features only)
        elif n != probe.num_classes:
            kwargs = {"num_classes": n}
    with torch.device("meta"):
        differ = shape_differences(timm.create_model(name, pretrained=False, **kwargs),
                                   {k: tuple(v.shape) for k, v in state.items()}, ours=f"timm {name}")
    if differ:
        raise OptinError(f"{checkpoint} does not fit timm model {name!r}: {differ}; the checkpoint was trained with "
                         f"other model arguments (img_size, depth, ...): save it with timm.models.save_for_hf(model, "
                         "DIR) and pass --model DIR, or pass the architecture it was made with")
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_timm(source: str, num_labels: int | None = None, checkpoint: str | Path | None = None
              ) -> tuple[nn.Module, dict]:
    """A timm model and its processor config from ``timm:NAME`` (hub weights, or ``checkpoint``'s) or a timm
    model folder (optin's format or timm's ``save_for_hf``).

    With ``num_labels`` a classifier of another size is replaced by a fresh one (fine-tuning)."""
    if source.startswith("timm:"):
        import timm

        name = source[5:]
        if checkpoint is not None:
            model = load_timm_checkpoint(name, checkpoint)
        else:
            try:
                model = timm.create_model(name, pretrained=True)
            except Exception as exc:
                raise OptinError(f"cannot load timm model {name!r} with pretrained weights ({one_line(exc, 160)}); "
                                 "offline, pass your weights: --model timm:NAME --checkpoint FILE, or a folder "
                                 "written by timm.models.save_for_hf") from None
        if num_labels and num_labels != model.num_classes:
            model.reset_classifier(num_labels)
        cfg = model.pretrained_cfg or {}
        return model.eval(), {"timm_name": name, "num_classes": model.num_classes, "mean": cfg.get("mean"),
                              "std": cfg.get("std")}
    if checkpoint is not None:
        raise OptinError(f"--checkpoint is for --model timm:NAME (an architecture without weights); {source!r} is a "
                         "model folder with its own weights")
    model = load_timm_folder(source)
    if num_labels and num_labels != model.num_classes:
        model.reset_classifier(num_labels)
    config = json.loads((Path(source) / "config.json").read_text())
    if "timm_class" not in config and "architecture" in config:  # timm's save_for_hf: rebuildable as such
        config = {k: config[k] for k in ("architecture", "model_args", "pretrained_cfg") if k in config}
        config["num_classes"] = model.num_classes
    return model.eval(), config


@lru_cache(maxsize=64)
def _meta_model(spec: str) -> nn.Module | None:
    """The timm model a source describes (``spec``: its config as JSON), built on the meta device; None when
    it cannot be built."""
    try:
        with torch.device("meta"):
            return build_timm(json.loads(spec))
    except Exception:  # noqa: BLE001 - claims are cheap looks; loading reports the real error
        return None


def timm_source_model(source: str) -> nn.Module | None | bool:
    """For ``claims``: the (meta-device) model a timm source describes; False when ``source`` is no timm
    source at all (not ``timm:NAME``, no folder config naming ``timm_class`` or a timm ``architecture``),
    None when it is one but cannot be built (the adapter that claims it reports why when loading)."""
    if source.startswith("timm:"):
        spec = {"architecture": source[5:]}
    else:
        data = config_json(source)
        if data is None or "model_type" in data or not ("timm_class" in data or "architecture" in data):
            return False
        spec = {k: data[k] for k in ("timm_class", "architecture", "model_args", "num_classes") if k in data}
    return _meta_model(json.dumps(spec, sort_keys=True, default=str))


def claims_timm(source: str, handles: Callable[[nn.Module], bool], family: str) -> bool:
    """Whether a timm adapter claims ``source``: the model the source describes is built on the meta device
    (cheap, cached) and shown to the adapter's ``handles``. A timm source that cannot be built is claimed by
    the adapter whose ``family`` ("vit" or "swin") its name suggests, so that loading it names the error."""
    model = timm_source_model(source)
    if model is False:
        return False
    if model is None:
        data = {} if source.startswith("timm:") else config_json(source) or {}
        name = f"{source} {data.get('timm_class', '')} {data.get('architecture', '')}".lower()
        return ("swin" in name) == (family == "swin")
    return handles(model)


class TimmImageClassifier:
    """Loading, batching, logits and the saved timm config shared by the adapters of timm image classifiers
    (``processor`` is the timm config: ``timm_class`` + ``model_args``, or ``timm_name``)."""

    @classmethod
    def load(cls, source: str, num_labels: int | None = None, checkpoint: str | None = None):
        return cls(*load_timm(source, num_labels, checkpoint))

    def image_transform(self):  # noqa: D102 (see Adapter.image_transform): timm's own eval transform
        from .image_io import timm_transform

        if getattr(self, "_image_transform", None) is None:
            self._image_transform = timm_transform(self.model, self.timm_config())
        return self._image_transform

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
    if "architecture" in cfg and "timm_class" not in cfg:  # timm's save_for_hf config
        check_timm_architecture(cfg["architecture"])
        for key in ("depth", "depths"):
            value = (cfg.get("model_args") or {}).get(key) if isinstance(cfg.get("model_args"), dict) else None
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and all(isinstance(v, int) for v in values):
                check_layer_count(sum(values), f"model_args.{key}")
        with rebuild_device():
            return build_timm(cfg).eval()
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
