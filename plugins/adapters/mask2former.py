"""Adapter for HF transformers Mask2Former semantic segmentation with a Swin backbone
(``Mask2FormerForUniversalSegmentation`` whose ``model.pixel_level_module.encoder`` is a ``SwinBackbone``).

Units (DESIGN.md 3.1): the FFN hidden neurons of every Swin backbone block (``mlp.fc1`` -> ``mlp.fc2``),
masked at the input of ``mlp.fc2``; with ``decoder_neurons=True`` also the FFN neurons of the transformer
decoder layers (``transformer_module.decoder.layers[i].fc1/fc2``, kind "decoder_neurons"). Both kinds share
one layer index space, the order of the forward: backbone blocks 0..n_b-1, then decoder layers
n_b..n_b+n_d-1 (a kind has 0 units at the other kind's positions), so that the trajectory scorer's "later
blocks" are the later positions in the forward.

Output: the semantic segmentation map as per-pixel class log-probabilities (B, C, H, W) at the input
resolution, combined from the query class scores and query masks as HF's
``Mask2FormerImageProcessor.post_process_semantic_segmentation`` does.

Trajectory: the embeddings are every backbone block's ``mlp.fc2`` output (B, N, D; N and D change by
stage) and, with decoder neurons, every decoder layer's ``fc2`` output (B, Q, D). ``run_from`` restarts
exactly at the masked block from cached inputs: earlier stages replay their cached outputs, earlier blocks
of the same stage are skipped, the masked block starts from its cached input; the pixel decoder and the
transformer decoder then run on the R replicas. A decoder layer restarts after the cached pixel module.

MACs: analytic per-unit MACs (2*N*D per backbone neuron, N tokens of dim D at ``image_size``; 2*Q*D per
decoder neuron) plus ``fixed`` = FlopCounterMode/2 (eager attention, one image at ``image_size``) minus the
units' MACs, so that the total equals FlopCounterMode/2. The backbone's analytic window-attention count
(``optin_plugins.adapters.swin_blocks``) is reported in the cost model's notes.
"""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.units import CostModel, UnitTensors
from optin.hooking import removing
from optin.safety import NO_REMOTE_CODE

from .common import HookedAdapter, config_json, cut_to_plan, hf_model_from_plan, hf_plan, kept, slice_mlp, track
from .swin_blocks import SwinBlockInfo, hf_block_macs, hf_merging_macs, hf_swin_blocks, neuron_weights

EPS = 1e-8  # floor of the per-pixel class probabilities before the log
IGNORE = 255


def _backbone_of(model: nn.Module) -> nn.Module | None:
    """The Swin backbone of a Mask2Former model, or None for anything else."""
    try:
        encoder = model.model.pixel_level_module.encoder
        decoder_layers = model.model.transformer_module.decoder.layers
    except AttributeError:
        return None
    if type(encoder).__name__ != "SwinBackbone" or not hasattr(model, "class_predictor"):
        return None
    if not len(decoder_layers) or not hasattr(decoder_layers[0], "fc2"):
        return None
    return encoder


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise OptinError(f"image_size must be an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise OptinError(f"image_size must be positive, got {(h, w)}")
    return h, w


def _replicate(value: Any, reps: int) -> Any:
    """Stack ``reps`` copies of every tensor (along dim 0) in a tensor / tuple / list / ModelOutput."""
    if torch.is_tensor(value):
        return value.repeat(reps, *([1] * (value.dim() - 1)))
    if isinstance(value, (tuple, list)):
        return type(value)(_replicate(v, reps) for v in value)
    if value is not None and hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return type(value)(**{k: _replicate(value[k], reps) for k in value.keys()})
    return value


@contextmanager
def _forward_replaced(module: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Within the context ``module(...)`` returns ``fn(...)`` (hooks still fire): replays of cached outputs."""
    module.forward = fn
    try:
        yield
    finally:
        del module.forward


class Mask2FormerAdapter(HookedAdapter):
    """HF Mask2Former (Swin backbone) semantic segmentation: backbone FFN neurons (+ decoder FFN neurons)."""

    name = "mask2former"
    sources = "HF folders, config.json model_type mask2former with a swin backbone"
    unit_kinds = ("neurons", "decoder_neurons")
    output = "segmentation"
    trajectory_distance = "manifold"

    def __init__(self, model: nn.Module, processor: Any = None, image_size: Any = None,
                 decoder_neurons: bool = False) -> None:
        super().__init__(model, processor)
        backbone = _backbone_of(model)
        if backbone is None:
            raise OptinError(f"{type(model).__name__} is not an HF Mask2FormerForUniversalSegmentation with a Swin "
                             "backbone (model.model.pixel_level_module.encoder must be a SwinBackbone)")
        self.backbone = backbone
        self.swin = backbone.swin
        cfg = backbone.config
        self.image_size = _pair(image_size if image_size is not None else cfg.image_size)
        self.patch = _pair(cfg.patch_size)
        self.grid = (-(-self.image_size[0] // self.patch[0]), -(-self.image_size[1] // self.patch[1]))
        self.in_channels = int(cfg.num_channels)
        self.infos: list[SwinBlockInfo] = hf_swin_blocks(self.swin.encoder, self.grid, always_partition=True)
        self.stage_first = {}  # stage -> global index of its first block
        for i, info in enumerate(self.infos):
            self.stage_first.setdefault(info.stage, i)
        self.dec_layers = list(model.model.transformer_module.decoder.layers)
        self.num_queries = int(model.config.num_queries)
        self.decoder_neurons = bool(decoder_neurons)
        self.n_b = len(self.infos)
        self.n_d = len(self.dec_layers) if self.decoder_neurons else 0
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}
        self._measured: float | None = None  # FlopCounterMode MACs of one image, measured once

    # --- discovery ----------------------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _backbone_of(model) is not None and hasattr(model, "config")

    @classmethod
    def claims(cls, source: str) -> bool:
        data = config_json(source) or {}
        backbone = (data.get("backbone_config") or {}).get("model_type", "swin")
        return data.get("model_type") == "mask2former" and backbone == "swin"

    @classmethod
    def load(cls, source: str, num_labels: int | None = None) -> "Mask2FormerAdapter":
        from transformers import Mask2FormerForUniversalSegmentation

        kw = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
        try:
            model = Mask2FormerForUniversalSegmentation.from_pretrained(source, **kw, **NO_REMOTE_CODE).eval()
        except (OSError, ValueError) as exc:
            raise OptinError(f"cannot load a Mask2Former model from {source!r}: {exc}") from exc
        from .image_io import hf_image_processor

        return cls(model, hf_image_processor(source), image_size=cls._folder_image_size(source))

    @staticmethod
    def _folder_image_size(source: str) -> tuple[int, int] | None:
        """The input size a folder's ``preprocessor_config.json`` resizes to (None: the backbone's)."""
        f = Path(source) / "preprocessor_config.json"
        try:
            size = json.loads(f.read_text()).get("size") if f.is_file() else None
        except (OSError, ValueError):
            return None
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if isinstance(size, dict) and "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
        return None

    # --- data ---------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> Batch:
        """``{"image": (C, H, W), "mask": (H, W) long}`` examples -> ``pixel_values`` (+ ``masks``)."""
        if not examples or "image" not in examples[0]:
            raise OptinError("adapter mask2former needs image examples ({'image': (C, H, W)}); this task has "
                             f"fields {sorted(examples[0]) if examples else 'none'}")
        if "label" in examples[0] and "mask" not in examples[0]:
            raise OptinError("adapter mask2former predicts segmentation maps but the task's examples carry a class "
                             "label and no 'mask': use a segmentation task (e.g. fmnist-mosaic) or a classifier")
        batch: Batch = {"pixel_values": torch.stack([e["image"] for e in examples]).float()}
        if "mask" in examples[0]:
            batch["masks"] = torch.stack([torch.as_tensor(e["mask"]) for e in examples]).long()
        return batch

    def _pixels(self, batch: Batch) -> torch.Tensor:
        x = batch.get("pixel_values") if isinstance(batch, dict) else None
        if x is None or x.dim() != 4:
            raise OptinError("mask2former batches need 'pixel_values' (B, C, H, W); build them with adapter.collate")
        if x.shape[1] != self.in_channels:
            raise OptinError(f"the model takes {self.in_channels}-channel images but the batch has {x.shape[1]} "
                             "channels: use a task with matching images")
        return x

    def segmentation(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                     size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel class log-probabilities (B, C, H, W) from query class logits (B, Q, C+1) and query mask
        logits (B, Q, h, w), as ``post_process_semantic_segmentation`` combines them, normalised over C."""
        masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
        classes = class_logits.softmax(dim=-1)[..., :-1]  # drop the null class
        seg = torch.einsum("bqc,bqhw->bchw", classes, masks)
        seg = seg / seg.sum(dim=1, keepdim=True).clamp_min(EPS)
        return seg.clamp_min(EPS).log()

    def logits(self, batch: Batch) -> torch.Tensor:
        x = self._pixels(batch)
        out = self.model(pixel_values=x)
        return self.segmentation(out.class_queries_logits, out.masks_queries_logits, tuple(x.shape[-2:]))

    def loss(self, batch: Batch) -> torch.Tensor:
        """HF's own Mask2Former loss (Hungarian matching, class + mask + dice, auxiliary layers) against the
        batch's label maps: one binary mask per class present (255 = ignored, in no mask)."""
        x = self._pixels(batch)
        if "masks" not in batch:
            raise OptinError("the mask2former loss needs labelled label maps ('masks'); this task has none")
        mask_labels, class_labels = self.targets(batch["masks"])
        return self.model(pixel_values=x, mask_labels=mask_labels, class_labels=class_labels).loss

    @staticmethod
    def targets(masks: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Label maps (B, H, W) -> HF's ``mask_labels`` (per image (K, H, W) float) and ``class_labels`` (K,)."""
        mask_labels, class_labels = [], []
        for m in masks:
            classes = torch.unique(m[m != IGNORE])
            mask_labels.append((m.unsqueeze(0) == classes.view(-1, 1, 1)).float())
            class_labels.append(classes.long())
        return mask_labels, class_labels

    def seq_len(self, batches: list[Batch]) -> float:
        return float(self.grid[0] * self.grid[1])

    # --- units --------------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        counts = {"neurons": [int(i.block.mlp.fc1.out_features) for i in self.infos] + [0] * self.n_d}
        if self.decoder_neurons:
            counts["decoder_neurons"] = [0] * self.n_b + [int(l.fc1.out_features) for l in self.dec_layers]
        return counts

    def _kinds(self) -> tuple[str, ...]:
        return ("neurons", "decoder_neurons") if self.decoder_neurons else ("neurons",)

    def check_kind(self, kind: str) -> None:
        if kind == "decoder_neurons" and not self.decoder_neurons:
            raise OptinError("adapter mask2former has no unit kind 'decoder_neurons' (construct the adapter with "
                             "decoder_neurons=True); kinds: neurons")
        super().check_kind(kind)

    def _site(self, kind: str, layer: int) -> UnitSite | None:
        """The FFN hidden neurons of ``layer`` (global index): a backbone block's ``mlp.fc2`` input, or a
        decoder layer's ``fc2`` input (sequence-first (Q, B, h)); None where the kind has no units."""
        if kind == "neurons" and layer < self.n_b:
            return UnitSite(self.infos[layer].block.mlp.fc2)
        if kind == "decoder_neurons" and self.n_b <= layer < self.n_b + self.n_d:
            return UnitSite(self.dec_layers[layer - self.n_b].fc2, batch_dim=1)
        return None

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        out = {"neurons": [neuron_weights(i.block) for i in self.infos] + [torch.zeros(0, 1)] * self.n_d}
        if self.decoder_neurons:
            out["decoder_neurons"] = [torch.zeros(0, 1)] * self.n_b + [
                torch.cat([l.fc1.weight, l.fc2.weight.t()], 1).detach() for l in self.dec_layers]
        return out

    # --- MACs ---------------------------------------------------------------------------------------
    def backbone_macs(self) -> dict[str, float]:
        """Analytic MACs of the Swin backbone at ``image_size`` (window attention on the padded maps, MLPs,
        patch embedding and mergings; what FlopCounterMode counts with eager attention)."""
        attention = mlp = 0.0
        for info in self.infos:
            head, neuron = hf_block_macs(info)
            attention += head * int(info.block.attention.num_attention_heads)
            mlp += neuron * int(info.block.mlp.fc1.out_features)
        proj = self.swin.embeddings.patch_embeddings.projection
        embed = self.grid[0] * self.grid[1] * proj.out_channels * proj.in_channels * proj.kernel_size[0] * \
            proj.kernel_size[1]
        merging = hf_merging_macs(self.swin.encoder, self.grid)
        return {"attention": attention, "mlp": mlp, "patch_embedding": float(embed), "merging": merging,
                "total": attention + mlp + embed + merging}

    def _per_unit(self) -> dict[str, list[float]]:
        per = {"neurons": [hf_block_macs(i)[1] for i in self.infos] + [0.0] * self.n_d}
        if self.decoder_neurons:
            per["decoder_neurons"] = [0.0] * self.n_b + [
                2.0 * self.num_queries * l.fc2.out_features for l in self.dec_layers]
        return per

    @torch.no_grad()
    def measured_macs(self) -> float:
        """FlopCounterMode/2 of ``logits`` on one image at ``image_size`` with eager attention (measured once;
        unit removal only changes the units' analytic part)."""
        from torch.utils.flop_counter import FlopCounterMode

        cfg = self.backbone.config
        saved = cfg._attn_implementation
        was_training = self.model.training
        self.model.eval()
        try:
            cfg._attn_implementation = "eager"  # CPU SDPA is a fused kernel FlopCounterMode does not count
            param = next(self.model.parameters())
            x = torch.zeros(1, self.in_channels, *self.image_size, device=param.device, dtype=param.dtype)
            with FlopCounterMode(display=False) as fc:
                self.logits({"pixel_values": x})
        finally:
            cfg._attn_implementation = saved
            self.model.train(was_training)
        return fc.get_total_flops() / 2

    def cost_model(self, seq_len: float | None = None) -> CostModel:
        per_unit, counts = self._per_unit(), self.unit_counts()
        units = sum(c * n for k in per_unit for c, n in zip(per_unit[k], counts[k]))
        if self._measured is None:
            self._measured = self.measured_macs() - units  # the part no unit accounts for
        bb = self.backbone_macs()
        notes = {"tokens": float(self.grid[0] * self.grid[1]), "backbone_macs": bb["total"],
                 "backbone_attention_macs": bb["attention"], "backbone_mlp_macs": bb["mlp"],
                 "image_height": float(self.image_size[0]), "image_width": float(self.image_size[1])}
        return CostModel(per_unit=per_unit, counts=counts, fixed=float(self._measured), notes=notes)

    # --- trajectory ---------------------------------------------------------------------------------
    def embedding_module(self, z: int) -> nn.Module:
        return self.infos[z].block.mlp.fc2 if z < self.n_b else self.dec_layers[z - self.n_b].fc2

    def embedding_of(self, z: int, output: torch.Tensor) -> torch.Tensor:
        return output if z < self.n_b else output.transpose(0, 1)  # decoder: (Q, B, D) -> (B, Q, D)

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        emb: dict[int, torch.Tensor] = {}
        block_in: dict[int, torch.Tensor] = {}
        stage_out: dict[int, tuple] = {}
        cache: dict[str, Any] = {}
        handles = [self.embedding_module(z).register_forward_hook(
            lambda m, a, o, z=z: emb.__setitem__(z, self.embedding_of(z, o))) for z in range(self.n_b + self.n_d)]
        for i, info in enumerate(self.infos):
            handles.append(info.block.register_forward_pre_hook(
                lambda m, a, k, i=i: block_in.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True))
        for s, stage in enumerate(self.swin.encoder.layers):
            handles.append(stage.register_forward_hook(lambda m, a, o, s=s: stage_out.__setitem__(s, o)))
        handles.append(self.swin.embeddings.register_forward_hook(lambda m, a, o: cache.__setitem__("embed", o)))
        handles.append(self.model.model.pixel_level_module.register_forward_hook(
            lambda m, a, o: cache.__setitem__("pixel", o)))
        with removing(handles):
            logits = self.logits(batch)
        n = self.n_b + self.n_d
        return Trace(embeddings=[emb[z] for z in range(n)], logits=logits, valid=None,
                     state={"block_in": [block_in[i] for i in range(self.n_b)],
                            "stage_out": [stage_out[s] for s in range(len(stage_out))],
                            "embed": cache["embed"], "pixel": cache["pixel"]})

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        reps = int(masks.shape[0])
        st = trace.state
        pixels = self._pixels(batch)
        pixels = pixels.repeat(reps, 1, 1, 1)
        with ExitStack() as stack:
            collected = stack.enter_context(self.restart_hooks(kind, layer, masks, self.n_b + self.n_d, select))
            if kind == "neurons":
                info = self.infos[layer]
                embed = _replicate(st["embed"], reps)
                stack.enter_context(_forward_replaced(self.swin.embeddings, lambda *a, **k: embed))
                for s in range(info.stage):  # earlier stages: their cached outputs
                    out = _replicate(st["stage_out"][s], reps)
                    stack.enter_context(_forward_replaced(self.swin.encoder.layers[s], lambda *a, o=out, **k: o))
                for j in range(self.stage_first[info.stage], layer):  # earlier blocks of the stage: skipped
                    stack.enter_context(_forward_replaced(self.infos[j].block, lambda h, *a, **k: (h, None)))
                start = _replicate(st["block_in"][layer], reps)
                h = info.block.register_forward_pre_hook(lambda m, a: (start, *a[1:]))
                stack.callback(h.remove)
            else:  # a decoder layer: the pixel module (backbone + pixel decoder) is unchanged
                pixel = _replicate(st["pixel"], reps)
                stack.enter_context(_forward_replaced(self.model.model.pixel_level_module,
                                                      lambda *a, **k: pixel))
            logits = self.logits({"pixel_values": pixels})
        return dict(collected), logits

    # --- physical removal and persistence -----------------------------------------------------------
    @torch.no_grad()
    def prune(self, masks: UnitTensors) -> None:
        for kind in masks:
            self.check_kind(kind)
        for i, info in enumerate(self.infos):
            if "neurons" in masks and masks["neurons"][i] is not None:
                keep = kept(masks["neurons"][i])
                info.block.mlp.fc1, info.block.mlp.fc2 = slice_mlp(info.block.mlp.fc1, info.block.mlp.fc2, keep)
                track(self.kept_index, "neurons", i, keep.tolist())
        for k, l in enumerate(self.dec_layers[:self.n_d]):
            if "decoder_neurons" in masks and masks["decoder_neurons"][self.n_b + k] is not None:
                keep = kept(masks["decoder_neurons"][self.n_b + k])
                l.fc1, l.fc2 = slice_mlp(l.fc1, l.fc2, keep)
                track(self.kept_index, "decoder_neurons", self.n_b + k, keep.tolist())

    def plan(self) -> dict:
        return {**hf_plan(self), "image_size": list(self.image_size), "decoder_neurons": self.decoder_neurons}

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "Mask2FormerAdapter":
        from .image_io import hf_image_processor

        adapter = cls(hf_model_from_plan(plan), hf_image_processor(directory), image_size=plan.get("image_size"),
                      decoder_neurons=bool(plan.get("decoder_neurons", False)))
        return cut_to_plan(adapter, plan)

    def image_transform(self):  # noqa: D102 (see Adapter.image_transform): a plain resize (masks follow it)
        from .image_io import hf_transform

        if getattr(self, "_image_transform", None) is None:
            self._image_transform = hf_transform(self.processor, self.backbone.config, self.in_channels,
                                                 image_size=self.image_size, name=f"adapter {self.name}",
                                                 resize_only=True)
        return self._image_transform

    def save_extras(self, directory: str) -> None:
        if hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(directory)
