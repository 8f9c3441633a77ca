"""Adapter for HF DistilBERT encoders (DistilBertModel, DistilBertForSequenceClassification).

DistilBERT is BERT's post-norm layer with its own names: ``transformer.layer[i]`` holds ``attention`` (with
``q_lin``/``k_lin``/``v_lin`` and the output projection ``out_lin`` inside it), ``sa_layer_norm``, ``ffn.lin1``/
``ffn.lin2`` and ``output_layer_norm``. Everything else (masking at the output projections' inputs, exact
restarts for the trajectory, physical removal, the cost model, export) is the BERT adapter's, through an
``EncoderLayout``.
"""
from __future__ import annotations

from .bert import BertAdapter, EncoderLayout

DISTILBERT_LAYOUT = EncoderLayout(
    encoder="transformer", self_attention="attention", projections=("q_lin", "k_lin", "v_lin"),
    attention_out="attention.out_lin", attention_norm="sa_layer_norm", ffn_in="ffn.lin1", activation="ffn.activation",
    ffn_out="ffn.lin2", ffn_norm="output_layer_norm", inputs=("input_ids", "attention_mask"),
    config_heads="n_heads", config_neurons="hidden_dim")


class DistilBertAdapter(BertAdapter):
    """HF DistilBERT encoders: attention heads and FFN neurons."""

    name = "distilbert"
    sources = "HF folders/hub ids, config.json model_type distilbert"
    model_types = frozenset({"distilbert"})
    layout = DISTILBERT_LAYOUT
    layout_name = "DistilBERT layout (transformer.layer[i].attention.q_lin)"
