"""Shared fixtures: a tiny BERT classifier built from a config, random token batches, a tiny tokenizer.

Everything here is small enough that the whole suite runs in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

VOCAB = 100
HIDDEN = 32
LAYERS = 3
HEADS = 4
INTERMEDIATE = 64
LABELS = 3

# Tiny models run fastest on one thread, and the machine is shared: never oversubscribe its 2 cores.
torch.set_num_threads(1)

# Words of the tiny tokenizer (together with the special tokens they stay below VOCAB entries).
WORDS = ["the", "a", "good", "great", "fine", "nice", "happy", "love", "best", "fun",
         "bad", "awful", "poor", "sad", "hate", "worst", "boring", "ugly", "movie", "film",
         "was", "is", "very", "really", "not", "so", "plot", "actor", "story", "show"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(num_labels: int = LABELS, vocab_size: int = VOCAB, eager: bool = True, **kw) -> BertConfig:
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, num_labels=num_labels,
                     max_position_embeddings=64, **kw)
    if eager:
        cfg._attn_implementation = "eager"
    return cfg


def make_tiny_bert(seed: int = 0, num_labels: int = LABELS, vocab_size: int = VOCAB) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_labels, vocab_size))
    # Larger-than-default weights so that masking a unit visibly moves the output (the HF init is std 0.02).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    return model.eval()


def make_batch(batch_size: int = 4, seq_len: int = 10, seed: int = 1, num_labels: int = LABELS,
               vocab_size: int = VOCAB) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    input_ids[:, 0] = 2  # [CLS]
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    # some padding: example b keeps seq_len - 2*b tokens (at least 3)
    for b in range(batch_size):
        keep = max(3, seq_len - 2 * b)
        attention_mask[b, keep:] = 0
        input_ids[b, keep:] = 0
    token_type_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    token_type_ids[:, seq_len // 2:] = 1
    token_type_ids = token_type_ids * attention_mask
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": labels}


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    """A seeded 3-layer, 4-head, hidden-32, FFN-64 BERT classifier (3 labels) in eval mode, eager attention."""
    return make_tiny_bert()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """4 random sequences of 10 tokens with padding in all but the first, token types and labels."""
    return make_batch()


@pytest.fixture
def adapter(tiny_bert):
    from optin_plugins.adapters.bert import BertAdapter

    return BertAdapter(tiny_bert)


def write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS) + "\n")
    return path


def make_tokenizer(directory: Path) -> BertTokenizerFast:
    return BertTokenizerFast(vocab_file=str(write_vocab(directory)), do_lower_case=True)


# Words of the tiny tokenizer that make up labelled phrases for the command-line tests.
POSITIVE = ["good", "great", "fine", "nice", "happy", "love", "best", "fun"]
NEGATIVE = ["bad", "awful", "poor", "sad", "hate", "worst", "boring", "ugly"]
NOUNS = ["movie", "film", "plot", "actor", "story", "show"]


def write_reviews(path: Path, n: int = 80) -> None:
    """``n`` distinct labelled phrases (text,label CSV: pos/neg) in the tiny tokenizer's words."""
    rng = random.Random(0)
    rows, seen = [], set()
    while len(rows) < n:
        label = len(rows) % 2
        words = POSITIVE if label else NEGATIVE
        text = f"the {rng.choice(NOUNS)} was {rng.choice(['very', 'really', 'so'])} {rng.choice(words)} " \
               f"and {rng.choice(words)}"
        if text not in seen:
            seen.add(text)
            rows.append((text, "pos" if label else "neg"))
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))


def save_tiny_bert(directory: Path, seed: int = 0, num_labels: int = 2) -> Path:
    """A seeded tiny BERT classifier and the tiny tokenizer saved as a model folder (what ``--model DIR``
    loads)."""
    model = make_tiny_bert(seed=seed, num_labels=num_labels)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(directory)
    make_tokenizer(directory.with_name(directory.name + "-tokenizer")).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_tokenizer(tmp_path) -> BertTokenizerFast:
    """A word-level BERT tokenizer over 35 tokens (5 specials + 30 words)."""
    return make_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def optin_cache(tmp_path, monkeypatch) -> Path:
    """OPTIN_CACHE pointed at an empty temporary folder."""
    cache = tmp_path / "optin-cache"
    cache.mkdir()
    monkeypatch.setenv("OPTIN_CACHE", str(cache))
    return cache


@pytest.fixture
def cli_sandbox(tmp_path, monkeypatch, optin_cache) -> Path:
    """Commands run from an empty folder with OPTIN_CACHE in tmp, and the report's throughput timed in one
    short pass (its numbers are for benchmarks; the tests only need it measured)."""
    import optin.recipe
    from optin.measure import throughput

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(optin.recipe, "throughput",
                        lambda runs, examples, **kw: throughput(runs, examples, warmup=0, repeats=1, min_seconds=0.0))
    return tmp_path


def check_old_compare_folders(args: list[str], folder: Path, setting: str, old: list[str], more: list[str]) -> None:
    """An ``optin compare`` folder journalled before ``setting`` existed (made with the flags ``old``) resumes
    with ``old`` (and ``more``: flags that add cells), and is refused with the new default, naming the setting."""
    from click.testing import CliRunner

    from optin.cli import cli

    assert CliRunner().invoke(cli, [*args, *old]).exit_code == 0
    path = folder / "cells.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r.pop(setting, None)  # as journalled before the setting existed
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = CliRunner().invoke(cli, [*args, *more, *old])
    assert res.exit_code == 0, res.output + repr(res.exception)
    res = CliRunner().invoke(cli, args)  # the default: not what the old cells were made with
    assert res.exit_code == 2 and setting in res.output


def one_error_line(res, mentions: str) -> None:
    """A CLI result that failed with exit code 2 and one line, ``Error: ...``, naming ``mentions``."""
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and mentions in lines[0], res.output
