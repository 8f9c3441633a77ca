"""Adapter for HF DeBERTa-v2/v3 encoders (DebertaV2Model, DebertaV2ForSequenceClassification).

DeBERTa-v2's layer is BERT's post-norm layer; its disentangled self-attention projects the content with
``query_proj``/``key_proj``/``value_proj`` and the shared relative-position embeddings with ``pos_key_proj``/
``pos_query_proj`` (or, with ``share_att_key``, with the content projections), all with rows per head, and
adds the content-to-position and position-to-content scores head by head. Every score and value of a head
comes from that head's rows, so removing a head slices those rows (and the output projection's columns), and
the head dimension, which scales the scores, is unchanged: heads and FFN neurons are removed physically.

The optional convolution after the first layer (``conv_kernel_size``, DeBERTa-v2-xlarge) mixes the first
layer's output with the embeddings: a restart at a later layer skips it (its effect is in the cached inputs)
and a restart at the first layer applies it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from optin.contracts import Batch
from optin.units import CostModel

from .bert import BertAdapter, EncoderLayout

DEBERTA_V2_LAYOUT = EncoderLayout(projections=("query_proj", "key_proj", "value_proj", "pos_key_proj",
                                               "pos_query_proj"))


class DebertaV2Adapter(BertAdapter):
    """HF DeBERTa-v2/v3 encoders (disentangled attention): attention heads and FFN neurons."""

    name = "deberta-v2"
    sources = "HF folders/hub ids, config.json model_type deberta-v2 (DeBERTa-v2 and v3)"
    model_types = frozenset({"deberta-v2"})
    layout = DEBERTA_V2_LAYOUT
    layout_name = "DeBERTa-v2 layout (encoder.layer[i].attention.self.query_proj)"

    def _relative(self) -> tuple[int, int, int]:
        """(2 x the attention span of the relative positions, how many projections of them, how many position
        score terms: c2p and/or p2c). With ``share_att_key`` both content projections project them."""
        att = next((a for a in (l.attention.self for l in self.layers) if hasattr(a, "pos_att_type")), None)
        if att is None or not getattr(att, "relative_attention", False):
            return 0, 0, 0
        terms = sum(t in att.pos_att_type for t in ("c2p", "p2c"))
        span = min(2 * int(att.pos_ebd_size), int(self.encoder.rel_embeddings.num_embeddings))
        return span, (2 if att.share_att_key else terms), terms

    def cost_model(self, seq_len: float) -> CostModel:
        """BERT's per-unit MACs plus, per head, the projections of the ``2k`` relative-position embeddings and
        their scores against the L queries (c2p) and keys (p2c); the convolution after the first layer, if
        any, is fixed."""
        costs = super().cost_model(seq_len)
        L, H, d = float(seq_len), float(self.hidden), float(self.head_dim)
        span, projections, terms = self._relative()
        extra = projections * span * H * d + terms * L * span * d
        conv = getattr(self.encoder, "conv", None)
        fixed = 0.0
        if conv is not None:
            c = conv.conv
            fixed = L * c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0]
        return CostModel(per_unit={"heads": [c + extra for c in costs.per_unit["heads"]],
                                   "neurons": costs.per_unit["neurons"]},
                         counts=costs.counts, fixed=fixed, notes=costs.notes)

    def _logits_from(self, inputs: Batch, start: int, hidden: torch.Tensor, chunk: dict) -> torch.Tensor:
        conv = getattr(self.encoder, "conv", None)
        if conv is not None and start == 1:  # the convolution follows the first layer: apply it to the restart
            reps = hidden.shape[0] // chunk["starts"][0].shape[0]
            embeddings = chunk["starts"][0].repeat(reps, 1, 1)
            hidden = conv(embeddings, hidden, chunk["inputs"]["attention_mask"].repeat(reps, 1))
        layers = self.layers
        try:
            self.encoder.conv = None  # already applied (or in the cached inputs of later layers)
            if start == len(layers):  # DeBERTa's encoder needs a layer to run: one that passes its input on
                self.layers = [*layers, _Pass()]
            return super()._logits_from(inputs, start, hidden, chunk)
        finally:
            self.encoder.conv = conv
            self.layers = layers


class _Pass(nn.Module):
    """A DeBERTa-v2 layer that returns its input (a restart after the last layer)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states, None

