"""Unit tests of the example scorer, on a tiny random BERT (no downloads, a few seconds on a CPU)."""
from __future__ import annotations

import pytest
import torch
import transformers

import optin
from optin.contracts import ScoreContext
from optin.testing import check_scorer
from optin_plugins.adapters.bert import BertAdapter
from optin_taylor import TaylorScorer


@pytest.fixture()
def adapter_and_batch():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config).double().eval()
    batch = {"input_ids": torch.randint(5, 30, (16, 7)), "attention_mask": torch.ones(16, 7, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,))}
    return BertAdapter(model), batch


def test_conforms_and_scores_are_absolute_values(adapter_and_batch):
    adapter, batch = adapter_and_batch
    # optin's conformance kit: one finite score per unit, the model (and requires_grad) left as it was,
    # a known scale, JSON-able describe(), the same scores for the same seed
    scores = check_scorer(TaylorScorer(micro_batch=4), adapter, [batch])
    assert set(scores) == set(adapter.unit_counts())
    assert all(float(t.min()) >= 0 for v in scores.values() for t in v)


def test_matches_a_finite_difference(adapter_and_batch):
    """With one micro-batch, the score of head j is |dL/dm_j|: compare with (L(1) - L(1 - eps e_j)) / eps."""
    adapter, batch = adapter_and_batch
    scores = TaylorScorer(micro_batch=16).score(adapter, [batch], ScoreContext())
    eps = 1e-5
    with torch.no_grad():
        base = adapter.loss(batch)
        for j in range(4):
            mask = torch.ones(4, dtype=torch.float64)
            mask[j] -= eps
            with adapter.masked({"heads": [mask, None]}):  # None: leave layer 1 unmasked
                moved = adapter.loss(batch)
            assert float(scores["heads"][0][j]) == pytest.approx(abs(float(base - moved)) / eps, rel=1e-3)


def test_usable_through_the_api_without_installing(adapter_and_batch):
    adapter, batch = adapter_and_batch
    optin.register("scorer", "taylor-dev", TaylorScorer)  # this process only
    scores = optin.score(adapter, [batch], scorer="taylor-dev", options={"micro_batch": 8})
    assert scores.scorer == "taylor-dev" and scores.options == {"micro_batch": 8}
