"""Adapter for HF BERT-family encoders (BertModel, BertForSequenceClassification, MiniLM, RoBERTa, XLM-RoBERTa,
ELECTRA layout), and the post-norm encoder machinery other encoder layouts reuse (``EncoderLayout``: DistilBERT,
DeBERTa-v2 in their own adapters).

Units: attention heads and FFN hidden neurons per layer. transformers 5 has no ``head_mask`` nor
``prune_heads``: heads are masked by scaling the per-head context vectors going into the attention
output projection, neurons by scaling the FFN activations going into the FFN output projection,
both with forward pre-hooks; physical removal slices the Linear layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from optin.contracts import Batch, RowSelect, Trace, UnitSite
from optin.errors import OptinError
from optin.hooking import removing
from optin.masking import masked_delta
from optin.safety import NO_REMOTE_CODE
from optin.surgery import head_rows, slice_linear
from optin.units import CostModel, UnitTensors

from .common import HookedAdapter, config_json, cut_to_plan, hf_model_from_plan, hf_plan, plain_hf_model, slice_mlp
from .heads import prune_blocks

BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}

# Encoders optin recognises but cannot prune, with the reason and what to do instead (one line each).
REFUSED = {
    "albert": "ALBERT shares one set of layer weights across all its layers, so removing a head or neuron in one "
              "layer removes it in every layer, which optin's per-layer pruning cannot express; prune an encoder "
              "with its own weights per layer (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2)",
}


@dataclass(frozen=True)
class EncoderLayout:
    """Where the parts of one post-norm encoder layer live, as dotted attribute paths from the layer (the
    layers are ``<encoder>.layer``, ``encoder`` a path from the base model). A layer computes
    ``a = attention_norm(attention_out(heads(x)) + x)`` and ``ffn_norm(ffn_out(activation(ffn_in(a))) + a)``."""

    encoder: str = "encoder"
    self_attention: str = "attention.self"  # holds the per-head projections and ``attention_head_size``
    projections: tuple[str, ...] = ("query", "key", "value")  # Linear layers with rows per head (those present)
    attention_out: str = "attention.output.dense"  # input columns per head: the heads' unit site
    attention_norm: str = "attention.output.LayerNorm"
    ffn_in: str = "intermediate.dense"
    activation: str = "intermediate.intermediate_act_fn"
    ffn_out: str = "output.dense"  # input columns per neuron: the neurons' unit site
    ffn_norm: str = "output.LayerNorm"
    inputs: tuple[str, ...] | None = None  # the batch keys the model takes (None: every key but labels)
    # The config keys stating the heads and FFN neurons per layer, and the features per head (None: the
    # config derives them as hidden size / heads), for a plain Hugging Face export.
    config_heads: str = "num_attention_heads"
    config_neurons: str = "intermediate_size"
    config_head_size: str | None = None


BERT_LAYOUT = EncoderLayout()


def part(module: nn.Module, path: str) -> Any:
    """``module``'s attribute at a dotted ``path`` (None where any step is missing)."""
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def set_part(module: nn.Module, path: str, value: nn.Module) -> None:
    """Replace ``module``'s attribute at a dotted ``path``."""
    *head, last = path.split(".")
    for name in head:
        module = getattr(module, name)
    setattr(module, last, value)


class _NoHeads(nn.Module):
    """Stands in for a self-attention whose heads were all removed: contributes nothing (B, T, 0), or, when the
    attention owns its output projection (``proj``, kept under the attribute ``proj_name``), that
    projection's bias."""

    def __init__(self, head_dim: int, proj_name: str | None = None, proj: nn.Module | None = None) -> None:
        super().__init__()
        self.num_attention_heads = 0
        self.attention_head_size = head_dim
        self.all_head_size = 0
        self.proj_name = proj_name
        if proj_name:
            setattr(self, proj_name, proj)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return (getattr(self, self.proj_name)(out) if self.proj_name else out), None


class _Replay(nn.Module):
    """Returns a cached attention output, so a forward can restart at a block's FFN."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return self.value, None


@torch.no_grad()
def _slice_heads(block: nn.Module, keep: list[int], layout: EncoderLayout = BERT_LAYOUT) -> None:
    """Keep only heads ``keep`` of an encoder layer (rows of the per-head projections, output-projection
    columns), in place; with none left the self-attention becomes ``_NoHeads``."""
    att = part(block, layout.self_attention)
    d = int(att.attention_head_size)
    rows = head_rows(keep, d)
    out = slice_linear(part(block, layout.attention_out), in_idx=rows)
    inside = layout.attention_out.startswith(layout.self_attention + ".")  # the attention owns its projection
    if keep:
        for p in layout.projections:
            if isinstance(getattr(att, p, None), nn.Linear):
                setattr(att, p, slice_linear(getattr(att, p), out_idx=rows))
        for count in ("num_attention_heads", "n_heads"):
            if hasattr(att, count):
                setattr(att, count, len(keep))
        att.all_head_size = len(keep) * d
    elif not isinstance(att, _NoHeads):
        name = layout.attention_out[len(layout.self_attention) + 1:] if inside else None
        set_part(block, layout.self_attention, _NoHeads(d, name, out if inside else None))
    set_part(block, layout.attention_out, out)


@torch.no_grad()
def _slice_neurons(block: nn.Module, keep: list[int], layout: EncoderLayout = BERT_LAYOUT) -> None:
    """Keep only FFN hidden neurons ``keep`` of an encoder layer (FFN input rows, output columns)."""
    fc_in, fc_out = slice_mlp(part(block, layout.ffn_in), part(block, layout.ffn_out),
                              torch.as_tensor(keep, dtype=torch.long))
    set_part(block, layout.ffn_in, fc_in)
    set_part(block, layout.ffn_out, fc_out)


def _encoder_of(model: nn.Module, layout: EncoderLayout = BERT_LAYOUT) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    enc = part(base, layout.encoder)
    layers = getattr(enc, "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    first = layers[0]
    att = part(first, layout.self_attention)
    ok = all(isinstance(part(first, p), nn.Linear) for p in (layout.attention_out, layout.ffn_in, layout.ffn_out)) \
        and isinstance(getattr(att, layout.projections[0], None), nn.Linear) and hasattr(att, "attention_head_size") \
        and part(first, layout.attention_norm) is not None and part(first, layout.ffn_norm) is not None \
        and hasattr(getattr(base, "embeddings", None), "word_embeddings")
    return enc if ok else None


class BertAdapter(HookedAdapter):
    """HF BERT-family encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA): attention heads and FFN neurons."""

    name = "bert"
    sources = "HF folders/hub ids, config.json model_type bert, roberta, xlm-roberta, camembert or electra"
    unit_kinds = ("heads", "neurons")
    max_length = 128
    # What a subclass for another encoder layout changes: the config model types it claims, where the parts
    # of a layer are, and how that layout is named in error messages.
    model_types: frozenset[str] = frozenset(BERT_LIKE)
    layout: EncoderLayout = BERT_LAYOUT
    layout_name = "BERT layout (encoder.layer[i].attention.self.query)"

    def __init__(self, model: nn.Module, processor: Any = None) -> None:
        super().__init__(model, processor)
        enc = _encoder_of(model, self.layout)
        if enc is None:
            raise OptinError(f"{type(model).__name__} does not have the {self.layout_name}")
        self.encoder = enc
        self.base = getattr(model, "base_model", model)
        self.layers = list(enc.layer)
        self.head_dim = int(part(self.layers[0], self.layout.self_attention).attention_head_size)
        self.hidden = int(self._part(0, "attention_out").out_features)
        counts = self.unit_counts()
        self.kept_index = {k: [list(range(n)) for n in ns] for k, ns in counts.items()}

    def _part(self, layer: int, name: str) -> nn.Module:
        """The part ``name`` (a field of ``EncoderLayout``) of layer ``layer``."""
        return part(self.layers[layer], getattr(self.layout, name))

    # --- discovery -------------------------------------------------------------------------------
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return _encoder_of(model, cls.layout) is not None and hasattr(model, "config")

    @classmethod
    def _model_type(cls, source: str) -> str | None:
        cfg = config_json(source)
        if cfg is None and Path(source).exists():
            return None
        if cfg is None:  # a hub id: ask the hub (fails fast offline)
            try:
                from transformers import AutoConfig
                cfg = AutoConfig.from_pretrained(source, **NO_REMOTE_CODE).to_dict()
            except Exception:
                return None
        return cfg.get("model_type")

    @classmethod
    def claims(cls, source: str) -> bool:
        kind = cls._model_type(source)
        return kind in cls.model_types or (cls is BertAdapter and kind in REFUSED)

    @classmethod
    def load(cls, source: str, num_labels: int | None = None) -> "BertAdapter":
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # keep load reports and weight-loading bars off the user's screen
        hf_logging.disable_progress_bar()

        config = AutoConfig.from_pretrained(source, **NO_REMOTE_CODE)
        if config.model_type in REFUSED:
            raise OptinError(f"model {source!r} is {config.model_type} (config.json model_type): "
                             f"{REFUSED[config.model_type]}")
        archs = config.architectures or []
        if num_labels is not None:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, ignore_mismatched_sizes=True, **NO_REMOTE_CODE)
            return cls(model, AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE))
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise OptinError(f"model {source!r} ({', '.join(archs) or 'no architecture'}) has no trained "
                             "classification head; fine-tune it first: optin finetune --model "
                             f"{source} --task TASK --output DIR")
        model = AutoModelForSequenceClassification.from_pretrained(source, **NO_REMOTE_CODE)
        tokenizer = AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE)
        return cls(model.eval(), tokenizer)

    # --- data ------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> Batch:
        if self.processor is None:
            raise OptinError("this BERT model has no tokenizer: pass processor=AutoTokenizer.from_pretrained(...)")
        texts = [e["text"] for e in examples]
        pairs = [e["text_pair"] for e in examples] if "text_pair" in examples[0] else None
        enc = self.processor(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        batch = dict(enc)
        if "label" in examples[0]:
            batch["labels"] = torch.tensor([int(e["label"]) for e in examples])
        return batch

    def _inputs(self, batch: Batch) -> Batch:
        take = self.layout.inputs
        return {k: v for k, v in batch.items() if k != "labels" and (take is None or k in take)}

    def logits(self, batch: Batch) -> torch.Tensor:
        out = self.model(**self._inputs(batch))
        return out.logits if hasattr(out, "logits") else out.pooler_output

    def seq_len(self, batches: list[Batch]) -> float:
        lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).float()
        return float(lengths.mean())

    # --- units -----------------------------------------------------------------------------------
    def unit_counts(self) -> dict[str, list[int]]:
        n = range(len(self.layers))
        return {"heads": [int(self._part(i, "attention_out").in_features) // self.head_dim for i in n],
                "neurons": [int(self._part(i, "ffn_in").out_features) for i in n]}

    def _site(self, kind: str, layer: int) -> UnitSite:
        if kind == "heads":
            return UnitSite(self._part(layer, "attention_out"), self.head_dim)
        return UnitSite(self._part(layer, "ffn_out"))

    def valid_tokens(self, batch: Batch) -> torch.Tensor | None:
        mask = batch.get("attention_mask")
        return None if mask is None else mask.bool()

    def cost_model(self, seq_len: float) -> CostModel:
        L, H, d = float(seq_len), float(self.hidden), float(self.head_dim)
        counts = self.unit_counts()
        n = len(self.layers)
        return CostModel(per_unit={"heads": [4 * L * H * d + 2 * L * L * d] * n, "neurons": [2 * L * H] * n},
                         counts=counts, fixed=0.0, notes={"seq_len": L})

    def unit_weights(self) -> dict[str, list[torch.Tensor]]:
        heads, neurons = [], []
        d = self.head_dim
        for i in range(len(self.layers)):
            att, out = self._part(i, "self_attention"), self._part(i, "attention_out")
            n = out.in_features // d
            if n:
                qkv = [getattr(att, p).weight.reshape(n, d * self.hidden) for p in self.layout.projections
                       if isinstance(getattr(att, p, None), nn.Linear)]
                o = out.weight.reshape(self.hidden, n, d).permute(1, 0, 2).reshape(n, -1)
                heads.append(torch.cat([*qkv, o], dim=1).detach())
            else:
                heads.append(torch.zeros(0, 4 * d * self.hidden))
            neurons.append(torch.cat([self._part(i, "ffn_in").weight, self._part(i, "ffn_out").weight.t()],
                                     dim=1).detach())
        return {"heads": heads, "neurons": neurons}

    # --- trajectory ------------------------------------------------------------------------------
    def embedding_module(self, z: int) -> nn.Module:
        return self._part(z, "ffn_out")

    chunk_size = 8  # examples per length-sorted chunk in trace/run_from (0 = no chunking)

    @staticmethod
    def _length_groups(mask: torch.Tensor, size: int) -> list[tuple[torch.Tensor, int]] | None:
        """Groups of at most ``size`` examples of similar length (index, longest length) for a right-padded
        attention mask; None when it is not right-padded or needs no grouping."""
        lengths = mask.sum(1)
        n = mask.shape[0]
        right_padded = bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all())
        if not size or n <= size or not right_padded:
            return None
        order = torch.argsort(lengths, stable=True)
        return [(order[s:s + size], int(lengths[order[s:s + size]].max())) for s in range(0, n, size)]

    def _chunks(self, batch: Batch) -> list[tuple[torch.Tensor, Batch]]:
        """Split a right-padded batch into chunks of similar length, each trimmed to its own longest
        example: sequences do not interact in an encoder, so this changes no value, only skips padding."""
        inputs = self._inputs(batch)
        groups = self._length_groups(inputs["attention_mask"], self.chunk_size)
        if groups is None:
            return [(torch.arange(inputs["attention_mask"].shape[0]), inputs)]
        return [(idx, self._take(inputs, inputs["attention_mask"], idx, t)) for idx, t in groups]

    @staticmethod
    def _take(batch: Batch, mask: torch.Tensor, idx: torch.Tensor, t: int) -> Batch:
        """Examples ``idx`` of ``batch``, the per-token tensors (shaped like ``mask``) cut to ``t`` positions."""
        n, t_all = mask.shape
        return {k: (v[idx][:, :t] if torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == (n, t_all)
                    else v[idx] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v)
                for k, v in batch.items()}

    def split(self, batch: Batch, size: int) -> list[Batch]:
        """Micro-batches of similar length, each trimmed to its own longest text (no value changes; the
        padding's work is skipped)."""
        mask = batch.get("attention_mask")
        groups = None if mask is None else self._length_groups(mask, size)
        if groups is None:
            return super().split(batch, size)
        return [self._take(batch, mask, idx, t) for idx, t in groups]

    def forward_embeddings(self, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's FFN output in the padded layout of ``trace`` and the logits, with autograd on, run
        chunk by chunk without padding (the same values, less work)."""
        mask = batch["attention_mask"]
        n, t = mask.shape
        parts: list[list[torch.Tensor]] = [[] for _ in self.layers]
        order, logits = [], []
        for idx, inputs in self._chunks(batch):
            emb, lg = super().forward_embeddings(inputs)
            for z, e in enumerate(emb):
                parts[z].append(nn.functional.pad(e, (0, 0, 0, t - e.shape[1])))
            order.append(idx)
            logits.append(lg)
        back = torch.argsort(torch.cat(order).to(mask.device))  # chunk order -> batch order
        return [torch.cat(p)[back] for p in parts], torch.cat(logits)[back]

    @torch.no_grad()
    def _trace_one(self, inputs: Batch) -> dict:
        rec: dict[str, dict[int, torch.Tensor]] = {"inputs": {}, "attention": {}, "emb": {}}
        handles = []
        for i, l in enumerate(self.layers):
            handles.append(l.register_forward_pre_hook(
                lambda m, a, k, i=i: rec["inputs"].__setitem__(i, a[0] if a else k["hidden_states"]),
                with_kwargs=True))
            handles.append(self._part(i, "ffn_in").register_forward_pre_hook(  # the attention's output
                lambda m, a, i=i: rec["attention"].__setitem__(i, a[0])))
            handles.append(self._part(i, "ffn_out").register_forward_hook(
                lambda m, a, o, i=i: rec["emb"].__setitem__(i, o)))
        with removing(handles):
            rec["logits"] = self.logits(inputs)
        return rec

    @torch.no_grad()
    def trace(self, batch: Batch) -> Trace:
        mask = batch["attention_mask"]
        n_layers = len(self.layers)
        chunks = []
        emb = [None] * n_layers
        logits = None
        for idx, inputs in self._chunks(batch):
            rec = self._trace_one(inputs)
            chunks.append({"idx": idx, "inputs": inputs, "starts": rec["inputs"], "attention": rec["attention"]})
            for z in range(n_layers):
                e = rec["emb"][z]
                if emb[z] is None:
                    emb[z] = e.new_zeros(mask.shape[0], mask.shape[1], e.shape[-1])
                emb[z][idx, : e.shape[1]] = e
            if logits is None:
                logits = rec["logits"].new_zeros(mask.shape[0], *rec["logits"].shape[1:])
            logits[idx] = rec["logits"]
        return Trace(embeddings=emb, logits=logits, valid=mask.bool(), state={"chunks": chunks})

    @torch.no_grad()
    def _layer_cache(self, trace: Trace, kind: str, layer: int) -> list[dict]:
        """Per chunk, what restarting ``layer`` with masked ``kind`` units reuses: for heads the context
        vectors entering the attention output projection and its unmasked output, for neurons the FFN
        activations and the unmasked FFN output. Computed once per (kind, layer) and kept until another
        is asked for (the scorer goes layer by layer)."""
        key = (kind, layer)
        cache = trace.state.get("layer_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        block = self.layers[layer]
        parts = []
        for chunk in trace.state["chunks"]:
            if kind == "heads":
                seen: dict[str, torch.Tensor] = {}
                dense = self._part(layer, "attention_out")
                h = dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
                args, kwargs = self._attention_args(chunk)
                with removing([h]):
                    block.attention(chunk["starts"][layer], *args, **kwargs)
                x = seen["x"]
                parts.append({"x": x, "base": dense(x)})
            else:
                a = self._part(layer, "activation")(self._part(layer, "ffn_in")(chunk["attention"][layer]))
                parts.append({"x": a, "base": self._part(layer, "ffn_out")(a)})
        trace.state["layer_cache"] = (key, parts)
        return parts

    def _attention_args(self, chunk: dict) -> tuple[tuple, dict]:
        """The arguments after the hidden states that a layer's ``attention`` call takes for this chunk (the
        attention mask, and relative positions where the layout has them), as the model's own forward builds
        them."""
        cached = chunk.get("attention_args")
        if cached is None:
            seen: dict[str, Any] = {}
            h = self.layers[0].attention.register_forward_pre_hook(
                lambda m, a, k: seen.update(args=tuple(a[1:]), kwargs=dict(k)), with_kwargs=True)
            with removing([h]), torch.no_grad():
                self.logits(chunk["inputs"])
            cached = chunk["attention_args"] = (seen["args"], seen["kwargs"])
        return cached

    def _feed_forward(self, layer: int, attention: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s output from its attention output (the FFN half, eval mode)."""
        ffn = self._part(layer, "ffn_out")(self._part(layer, "activation")(self._part(layer, "ffn_in")(attention)))
        return self._part(layer, "ffn_norm")(ffn + attention)

    @torch.no_grad()
    def _block_output(self, chunk: dict, part: dict, kind: str, layer: int, masks: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``layer``'s output for R masks at once, from the cached quantities: the masked units'
        contribution is subtracted from the unmasked output projection (``masked_delta``); nothing before
        that point is recomputed. Returns (block output (R*b, t, D), FFN output if ``kind`` is neurons)."""
        reps = masks.shape[0]
        x, base = part["x"], part["base"]
        b, t = x.shape[:2]
        if kind == "heads":
            dense = self._part(layer, "attention_out")
            out = base.unsqueeze(0) - masked_delta(x.reshape(b * t, -1), dense.weight, masks, self.head_dim
                                                   ).reshape(reps, b, t, -1)
            start = chunk["starts"][layer].unsqueeze(0)
            attention = self._part(layer, "attention_norm")(out + start).reshape(reps * b, t, -1)
            return self._feed_forward(layer, attention), None
        dense = self._part(layer, "ffn_out")
        ffn = base.unsqueeze(0) - masked_delta(x.reshape(b * t, -1), dense.weight, masks).reshape(reps, b, t, -1)
        attention = chunk["attention"][layer].unsqueeze(0)
        out = self._part(layer, "ffn_norm")(ffn + attention)
        return out.reshape(reps * b, t, -1), ffn.reshape(reps * b, t, -1)

    @torch.no_grad()
    def _run_one(self, chunk: dict, part: dict, kind: str, layer: int, masks: torch.Tensor,
                 keep: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
        """One chunk's restart at ``layer`` for R masks: ``keep(z, embedding_z)`` for z >= layer; the logits."""
        reps = masks.shape[0]
        inputs = {k: v.repeat(reps, *([1] * (v.dim() - 1))) for k, v in chunk["inputs"].items()}
        handles = [self._part(z, "ffn_out").register_forward_hook(lambda m, a, o, z=z: keep(z, o))
                   for z in range(layer, len(self.layers))]
        with removing(handles):
            out, ffn = self._block_output(chunk, part, kind, layer, masks)
            if ffn is not None:
                keep(layer, ffn)
            return self._logits_from(inputs, layer + 1, out, chunk)

    def _logits_from(self, inputs: Batch, start: int, hidden: torch.Tensor, chunk: dict) -> torch.Tensor:
        """The logits of ``inputs`` with the encoder restarted at layer ``start`` on ``hidden`` (the output of
        layer ``start - 1``): the encoder's input is replaced and its earlier layers are left out."""
        def restart(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        full = self.encoder.layer
        with removing([self.encoder.register_forward_pre_hook(restart, with_kwargs=True)]):
            try:
                self.encoder.layer = nn.ModuleList(self.layers[start:])
                return self.logits(inputs)
            finally:
                self.encoder.layer = full

    @torch.no_grad()
    def run_from(self, trace: Trace, kind: str, layer: int, masks: torch.Tensor, batch: Batch,
                 select: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Exact restart at ``layer`` from cached inputs, chunk by chunk (no padding). With a ``RowSelect``
        only the selected token rows are gathered, inside the hooks; otherwise the embeddings are returned
        in the padded layout and passed through ``select``."""
        self.check_kind(kind)
        reps = masks.shape[0]
        n, t = trace.valid.shape
        rows = select.rows_for(n * t).to(masks.device) if isinstance(select, RowSelect) else None
        emb: dict[int, torch.Tensor] = {}
        logits = None
        parts = self._layer_cache(trace, kind, layer)
        for chunk, part in zip(trace.state["chunks"], parts):
            idx = chunk["idx"]
            tc = chunk["inputs"]["attention_mask"].shape[1]
            if rows is not None:  # which sampled rows live in this chunk, and where
                where = torch.full((n,), -1, dtype=torch.long, device=rows.device)
                where[idx.to(rows.device)] = torch.arange(len(idx), device=rows.device)
                ex, pos = rows // t, rows % t
                here = where[ex] >= 0
                local, k_at = where[ex[here]] * tc + pos[here], torch.nonzero(here).flatten()

            def keep(z: int, e: torch.Tensor) -> None:
                e = e.reshape(reps, len(idx), tc, e.shape[-1])
                if rows is not None:
                    if z not in emb:
                        emb[z] = e.new_zeros(reps, rows.numel(), e.shape[-1])
                    emb[z][:, k_at] = e.reshape(reps, len(idx) * tc, -1)[:, local]
                    return
                if z not in emb:
                    emb[z] = e.new_zeros(reps, n, t, e.shape[-1])
                emb[z][:, idx, :tc] = e

            lg = self._run_one(chunk, part, kind, layer, masks, keep)
            if logits is None:
                logits = lg.new_zeros(reps, n, *lg.shape[1:])
            logits[:, idx] = lg.reshape(reps, len(idx), *lg.shape[1:])
        if rows is None:
            emb = {z: select(e.reshape(reps * n, t, e.shape[-1])) for z, e in emb.items()}
        return emb, logits.reshape(reps * n, *logits.shape[2:])

    # --- physical removal ------------------------------------------------------------------------
    def prune(self, masks: UnitTensors) -> None:
        prune_blocks(self.layers, masks, self.kept_index, partial(_slice_heads, layout=self.layout),
                     partial(_slice_neurons, layout=self.layout))

    def plan(self) -> dict:
        return hf_plan(self)

    def hf_model(self) -> nn.Module:  # noqa: D102 (see Adapter.hf_model)
        return plain_hf_model(self, {"heads": self.layout.config_heads, "neurons": self.layout.config_neurons},
                              self.head_dim, self.hidden, self.layout.config_head_size)

    @classmethod
    def rebuild(cls, plan: dict, directory: str) -> "BertAdapter":
        from transformers import AutoTokenizer

        tokenizer = None
        if (Path(directory) / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(directory, **NO_REMOTE_CODE)
        adapter = cls(hf_model_from_plan(plan), tokenizer)
        return cut_to_plan(adapter, plan)

    def save_extras(self, directory: str) -> None:
        if self.processor is not None and hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(directory)
