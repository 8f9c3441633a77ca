"""HF encoder families beyond BERT: DistilBERT and DeBERTa-v2 (their own adapters), ELECTRA and XLM-RoBERTa
(the BERT layout, through ``bert``), ALBERT refused with its reason; each conforms (masked == removed, MACs ==
FlopCounterMode, export + reload, exact restarts) and runs end to end through ``optin run``."""
from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

import optin
from conftest import NEGATIVE, POSITIVE, make_batch, make_tokenizer
from optin.cli import cli
from optin.testing import check_adapter
from tiny_models import ENCODERS, counted_macs_of_encoder, encoder_adapter, make_encoder

ADAPTER_OF = {"distilbert": "distilbert", "deberta-v2": "deberta-v2", "electra": "bert", "xlm-roberta": "bert"}


@pytest.mark.parametrize("family", ENCODERS)
def test_each_family_conforms_with_exact_macs(family):
    ad = encoder_adapter(family)
    batch = make_batch()
    assert optin.models.adapter_for(ad.model).name == ADAPTER_OF[family]
    result = check_adapter(ad, batch, count_macs=lambda a: counted_macs_of_encoder(a, batch), seq_len=10.0)
    assert result["trajectory"]
    assert result["pruned_counts"]["heads"][0] == 0  # a layer without heads, removed physically
    pruned = sum(p.numel() for p in result["pruned"].model.parameters())
    assert pruned < sum(p.numel() for p in ad.model.parameters())


@pytest.mark.parametrize("options", [{"share_att_key": False}, {"conv_kernel_size": 3, "conv_act": "gelu"},
                                     {"relative_attention": False}, {"pos_att_type": ["c2p"], "position_buckets": -1}])
def test_deberta_variants_conform(options):
    """Its own position projections, the v2-xlarge convolution after the first layer, no relative positions,
    one position term over unbucketed positions: heads and neurons removed physically all the same."""
    ad = encoder_adapter("deberta-v2", **options)
    batch = make_batch()
    check_adapter(ad, batch, count_macs=lambda a: counted_macs_of_encoder(a, batch), seq_len=10.0)


@pytest.mark.parametrize("kind", ["heads", "neurons"])
def test_deberta_restart_at_the_first_layer_applies_the_convolution(kind):
    ad = encoder_adapter("deberta-v2", conv_kernel_size=3, conv_act="gelu")
    batch = make_batch(batch_size=10)  # more than one chunk of similar lengths
    trace = ad.trace(batch)
    n = ad.unit_counts()[kind][0]
    masks = torch.ones(2, n)
    masks[1, : n // 2] = 0
    emb, logits = ad.run_from(trace, kind, 0, masks, batch)
    with torch.no_grad(), ad.masked({kind: [masks[1], None, None]}):
        expected = ad.logits(batch)
    assert torch.allclose(logits.reshape(2, 10, -1)[0], trace.logits, atol=1e-5)
    assert torch.allclose(logits.reshape(2, 10, -1)[1], expected, atol=1e-5)
    assert not torch.allclose(expected, trace.logits, atol=1e-3)  # the masked heads/neurons matter


def test_distilbert_takes_no_token_types():
    ad = encoder_adapter("distilbert")
    batch = make_batch()  # carries token_type_ids, which DistilBERT does not take
    with torch.no_grad():
        got = ad.logits(batch)
        expected = ad.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, expected)


# --- from a folder, through the command line ------------------------------------------------------------

def _csv(path):
    rng = random.Random(0)
    rows = []
    for i in range(48):
        words = POSITIVE if i % 2 else NEGATIVE
        rows.append(f"the {rng.choice(['movie', 'film', 'plot'])} was {rng.choice(words)} and {rng.choice(words)},"
                    f"{'pos' if i % 2 else 'neg'}\n")
    path.write_text("text,label\n" + "".join(rows))
    return path


def _folder(tmp_path, family):
    folder = tmp_path / family
    make_encoder(family, num_labels=2).save_pretrained(folder)
    make_tokenizer(tmp_path / "tokenizer").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ENCODERS)
def test_optin_run_end_to_end(family, tmp_path, cli_sandbox):
    folder, data, out = _folder(tmp_path, family), _csv(tmp_path / "data.csv"), tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", "--model", str(folder), "--data", str(data), "--scorer", "trajectory",
                                   "--set", "rows=16", "--set", "neuron_group=16", "--budget", "0.6", "--output",
                                   str(out), "--calib-size", "8", "--eval-size", "16", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["adapter"] == ADAPTER_OF[family]
    assert report["macs_after"] <= 0.6 * report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert report["max_abs_diff_vs_masked"] <= 1e-4
    reloaded = optin.load_model(str(out / "model"))
    assert reloaded.name == ADAPTER_OF[family] and reloaded.unit_counts() == report["kept"]
    batch = reloaded.collate([{"text": "the movie was good and fun"}, {"text": "bad"}])
    with torch.no_grad():
        assert reloaded.logits(batch).shape == (2, 2)


def test_albert_is_refused_with_its_reason(tmp_path, cli_sandbox):
    from transformers import AlbertConfig, AlbertForSequenceClassification

    folder = tmp_path / "albert"
    cfg = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64, num_labels=2,
                       architectures=["AlbertForSequenceClassification"])
    AlbertForSequenceClassification(cfg).save_pretrained(folder)
    res = CliRunner().invoke(cli, ["run", "--model", str(folder), "--data", str(_csv(tmp_path / "d.csv")),
                                   "--output", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "albert" in lines[0] and "shares one set of layer weights" in lines[0]
    assert "DistilBERT" in lines[0]  # what to prune instead


def test_an_unsupported_folder_names_its_model_type_and_the_supported_ones(tmp_path, cli_sandbox):
    folder = tmp_path / "funnel"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "funnel",
                                                    "architectures": ["FunnelForSequenceClassification"]}))
    res = CliRunner().invoke(cli, ["run", "--model", str(folder), "--data", str(_csv(tmp_path / "d.csv")),
                                   "--output", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "model_type 'funnel'" in res.output
    for supported in ("distilbert", "deberta-v2", "xlm-roberta", "electra", "vit"):
        assert supported in res.output


def test_a_forced_adapter_that_does_not_load_the_folder_names_the_one_that_does(tmp_path, cli_sandbox):
    res = CliRunner().invoke(cli, ["run", "--model", str(_folder(tmp_path, "distilbert")), "--adapter", "bert",
                                   "--data", str(_csv(tmp_path / "d.csv")), "--output", str(tmp_path / "out"),
                                   "--quiet"])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "model_type 'distilbert'" in lines[0] and "adapters that load it: distilbert" in lines[0]
