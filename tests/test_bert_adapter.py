"""The BERT adapter: units, masking (single and batched), physical removal, partial forwards, MACs."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import HEADS, HIDDEN, INTERMEDIATE, LAYERS, make_batch, make_tiny_bert
from optin.measure import params
from optin_plugins.adapters.bert import BertAdapter
from tiny_models import counted_encoder_macs

D = HIDDEN // HEADS


def logits_of(adapter, batch):
    with torch.no_grad():
        return adapter.logits(batch)


def ones(adapter):
    return {k: [torch.ones(n) for n in ns] for k, ns in adapter.unit_counts().items()}


def random_masks(adapter, seed=0, p_keep=0.6):
    g = torch.Generator().manual_seed(seed)
    return {k: [(torch.rand(n, generator=g) < p_keep).float() for n in ns]
            for k, ns in adapter.unit_counts().items()}


# --- discovery ----------------------------------------------------------------------------------

def test_handles_bert_and_not_others(tiny_bert):
    assert BertAdapter.handles(tiny_bert)
    assert BertAdapter.handles(tiny_bert.bert)  # a bare encoder too
    assert not BertAdapter.handles(torch.nn.Linear(3, 3))


def test_unit_counts(adapter):
    assert adapter.unit_counts() == {"heads": [HEADS] * LAYERS, "neurons": [INTERMEDIATE] * LAYERS}
    assert adapter.head_dim == D and adapter.hidden == HIDDEN


def test_unit_weights_shapes(adapter):
    w = adapter.unit_weights()
    assert [t.shape for t in w["heads"]] == [(HEADS, 4 * D * HIDDEN)] * LAYERS
    assert [t.shape for t in w["neurons"]] == [(INTERMEDIATE, 2 * HIDDEN)] * LAYERS
    # head 1 of layer 0 owns rows 1*D..2*D of Q
    q = adapter.layers[0].attention.self.query.weight
    assert torch.equal(w["heads"][0][1, : D * HIDDEN], q[D:2 * D].reshape(-1))


# --- masking ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (2, 3)])
def test_masking_a_head_equals_zeroing_its_output_columns(tiny_bert, batch, layer, head):
    ad = BertAdapter(tiny_bert)
    masks = ones(ad)
    masks["heads"][layer][head] = 0.0
    with ad.masked(masks):
        got = logits_of(ad, batch)

    manual = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        manual.bert.encoder.layer[layer].attention.output.dense.weight[:, head * D:(head + 1) * D] = 0.0
        expected = manual(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, logits_of(ad, batch), atol=1e-4)  # the head mattered


def test_masking_a_neuron_equals_zeroing_its_output_column(tiny_bert, batch):
    ad = BertAdapter(tiny_bert)
    masks = ones(ad)
    masks["neurons"][1][[3, 17, 40]] = 0.0
    with ad.masked(masks):
        got = logits_of(ad, batch)
    manual = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        manual.bert.encoder.layer[1].output.dense.weight[:, [3, 17, 40]] = 0.0
        expected = manual(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_all_ones_masks_leave_logits_unchanged(adapter, batch):
    before = logits_of(adapter, batch)
    with adapter.masked(ones(adapter)):
        during = logits_of(adapter, batch)
    assert torch.equal(before, during)


def test_masked_context_removes_its_hooks(adapter, batch):
    before = logits_of(adapter, batch)
    masks = random_masks(adapter)
    with adapter.masked(masks):
        assert not torch.allclose(logits_of(adapter, batch), before)
    assert torch.equal(logits_of(adapter, batch), before)
    with pytest.raises(RuntimeError):
        with adapter.masked(masks):
            raise RuntimeError("boom")
    assert torch.equal(logits_of(adapter, batch), before)


def test_batched_masks_equal_separate_forwards(adapter, batch):
    R = 3
    rows = [random_masks(adapter, seed=s) for s in range(R)]
    stacked = {k: [torch.stack([rows[r][k][l] for r in range(R)]) for l in range(LAYERS)] for k in rows[0]}
    replicated = {k: v.repeat(R, *([1] * (v.dim() - 1))) for k, v in batch.items()}
    with adapter.masked(stacked):
        got = logits_of(adapter, replicated).reshape(R, batch["input_ids"].shape[0], -1)
    for r in range(R):
        with adapter.masked(rows[r]):
            expected = logits_of(adapter, batch)
        assert torch.allclose(got[r], expected, atol=1e-5), r
    assert not torch.allclose(got[0], got[1], atol=1e-4)


# --- physical removal ---------------------------------------------------------------------------

def test_prune_equals_masked_and_has_fewer_parameters(tiny_bert, batch):
    ad = BertAdapter(tiny_bert)
    masks = random_masks(ad, seed=3)
    with ad.masked(masks):
        expected = logits_of(ad, batch)
    before = params(tiny_bert)
    ad.prune(masks)
    assert torch.allclose(logits_of(ad, batch), expected, atol=1e-4)
    assert params(tiny_bert) < before
    kept = {k: [int(m.sum()) for m in v] for k, v in masks.items()}
    assert ad.unit_counts() == kept
    assert ad.kept_index["heads"] == [torch.nonzero(m).flatten().tolist() for m in masks["heads"]]
    # exactly the removed rows/columns are gone
    removed = sum((HEADS - kept["heads"][l]) * (4 * D * HIDDEN + 3 * D) for l in range(LAYERS)) + \
        sum((INTERMEDIATE - kept["neurons"][l]) * (2 * HIDDEN + 1) for l in range(LAYERS))
    assert before - params(tiny_bert) == removed


def test_prune_all_heads_of_one_layer_and_all_neurons_of_another(tiny_bert, batch):
    ad = BertAdapter(tiny_bert)
    masks = random_masks(ad, seed=5)
    masks["heads"][1] = torch.zeros(HEADS)
    masks["neurons"][2] = torch.zeros(INTERMEDIATE)
    masks["neurons"][0] = torch.zeros(INTERMEDIATE)
    masks["heads"][0] = torch.ones(HEADS)
    with ad.masked(masks):
        expected = logits_of(ad, batch)
    ad.prune(masks)
    assert ad.unit_counts()["heads"][1] == 0
    assert ad.unit_counts()["neurons"][2] == 0 and ad.unit_counts()["neurons"][0] == 0
    got = logits_of(ad, batch)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4)
    # masks over the pruned model (including zero-sized layers) still work
    with ad.masked(ones(ad)):
        assert torch.allclose(logits_of(ad, batch), got, atol=1e-6)


def test_prune_twice_composes(tiny_bert, batch):
    ad = BertAdapter(tiny_bert)
    first = random_masks(ad, seed=7, p_keep=0.8)
    ad.prune(first)
    second = random_masks(ad, seed=8, p_keep=0.8)
    with ad.masked(second):
        expected = logits_of(ad, batch)
    ad.prune(second)
    assert torch.allclose(logits_of(ad, batch), expected, atol=1e-4)
    for kind in ("heads", "neurons"):
        for l in range(LAYERS):
            orig = torch.nonzero(first[kind][l]).flatten().tolist()
            want = [orig[i] for i in torch.nonzero(second[kind][l]).flatten().tolist()]
            assert ad.kept_index[kind][l] == want


# --- partial forwards (trajectory support) ------------------------------------------------------

def _full_masked_forward(adapter, batch, kind, layer, mask_rows):
    """Reference: R full forwards with a single mask each, capturing FFN output dense outputs."""
    embs, logits = [], []
    for row in mask_rows:
        masks = {kind: [row if l == layer else None for l in range(LAYERS)]}
        captured = {}
        handles = [adapter.layers[z].output.dense.register_forward_hook(
            lambda m, a, o, z=z: captured.__setitem__(z, o.detach())) for z in range(LAYERS)]
        try:
            with adapter.masked(masks):
                logits.append(logits_of(adapter, batch))
        finally:
            for h in handles:
                h.remove()
        embs.append(captured)
    return embs, logits


def test_trace_captures_unmasked_embeddings_and_logits(adapter, batch):
    tr = adapter.trace(batch)
    assert len(tr.embeddings) == LAYERS
    assert tr.embeddings[0].shape == (4, 10, HIDDEN)
    assert torch.equal(tr.valid, batch["attention_mask"].bool())
    assert torch.allclose(tr.logits, logits_of(adapter, batch), atol=1e-6)


def test_chunks_are_length_sorted_and_trimmed(adapter, batch):
    adapter.chunk_size = 2
    chunks = adapter._chunks(batch)
    lengths = batch["attention_mask"].sum(1)
    assert sorted(torch.cat([idx for idx, _ in chunks]).tolist()) == list(range(4))
    for idx, inputs in chunks:
        assert inputs["input_ids"].shape[1] == int(lengths[idx].max())


@pytest.mark.parametrize("chunk_size", [0, 2])
@pytest.mark.parametrize("kind", ["heads", "neurons"])
@pytest.mark.parametrize("layer", list(range(LAYERS)))
def test_run_from_reproduces_full_masked_forward(adapter, batch, kind, layer, chunk_size):
    """Restarting at a block, batching masks and (chunk_size=2) length-sorted chunks change no value
    at any non-padding position."""
    adapter.chunk_size = chunk_size
    valid = batch["attention_mask"].bool()
    n = adapter.unit_counts()[kind][layer]
    g = torch.Generator().manual_seed(10 * layer + len(kind))
    rows = (torch.rand(3, n, generator=g) < 0.5).float()
    rows[0] = 1.0  # one row is the unmasked model
    rows[1, 0] = 0.0
    tr = adapter.trace(batch)
    emb, logits = adapter.run_from(tr, kind, layer, rows, batch)
    assert set(emb) == set(range(layer, LAYERS))
    B = batch["input_ids"].shape[0]
    ref_emb, ref_logits = _full_masked_forward(adapter, batch, kind, layer, rows)
    logits = logits.reshape(3, B, -1)
    for r in range(3):
        assert torch.allclose(logits[r], ref_logits[r], atol=1e-5)
        for z in range(layer, LAYERS):
            got = emb[z].reshape(3, B, *emb[z].shape[1:])[r]
            assert torch.allclose(got[valid], ref_emb[r][z][valid], atol=1e-5), (r, z)
    # the all-ones row reproduces the trace
    assert torch.allclose(logits[0], tr.logits, atol=1e-5)
    # and the model is left intact afterwards
    assert len(adapter.encoder.layer) == LAYERS
    assert torch.allclose(logits_of(adapter, batch), tr.logits, atol=1e-6)


# --- analytic MACs vs FlopCounterMode -----------------------------------------------------------

@pytest.mark.parametrize("seq_len", [1, 9, 16])
def test_cost_model_matches_flop_counter(tiny_bert, seq_len):
    assert tiny_bert.config._attn_implementation == "eager"
    ad = BertAdapter(tiny_bert)
    costs = ad.cost_model(seq_len)
    assert costs.counts == ad.unit_counts()
    assert costs.macs() == pytest.approx(counted_encoder_macs(tiny_bert, seq_len), rel=1e-9)
    L, H = seq_len, HIDDEN
    assert costs.per_unit["heads"][0] == 4 * L * H * D + 2 * L * L * D
    assert costs.per_unit["neurons"][0] == 2 * L * H


def test_cost_model_matches_flop_counter_after_pruning(tiny_bert, batch):
    ad = BertAdapter(tiny_bert)
    masks = random_masks(ad, seed=11)
    masks["heads"][2] = torch.zeros(HEADS)  # a layer without heads
    masks["neurons"][1] = torch.zeros(INTERMEDIATE)  # and one without neurons
    L = 12
    expected = ad.cost_model(L).macs_of_masks(masks)
    ad.prune(masks)
    assert ad.cost_model(L).macs() == pytest.approx(expected, rel=1e-12)
    assert ad.cost_model(L).macs() == pytest.approx(counted_encoder_macs(tiny_bert, L), rel=1e-9)


def test_seq_len_is_mean_unpadded_length(adapter, batch):
    assert adapter.seq_len([batch]) == pytest.approx(batch["attention_mask"].sum(1).float().mean().item())
    other = make_batch(batch_size=2, seq_len=6, seed=4)
    lengths = torch.cat([batch["attention_mask"].sum(1), other["attention_mask"].sum(1)]).float()
    assert adapter.seq_len([batch, other]) == pytest.approx(lengths.mean().item())


def test_collate_with_tokenizer(tiny_tokenizer):
    model = make_tiny_bert(num_labels=2)
    ad = BertAdapter(model, tiny_tokenizer)
    b = ad.collate([{"text": "the movie was great", "label": 1}, {"text": "bad", "label": 0}])
    assert b["labels"].tolist() == [1, 0]
    assert b["attention_mask"].sum(1).tolist() == [6, 3]
    assert logits_of(ad, b).shape == (2, 2)
