"""Adapter for HF transformers ViT/DeiT image classifiers (ViTForImageClassification, DeiTForImageClassification...).

Units: attention heads (masked at the input of ``attention.o_proj``) and MLP neurons (at the input of
``mlp.fc2``). The trajectory restarts the model's own forward at a block from cached inputs (neurons at the
block's MLP, replaying the cached attention output), as the BERT adapter does. Token reduction is offered
by the timm adapter (``vit``); this one prunes heads and neurons.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from optin.contracts import Batch, Trace, UnitSite
from optin.errors import OptinError
from optin.hooking import removing
from optin.units import CostModel, UnitTensors

from .bert import _Replay
from .common import HFImageClassifier, HookedAdapter, config_json, cut_to_plan, hf_model_from_plan, hf_plan
from .heads import prune_blocks, slice_hf_heads, slice_mlp_neurons

HF_VISION = {"vit", "deit"}


def _layers_of(model: nn.Module) -> nn.ModuleList | None:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    first = layers[0]
    attn, mlp = getattr(first, "attention", None), getattr(first, "mlp", None)
    ok = all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(mlp, "fc2") \
        and hasattr(getattr(base, "embeddings", None), "patch_embeddings")
    return layers if ok else None


class HFVitAdapter(HFImageClassifier, HookedAdapter):
    """HF transformers ViT/DeiT image classifiers: attention heads and MLP neurons."""

    name = "hf-vit"
    sources = "HF folders, config.json model_type vit or deit"
    unit_kinds = ("heads", "neurons")

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        if _layers_of(model) is None:
            raise OptinError(f"{type(model).__name__} does not have the HF ViT layout (layers[i].attention.q_proj)")
        self.base = getattr(model, "base_model", model)
        self.layers = list(self.base.layers)
        self.head_dim = int(self.layers[0].attention.head_dim)
        emb = self.base.embeddings
        self.protected = 1 + int(getattr(emb, "distillation_token", None) is not None)
        self.n_tokens = int(emb.patch_embeddings.num_patches) + self.protected
        self.dim = int(model.config.hidden_size)
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in self.unit_counts().items()}

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _layers_of(model) is not None and hasattr(model, "config")

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

    def cost_model(self, seq_len: float | None = None) -> CostModel:
        n, D, d = float(self.n_tokens), float(self.dim), float(self.head_dim)
        proj = self.base.embeddings.patch_embeddings.projection
        fixed = (self.n_tokens - self.protected) * proj.out_channels * proj.in_channels * \
            proj.kernel_size[0] * proj.kernel_size[1]
        fixed += sum(m.in_features * m.out_features for name, m in self.model.named_modules()
                     if isinstance(m, nn.Linear) and "classifier" in name)
        layers = len(self.layers)
        return CostModel(per_unit={"heads": [4 * n * D * d + 2 * n * n * d] * layers, "neurons": [2 * n * D] * layers},
                         counts=self.unit_counts(), fixed=float(fixed), notes={"tokens": n})

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
        pixels = batch["pixel_values"].repeat(reps, 1, 1, 1)
        start = trace.state["starts"][layer].repeat(reps, 1, 1)
        block = self.layers[layer]
        saved = block.attention
        full = self.base.layers
        with self.restart_hooks(kind, layer, masks, len(self.layers), select) as collected, \
                removing([self.base.embeddings.register_forward_hook(lambda m, a, o: start)]):
            try:
                if kind == "neurons":
                    block.attention = _Replay(trace.state["attention"][layer].repeat(reps, 1, 1))
                self.base.layers = nn.ModuleList(self.layers[layer:])
                logits = self.logits({"pixel_values": pixels})
            finally:
                self.base.layers = full
                block.attention = saved
        return dict(collected), logits

    def prune(self, masks: UnitTensors) -> None:
        prune_blocks(self.layers, masks, self.kept_index, slice_hf_heads, slice_mlp_neurons)

    def plan(self) -> dict:
        return hf_plan(self)

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "HFVitAdapter":
        from .image_io import hf_image_processor

        return cut_to_plan(cls(hf_model_from_plan(plan), hf_image_processor(directory)), plan)
