"""Adapter for HF transformers ViT/DeiT/DINOv2 image classifiers (ViTForImageClassification,
DeiTForImageClassification(WithTeacher), Dinov2ForImageClassification).

Units: attention heads (masked at the input of ``attention.o_proj``) and MLP neurons (at the input of
``mlp.fc2``); tokens, removed between attention and MLP by a token reducer on a per-block schedule, as in
the timm adapter (``vit``), with the same shared machinery (``tokens.ReducibleTokens``). The trajectory
restarts the model's own forward at a block from cached inputs (neurons at the block's MLP, replaying the
cached attention output), as the BERT adapter does. Two block layouts (``VisionLayout``): ViT/DeiT
(``layers[i]``, ``layernorm_before/after``) and DINOv2 (``encoder.layer[i]``, ``norm1/2`` and layer scales).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.hooking import removing
from optin.units import CostModel, UnitTensors

from .bert import _Replay, part, set_part
from .common import (HFImageClassifier, HookedAdapter, config_json, cut_to_plan, hf_model_from_plan, hf_plan,
                     plain_hf_model)
from .heads import HFNoHeads, prune_blocks, slice_hf_heads, slice_mlp_neurons
from .tokens import Halves, ReducibleTokens, attend

HF_VISION = {"vit", "deit", "dinov2"}


@dataclass(frozen=True)
class VisionLayout:
    """Where an HF vision layer's parts are: the layer list (a path from the base model), the norms before
    attention and MLP, and the layer scales after them (None: none)."""

    layers: str = "layers"
    norm_before: str = "layernorm_before"
    norm_after: str = "layernorm_after"
    scale_attention: str | None = None
    scale_mlp: str | None = None


VIT_LAYOUT = VisionLayout()
DINOV2_LAYOUT = VisionLayout(layers="encoder.layer", norm_before="norm1", norm_after="norm2",
                             scale_attention="layer_scale1", scale_mlp="layer_scale2")


def _layout_of(model: nn.Module) -> VisionLayout | None:
    """The layout of an HF vision classifier (None: neither ViT/DeiT's nor DINOv2's with a plain MLP)."""
    base = getattr(model, "base_model", model)
    if not hasattr(getattr(base, "embeddings", None), "patch_embeddings"):
        return None
    for layout in (VIT_LAYOUT, DINOV2_LAYOUT):
        layers = part(base, layout.layers)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            continue
        first = layers[0]
        attn, mlp = getattr(first, "attention", None), getattr(first, "mlp", None)
        if all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear) \
                and all(hasattr(first, n) for n in (layout.norm_before, layout.norm_after)):
            return layout
    return None


def _halves(layout: VisionLayout) -> Halves:
    """An HF vision layer's attention and MLP halves (eval mode: dropout and drop-path are identities)."""

    def attention(blk: nn.Module, x: torch.Tensor, sizes: torch.Tensor | None, need_probs: bool,
                  key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = getattr(blk, layout.norm_before)(x)
        att = blk.attention
        probs = None
        if isinstance(att, HFNoHeads):
            out, metric = att(h)[0], h
        else:
            shape = (*h.shape[:-1], -1, att.head_dim)
            q, k, v = (getattr(att, p)(h).view(shape).transpose(1, 2) for p in ("q_proj", "k_proj", "v_proj"))
            out, probs = attend(q, k, v, getattr(att, "scaling", att.head_dim ** -0.5), sizes, need_probs, key_mask)
            out, metric = att.o_proj(out), k.mean(1)
        if layout.scale_attention:
            out = getattr(blk, layout.scale_attention)(out)
        return x + out, metric, probs

    def mlp(blk: nn.Module, x: torch.Tensor, embedding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = blk.mlp
        f = m.fc2(m.activation_fn(m.fc1(getattr(blk, layout.norm_after)(x))))
        out = getattr(blk, layout.scale_mlp)(f) if layout.scale_mlp else f
        return x + out, (f if embedding else None)

    return Halves(attention, mlp)


class HFVitAdapter(HFImageClassifier, HookedAdapter, ReducibleTokens):
    """HF transformers ViT/DeiT/DINOv2 image classifiers: attention heads, MLP neurons and tokens."""

    name = "hf-vit"
    sources = "HF folders, config.json model_type vit, deit or dinov2"
    unit_kinds = ("heads", "neurons")

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        layout = _layout_of(model)
        if layout is None:
            raise OptinError(f"{type(model).__name__} does not have the HF ViT layout (layers[i].attention.q_proj, "
                             "mlp.fc1/fc2) nor DINOv2's with a plain MLP (SwiGLU MLPs are not supported)")
        self.layout, self.halves = layout, _halves(layout)
        self.base = getattr(model, "base_model", model)
        self.layers = list(part(self.base, layout.layers))
        self.blocks = self.layers  # ReducibleTokens' name for the plain blocks
        self.head_dim = int(self.layers[0].attention.head_dim)
        emb = self.base.embeddings
        self.protected = 1 + int(getattr(emb, "distillation_token", None) is not None)
        self.n_tokens = int(emb.patch_embeddings.num_patches) + self.protected
        self.dim = int(model.config.hidden_size)
        self.removals = [0] * len(self.layers)
        self.reducer_spec: dict | None = None
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _layout_of(model) is not None and hasattr(model, "config")

    def _set_blocks(self, modules: list[nn.Module]) -> None:
        set_part(self.base, self.layout.layers, nn.ModuleList(modules))

    @classmethod
    def claims(cls, source: str) -> bool:
        return (config_json(source) or {}).get("model_type") in HF_VISION

    def seq_len(self, batches: list[Batch]) -> float:
        return float(self.n_tokens)

    def unit_counts(self) -> dict[str, list[int]]:
        return {"heads": [int(l.attention.num_attention_heads) for l in self.layers],
                "neurons": [int(l.mlp.fc1.out_features) for l in self.layers]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        if kind == "heads":
            return UnitSite(self.layers[layer].attention.o_proj, self.head_dim)
        return UnitSite(self.layers[layer].mlp.fc2)

    def embedding_module(self, z: int) -> nn.Module:
        return self.layers[z].mlp.fc2

    def cost_model(self, seq_len: float | None = None, removals: list[int] | None = None) -> CostModel:
        proj = self.base.embeddings.patch_embeddings.projection
        fixed = (self.n_tokens - self.protected) * proj.out_channels * proj.in_channels * \
            proj.kernel_size[0] * proj.kernel_size[1]
        fixed += sum(m.in_features * m.out_features for name, m in self.model.named_modules()
                     if isinstance(m, nn.Linear) and "classifier" in name)
        return CostModel(per_unit=self.token_unit_costs(float(self.dim), float(self.head_dim), removals),
                         counts=self.unit_counts(), fixed=float(fixed), notes={"tokens": float(self.n_tokens)})

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        heads, neurons = [], []
        d, D = self.head_dim, self.dim
        for l in self.layers:
            n = int(l.attention.num_attention_heads)
            if n:
                qkv = [getattr(l.attention, p).weight.reshape(n, d * D) for p in ("q_proj", "k_proj", "v_proj")]
                o = l.attention.o_proj.weight.reshape(D, n, d).permute(1, 0, 2).reshape(n, -1)
                heads.append(torch.cat([*qkv, o], 1).detach())
            else:
                heads.append(torch.zeros(0, 4 * d * D))
            neurons.append(torch.cat([l.mlp.fc1.weight, l.mlp.fc2.weight.t()], 1).detach())
        return {"heads": heads, "neurons": neurons}

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        self._require_plain("trajectory scoring")
        starts, attn_out, emb, handles = {}, {}, {}, []
        for i, l in enumerate(self.layers):
            handles.append(l.register_forward_pre_hook(
                lambda m, a, k, i=i: starts.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True))
            handles.append(l.attention.register_forward_hook(lambda m, a, o, i=i: attn_out.__setitem__(i, o[0])))
            handles.append(l.mlp.fc2.register_forward_hook(lambda m, a, o, i=i: emb.__setitem__(i, o)))
        with removing(handles):
            logits = self.logits(batch)
        n = len(self.layers)
        return Trace(embeddings=[emb[i] for i in range(n)], logits=logits, valid=None,
                     state={"starts": [starts[i] for i in range(n)], "attention": [attn_out[i] for i in range(n)]})

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        reps = masks.shape[0]
        if kind == "tokens":  # token positions removed from this block on, then the model's own head
            collected, x = self.tokens_removed(trace.state["starts"][layer], layer, masks, trace.embeddings, select)
            return collected, self._head(x, batch["pixel_values"].repeat(reps, 1, 1, 1))
        start = trace.state["starts"][layer].repeat(reps, 1, 1)
        block = self.layers[layer]
        saved = block.attention
        with self.restart_hooks(kind, layer, masks, len(self.layers), select) as collected:
            try:
                if kind == "neurons":
                    block.attention = _Replay(trace.state["attention"][layer].repeat(reps, 1, 1))
                logits = self._logits_through(self.layers[layer:], start, batch["pixel_values"].repeat(reps, 1, 1, 1))
            finally:
                block.attention = saved
        return dict(collected), logits

    def _logits_through(self, layers: list[nn.Module], start: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The model's logits with ``layers`` as its layers, entered with ``start`` in place of the embeddings."""
        full = part(self.base, self.layout.layers)
        with removing([self.base.embeddings.register_forward_hook(lambda m, a, o: start)]):
            try:
                set_part(self.base, self.layout.layers, nn.ModuleList(layers))
                return self.logits({"pixel_values": pixels})
            finally:
                set_part(self.base, self.layout.layers, full)

    def _head(self, x: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The logits from the last layer's output ``x`` (final norm and classifier, the model's own)."""
        return self._logits_through([], x, pixels)

    def prune(self, masks: UnitTensors) -> None:
        prune_blocks(self.layers, masks, self.kept_index, slice_hf_heads, slice_mlp_neurons)

    def plan(self) -> dict:
        return {**hf_plan(self), **self.token_plan()}

    def hf_model(self) -> nn.Module:  # noqa: D102 (see Adapter.hf_model)
        if self.reducing():
            raise OptinError(f"{type(self.model).__name__} (adapter {self.name}) runs a token reducer between its "
                             "layers, which a Hugging Face model cannot express; export with --format onnx")
        neurons: Any = "intermediate_size"
        if self.layout is DINOV2_LAYOUT:  # DINOv2 states its MLP width as an integer multiple of the hidden size
            def neurons(config: Any, n: int) -> None:
                if n % self.dim:
                    raise OptinError(f"{type(self.model).__name__} (adapter {self.name}): its config states the MLP "
                                     f"width as an integer mlp_ratio x hidden size ({self.dim}), which cannot be {n} "
                                     "neurons; export with --format onnx")
                config.mlp_ratio = n // self.dim
        return plain_hf_model(self, {"heads": "num_attention_heads", "neurons": neurons}, self.head_dim, self.dim,
                              "head_dim")

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "HFVitAdapter":
        from .image_io import hf_image_processor

        adapter = cut_to_plan(cls(hf_model_from_plan(plan), hf_image_processor(directory)), plan)
        adapter.reinstall(plan)  # the token schedule is part of the architecture
        return adapter
