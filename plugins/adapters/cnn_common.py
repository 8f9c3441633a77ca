"""Shared base for CNN adapters whose units are conv output channels (VGG, MobileNetV2).

A "layer" is one pruned conv: its output channels are the units of kind ``channels``. Masking a channel
multiplies the feature map carrying it (after the conv's BatchNorm/activation, or at the input of the conv
that consumes it) by the mask, which is exactly what physically removing it does. Removal uses
torch-pruning's dependency graph, so the BatchNorm, depthwise convs and the consumer (next conv, or the
Linear after flatten/pooling) follow. The trajectory (DESIGN.md 3.2, A.10) restarts the forward at a
layer from its cached input; ``Trace.embeddings[z]`` is layer z's feature map (B, C, H, W).

MACs are counted analytically for every Conv2d and Linear at the adapter's input size (no BatchNorm,
activation, pooling or bias terms, as ``FlopCounterMode`` counts them): a conv whose input and output
channels are both units is a ``pair`` of the cost model, one-sided terms are ``per_unit``, the rest ``fixed``.
"""
from __future__ import annotations

import json
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.export import rebuild_device
from optin.units import CostModel, UnitTensors
from optin.hooking import removing

from .common import HookedAdapter, config_json, cut_to_plan, image_collate, kept, track

KIND = "channels"


@dataclass
class ConvLayer:
    """One prunable layer: ``conv``'s output channels are the units.

    ``mask_at`` carries the channels: masks scale its output (``post``) or its input (not ``post``);
    ``embed``'s output is the layer's trajectory embedding; ``start`` is the index in the adapter's
    ``stages()`` where a restarted forward begins (from that stage's cached input).
    """

    conv: nn.Conv2d
    mask_at: nn.Module
    post: bool
    embed: nn.Module
    start: int


@dataclass
class Op:
    """MACs of one Conv2d/Linear: ``factor`` x (input channels x output channels), or x channels for a
    depthwise conv. ``in_unit``/``out_unit`` name the layer whose units are its input/output channels."""

    factor: float
    in_ch: int
    out_ch: int
    in_unit: int | None = None
    out_unit: int | None = None
    depthwise: bool = False


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, forward: Callable[[Batch], Any], batches: list[Batch]) -> bool:
    """Reset the running mean/variance of every BatchNorm and re-estimate them as a plain average over
    ``batches`` (only the BatchNorm layers run in training mode; no gradients, no weight changes).

    Removing channels changes what later layers receive, so their stored statistics no longer match; this
    is the standard retraining-free repair after channel pruning. Returns False when there is no BatchNorm.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not batches:
        return False
    was_training = model.training
    saved = [(m, m.momentum, m.training) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for batch in batches:
            forward(batch)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return True


def as_hw(size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``image_size`` as (H, W)."""
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _two(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out(hw: tuple[int, int], module: nn.Module) -> tuple[int, int]:
    """Spatial size after a Conv2d / pooling / padding module (other modules keep it)."""
    h, w = hw
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _two(module.kernel_size), _two(module.stride), _two(module.padding)
        d = _two(getattr(module, "dilation", 1))
        ceil = bool(getattr(module, "ceil_mode", False))
        out = []
        for n, kk, ss, pp, dd in zip((h, w), k, s, p, d):
            span = n + 2 * pp - dd * (kk - 1) - 1
            o = (-(-span // ss) if ceil else span // ss) + 1
            if ceil and (o - 1) * ss >= n + pp:  # PyTorch: the last window must start inside the input
                o -= 1
            out.append(o)
        return out[0], out[1]
    if isinstance(module, nn.ZeroPad2d):
        left, right, top, bottom = module.padding
        return h + top + bottom, w + left + right
    if isinstance(module, nn.AdaptiveAvgPool2d):
        oh, ow = _two(module.output_size)
        return (h if oh is None else oh), (w if ow is None else ow)
    return hw


def feature_ops(modules: nn.Module, hw: tuple[int, int], roles: dict[int, tuple[int | None, int | None]]
                ) -> tuple[list[Op], tuple[int, int]]:
    """Ops of every Conv2d under ``modules`` (walked in definition order, which must be execution order,
    as in VGG and MobileNetV2 features) and the output spatial size. ``roles[id(conv)]`` = (in_unit, out_unit)."""
    ops: list[Op] = []
    for m in modules.modules():
        if len(list(m.children())):
            continue
        new_hw = conv_out(hw, m)
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            in_u, out_u = roles.get(id(m), (None, None))
            positions = new_hw[0] * new_hw[1]
            if m.groups == 1:
                ops.append(Op(k * positions, m.in_channels, m.out_channels, in_u, out_u))
            elif m.groups == m.in_channels == m.out_channels:
                ops.append(Op(k * positions, m.in_channels, m.out_channels, in_u, out_u, depthwise=True))
            elif in_u is None and out_u is None:
                ops.append(Op(k * positions / m.groups, m.in_channels, m.out_channels))
            else:
                raise OptinError(f"grouped conv {m} cannot hold pruned channels")
        hw = new_hw
    return ops, hw


def cost_from_ops(ops: list[Op], counts: list[int]) -> CostModel:
    """A CostModel for the kind ``channels`` from per-op MACs (checked against the current counts)."""
    per_unit = [0.0] * len(counts)
    pairs: list[tuple[str, int, str, int, float]] = []
    fixed = 0.0
    for op in ops:
        for unit, ch in ((op.in_unit, op.in_ch), (op.out_unit, op.out_ch)):
            if unit is not None and counts[unit] != ch:
                raise RuntimeError(f"cost model out of sync: layer {unit} has {counts[unit]} channels, op sees {ch}")
        if op.depthwise:
            unit = op.out_unit if op.out_unit is not None else op.in_unit
            if unit is None:
                fixed += op.factor * op.out_ch
            else:
                per_unit[unit] += op.factor
        elif op.in_unit is not None and op.out_unit is not None:
            pairs.append((KIND, op.in_unit, KIND, op.out_unit, float(op.factor)))
        elif op.in_unit is not None:
            per_unit[op.in_unit] += op.factor * op.out_ch
        elif op.out_unit is not None:
            per_unit[op.out_unit] += op.factor * op.in_ch
        else:
            fixed += op.factor * op.in_ch * op.out_ch
    return CostModel(per_unit={KIND: per_unit}, counts={KIND: list(counts)}, fixed=float(fixed), pairs=pairs)


class ConvChannelAdapter(HookedAdapter):
    """Base for CNNs pruned by conv output channels. Subclasses say where the layers are (``_find_layers``),
    how the forward runs (``stages`` then ``head``), the MACs (``_ops``) and how to rebuild (``spec``/``from_spec``)."""

    unit_kinds = (KIND,)
    trajectory_distance = "feature-mse"
    output = "classes"
    search_defaults = {"normalize": "mean"}  # conv scores differ by orders of magnitude from layer to layer
    default_image_size: tuple[int, int] = (224, 224)

    def __init__(self, model: nn.Module, processor: Any = None, image_size: int | tuple[int, int] | None = None
                 ) -> None:
        super().__init__(model, processor)
        if not self.handles(model):
            raise OptinError(f"adapter {self.name!r} does not handle {type(model).__name__}")
        self.image_size = as_hw(image_size)  # given explicitly, or set by the first batch seen
        self.layers: list[ConvLayer] = self._find_layers()
        self.base_spec = self.spec()  # the architecture as given (before any pruning by this adapter)
        self.kept_index = {KIND: [list(range(n)) for n in self.unit_counts()[KIND]]}

    # --- subclass hooks ------------------------------------------------------------------------------
    @abstractmethod
    def _find_layers(self) -> list[ConvLayer]:
        ...

    @abstractmethod
    def stages(self) -> list[nn.Module]:
        """The modules the forward runs in order before ``head``."""

    @abstractmethod
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """From the last stage's output to the logits."""

    @abstractmethod
    def _ops(self, hw: tuple[int, int]) -> list[Op]:
        """Every Conv2d/Linear of the model at input size ``hw``."""

    @abstractmethod
    def spec(self) -> dict:
        """JSON-able description of the current architecture, enough for ``from_spec``."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: dict) -> nn.Module:
        """A randomly initialised model of the described architecture."""

    # --- data ----------------------------------------------------------------------------------------
    def _see(self, batch: Batch) -> torch.Tensor:
        if "pixel_values" not in batch:
            raise OptinError(f"adapter {self.name!r} needs image batches with 'pixel_values' (an image task)")
        x = batch["pixel_values"]
        if self.image_size is None:
            self.image_size = (int(x.shape[-2]), int(x.shape[-1]))
        return x

    def hw(self) -> tuple[int, int]:
        """Input size used by the cost model: ``image_size``, else the first batch seen, else the default."""
        return self.image_size or self._default_hw()

    def _default_hw(self) -> tuple[int, int]:
        return tuple(self.default_image_size)

    def collate(self, examples: list[dict]) -> Batch:
        return image_collate(examples)

    def image_transform(self):  # noqa: D102 (see Adapter.image_transform): the folder's image_size, mean, std
        from .image_io import resize_normalize

        stats = self.processor if isinstance(self.processor, dict) else {}
        return resize_normalize(self.hw(), stats.get("mean"), stats.get("std"), self.image_channels())

    def image_channels(self) -> int:
        """The channels an input image has: those of the model's first convolution (its stem; the first
        convolution with units can come later, as in MobileNetV2)."""
        return int(next(m for m in self.model.modules() if isinstance(m, nn.Conv2d)).in_channels)

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(self._see(batch))

    def seq_len(self, batches: list[Batch]) -> float:
        if batches:
            self._see(batches[0])
        return 1.0

    def recalibrate(self, batches: list[Batch]) -> bool:
        """Re-estimate every BatchNorm's running statistics on ``batches`` (see ``recalibrate_batchnorm``)."""
        return recalibrate_batchnorm(self.model, lambda b: self.logits(b), batches)

    # --- units ---------------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        return {KIND: [int(l.conv.out_channels) for l in self.layers]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        l = self.layers[layer]
        return UnitSite(l.mask_at, 1, dim=1, output=l.post)

    def cost_model(self, seq_len: float | None = None) -> CostModel:
        costs = cost_from_ops(self._ops(self.hw()), self.unit_counts()[KIND])
        costs.min_keep[KIND] = 1  # a conv cannot lose all its output channels
        costs.notes["image_size"] = float(self.hw()[0])
        return costs

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        """Per channel, its conv filter (flattened)."""
        return {KIND: [l.conv.weight.detach().reshape(l.conv.out_channels, -1) for l in self.layers]}

    # --- trajectory ----------------------------------------------------------------------------------
    def embedding_module(self, z: int) -> nn.Module:
        return self.layers[z].embed

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        inputs: dict[int, torch.Tensor] = {}
        emb: dict[int, torch.Tensor] = {}
        stages = self.stages()
        handles = []
        for i, l in enumerate(self.layers):
            handles.append(stages[l.start].register_forward_pre_hook(
                lambda m, a, i=i: inputs.__setitem__(i, a[0])))
            handles.append(l.embed.register_forward_hook(lambda m, a, o, i=i: emb.__setitem__(i, o)))
        with removing(handles):
            logits = self.logits(batch)
        n = len(self.layers)
        return Trace(embeddings=[emb[i] for i in range(n)], logits=logits, valid=None,
                     state={"inputs": [inputs[i] for i in range(n)]})

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        reps = masks.shape[0] if masks.dim() == 2 else 1
        x = trace.state["inputs"][layer]
        x = x.repeat(reps, *([1] * (x.dim() - 1)))
        with self.restart_hooks(kind, layer, masks, len(self.layers), select) as collected:
            for stage in self.stages()[self.layers[layer].start:]:
                x = stage(x)
            logits = self.head(x)
        return dict(collected), logits

    # --- removal and persistence ---------------------------------------------------------------------
    def prune(self, masks: UnitTensors) -> None:
        """Remove every channel whose mask is 0, with torch-pruning's dependency graph (BatchNorm, depthwise
        convs and the consuming conv/Linear follow)."""
        import torch_pruning as tp

        for kind in masks:
            self.check_kind(kind)
        per_layer = masks.get(KIND)
        if per_layer is None:
            return
        counts = self.unit_counts()[KIND]
        if len(per_layer) != len(self.layers) or any(int(m.numel()) != n for m, n in zip(per_layer, counts)):
            raise OptinError(f"masks of shape {[int(m.numel()) for m in per_layer]} do not fit the model's "
                             f"channels {counts}")
        keeps = [kept(m).tolist() for m in per_layer]
        for i, k in enumerate(keeps):
            if not k:
                raise OptinError(f"the masks remove every channel of layer {i}; keep at least one per layer "
                                 "(the ptf searcher does)")
        if all(len(k) == n for k, n in zip(keeps, counts)):
            return
        was_training = self.model.training
        self.model.eval()  # building the graph runs a forward: do not touch BatchNorm statistics
        try:
            h, w = self.hw()
            example = torch.zeros(1, self.image_channels(), h, w,
                                  device=next(self.model.parameters()).device)
            with torch.enable_grad():  # the graph is traced through autograd
                graph = tp.DependencyGraph().build_dependency(self.model, example_inputs=example)
            for i, (layer, k) in enumerate(zip(self.layers, keeps)):
                drop = sorted(set(range(counts[i])) - set(k))
                if drop:
                    graph.get_pruning_group(layer.conv, tp.prune_conv_out_channels, idxs=drop).prune()
                track(self.kept_index, KIND, i, k)
        finally:
            self.model.train(was_training)

    def plan(self) -> dict:
        stats = {k: self.processor.get(k) for k in ("mean", "std")} if isinstance(self.processor, dict) else {}
        return {"spec": self.base_spec, "unit_counts": self.unit_counts(), "kept_index": self.kept_index,
                "image_size": list(self.hw()), **{k: v for k, v in stats.items() if v is not None}}

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "ConvChannelAdapter":
        try:
            with rebuild_device():  # the meta device during load_pruned's checking pass
                model = cls.from_spec(plan["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OptinError(f"cannot rebuild the {cls.name} model from its plan: {type(exc).__name__}: {exc}") from exc
        stats = {k: plan.get(k) for k in ("mean", "std")}  # the image statistics, for image_transform
        return cut_to_plan(cls(model.eval(), stats, image_size=plan.get("image_size")), plan)


# --- model folders (config.json + model.safetensors) --------------------------------------------------
CONFIG_TYPE = "optin-cnn"  # config.json "model_type" of the CNN folders this project writes (no HF/timm adapter claims it)


def folder_config(source: str) -> dict:
    """``source/config.json`` when it is a CNN folder written by this project, else {}."""
    data = config_json(source) or {}
    return data if data.get("model_type") == CONFIG_TYPE else {}


def save_cnn_folder(model: nn.Module, path: str | Path, config: dict) -> Path:
    """Write ``config.json`` (``model_type: optin-cnn`` + ``config``) and ``model.safetensors``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": CONFIG_TYPE, **config}, indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


def load_weights(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load ``folder/model.safetensors`` into ``model`` (strict); eval mode."""
    from safetensors.torch import load_file

    weights = Path(folder) / "model.safetensors"
    if not weights.is_file():
        raise OptinError(f"{folder} has no model.safetensors")
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise OptinError(f"{weights} does not match the architecture in {Path(folder) / 'config.json'}: {exc}") from exc
    return model.eval()
