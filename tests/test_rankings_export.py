"""Saved rankings (scores files), resumable checkpoints, and the pickle-free pruned-model export."""
from __future__ import annotations

import json
import os

import pytest
import torch

import optin
from conftest import HEADS, INTERMEDIATE, LAYERS, make_tiny_bert
from optin.errors import OptinError, ScoresMismatchError
from optin.rankings import Checkpoint, Scores, fingerprint
from optin_plugins.adapters.bert import BertAdapter
from optin_plugins.scorers.trajectory import TrajectoryScorer


def _equal_units(a, b):
    return set(a) == set(b) and all(len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                                    for k in a)


# --- scores files -------------------------------------------------------------------------------

def test_scores_round_trip(adapter, batch, tmp_path):
    scores = optin.score(adapter, [batch], "trajectory", {"neuron_group": 8, "rows": 16})
    path = tmp_path / "sub" / "scores.safetensors"
    scores.save(path)
    back = Scores.load(path)
    assert _equal_units(back.values, scores.values)
    assert set(back.extras) == {"md", "kd"}
    assert _equal_units(back.extras["md"], scores.extras["md"])
    assert back.adapter == "bert" and back.scorer == "trajectory"
    assert back.fingerprint == scores.fingerprint == fingerprint(adapter.model)
    assert back.options == json.loads(json.dumps(scores.options))
    assert back.options["neuron_group"] == 8
    back.check_matches("bert", fingerprint(adapter.model), adapter.unit_counts())  # no error
    assert not (tmp_path / "sub" / "scores.safetensors.tmp").exists()


def test_scores_file_has_more_than_ten_layers_in_order(tmp_path):
    values = {"neurons": [torch.full((2,), float(i)) for i in range(12)]}
    Scores(values, "bert", "f" * 32, "random").save(tmp_path / "s.safetensors")
    back = Scores.load(tmp_path / "s.safetensors")
    assert [int(t[0]) for t in back.values["neurons"]] == list(range(12))


def test_loading_random_bytes_raises_helpful_error(tmp_path):
    path = tmp_path / "scores.safetensors"
    path.write_bytes(os.urandom(512))
    with pytest.raises(ScoresMismatchError) as info:
        Scores.load(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "corrupt" in msg and "optin score" in msg


def test_loading_truncated_file_raises(adapter, batch, tmp_path):
    path = tmp_path / "scores.safetensors"
    optin.score(adapter, [batch], "magnitude").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ScoresMismatchError, match="corrupt"):
        Scores.load(path)


def test_loading_missing_or_foreign_file(tmp_path):
    with pytest.raises(ScoresMismatchError, match="does not exist"):
        Scores.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ScoresMismatchError, match="not an optin scores file"):
        Scores.load(tmp_path / "other.safetensors")


def test_check_matches_refuses_another_model(adapter, batch):
    scores = optin.score(adapter, [batch], "magnitude")
    other = BertAdapter(make_tiny_bert(seed=1))  # same shapes, other weights
    assert fingerprint(other.model) != scores.fingerprint
    with pytest.raises(ScoresMismatchError, match="other weights"):
        scores.check_matches("bert", fingerprint(other.model), other.unit_counts())
    with pytest.raises(ScoresMismatchError, match="adapter"):
        scores.check_matches("vit", scores.fingerprint, adapter.unit_counts())
    with pytest.raises(ScoresMismatchError, match="another model"):
        scores.check_matches("bert", scores.fingerprint, {"heads": [HEADS] * 2, "neurons": [INTERMEDIATE] * 2})


def test_fingerprint_depends_on_weights_only():
    a, b = make_tiny_bert(seed=0), make_tiny_bert(seed=0)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.classifier.bias[0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


def test_prune_with_scores_from_another_model_raises(adapter, batch, tmp_path):
    path = tmp_path / "s.safetensors"
    optin.score(BertAdapter(make_tiny_bert(seed=1)), [batch], "magnitude").save(path)
    with pytest.raises(ScoresMismatchError):
        optin.prune(adapter, [batch], scores=path, budget=0.5)
    assert adapter.unit_counts()["heads"] == [HEADS] * LAYERS  # untouched


def test_prune_with_saved_scores_needs_no_rescoring(adapter, batch, tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    optin.score(adapter, [batch], "magnitude").save(path)
    import optin.recipe as recipe

    monkeypatch.setattr(recipe, "score", lambda *a, **k: pytest.fail("rescored"))
    # magnitude scores on this tiny model remove every head at 0.5 (a degenerate result, accepted here)
    result = optin.prune(adapter, [batch], scores=path, budget=0.5, allow_degenerate=True)
    assert result.macs_after <= 0.5 * result.macs_before


# --- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_resumes_same_job_only(tmp_path):
    path = tmp_path / "partial.safetensors"
    job = {"fingerprint": "abc", "scorer": "trajectory", "options": {"rows": 8}, "seed": 0}
    ck = Checkpoint(path, job)
    assert ck.resumed == 0 and ck.get("md/heads.0") is None
    ck.put("md/heads.0", torch.tensor([1.0, 2.0]))
    ck.put("kd/heads.0", torch.tensor([3.0]))

    again = Checkpoint(path, dict(reversed(list(job.items()))))  # key order does not matter
    assert again.resumed == 2
    assert torch.equal(again.get("md/heads.0"), torch.tensor([1.0, 2.0]))
    assert torch.equal(again.get("kd/heads.0"), torch.tensor([3.0]))

    other = Checkpoint(path, {**job, "seed": 1})
    assert other.resumed == 0 and other.get("md/heads.0") is None
    other.put("x", torch.zeros(1))  # a different job overwrites the stale file
    assert Checkpoint(path, job).resumed == 0

    other.discard()
    assert not path.exists()


def test_corrupt_checkpoint_is_ignored(tmp_path):
    path = tmp_path / "partial.safetensors"
    path.write_bytes(os.urandom(300))
    ck = Checkpoint(path, {"a": 1})
    assert ck.resumed == 0 and ck.data == {}


class _Interrupt(KeyboardInterrupt):
    pass


def test_score_resumes_after_interruption(batch, tmp_path, monkeypatch):
    """Exact scoring stores every chunk of masks: an interrupt loses at most the chunk in progress, and the
    resumed scores equal an uninterrupted run bitwise."""
    opts = {"neuron_group": 8, "rows": 16, "tokens_per_forward": 40}  # several chunks per layer
    reference = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2)

    ckpt = tmp_path / "scores.partial.safetensors"
    original = TrajectoryScorer._chunk
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the 3rd chunk of masks is interrupted (Ctrl-C)
            raise _Interrupt()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrajectoryScorer, "_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2, checkpoint=ckpt)
    assert ckpt.is_file()
    assert Checkpoint(ckpt, {}).resumed == 0  # not valid for another job
    monkeypatch.undo()

    recomputed = []

    def counting(self, adapter, batch_, trace, probe, kind, layer, *rest):
        recomputed.append((kind, layer))
        return original(self, adapter, batch_, trace, probe, kind, layer, *rest)

    monkeypatch.setattr(TrajectoryScorer, "_chunk", counting)
    resumed = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2, checkpoint=ckpt)
    monkeypatch.undo()
    total = []
    monkeypatch.setattr(TrajectoryScorer, "_chunk", lambda self, *a: total.append(1) or original(self, *a))
    optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2)
    assert len(total) > 3
    assert len(recomputed) == len(total) - 2  # the two chunks finished before the interruption were reused
    assert _equal_units(resumed.values, reference.values)
    assert _equal_units(resumed.extras["md"], reference.extras["md"])
    assert not ckpt.exists()  # removed once scoring completed


def test_approximate_scoring_resumes_after_interruption(batch, tmp_path, monkeypatch):
    """The Gauss-Newton estimator stores every micro-batch pass; a resumed run equals an uninterrupted one."""
    from optin_plugins.scorers import gauss_newton

    opts = {"estimator": "gauss-newton", "probes": 4, "rows": 16, "tokens_per_backward": 10}  # a pass per example
    reference = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2)
    ckpt = tmp_path / "scores.partial.safetensors"
    original = gauss_newton._pass
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(gauss_newton, "_pass", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2, checkpoint=ckpt)
    monkeypatch.undo()
    passes = []
    monkeypatch.setattr(gauss_newton, "_pass", lambda *a: passes.append(1) or original(*a))
    resumed = optin.score(BertAdapter(make_tiny_bert()), [batch], "trajectory", opts, seed=2, checkpoint=ckpt)
    assert len(passes) == batch["input_ids"].shape[0] - 2
    assert _equal_units(resumed.values, reference.values)
    assert _equal_units(resumed.extras["kd"], reference.extras["kd"])


def test_checkpoint_of_other_options_is_not_reused(batch, tmp_path, monkeypatch):
    ckpt = tmp_path / "p.safetensors"
    ad = BertAdapter(make_tiny_bert())
    job = {"fingerprint": fingerprint(ad.model), "scorer": "trajectory",
           "options": TrajectoryScorer(neuron_group=8, rows=16).describe(), "seed": 0, "data": "x"}
    ck = Checkpoint(ckpt, job)
    ck.put("heads.0#0.0", torch.full((2, HEADS), 123.0, dtype=torch.float64))  # the first chunk's md, kd
    # the data hash differs from "x": the stale partial results must not leak in
    scores = optin.score(ad, [batch], "trajectory", {"neuron_group": 8, "rows": 16}, checkpoint=ckpt)
    assert not torch.equal(scores.extras["md"]["heads"][0], torch.full((HEADS,), 123.0))


# --- export -------------------------------------------------------------------------------------

def _pruned(seed_masks=0):
    model = make_tiny_bert()
    ad = BertAdapter(model)
    g = torch.Generator().manual_seed(seed_masks)
    masks = {k: [(torch.rand(n, generator=g) < 0.6).float() for n in ns] for k, ns in ad.unit_counts().items()}
    masks["heads"][1] = torch.zeros(HEADS)
    masks["neurons"][2] = torch.zeros(INTERMEDIATE)
    ad.prune(masks)
    return ad, masks


def test_save_load_pruned_round_trip(batch, tmp_path):
    ad, masks = _pruned()
    out = tmp_path / "export"
    optin.save_pruned(ad, out, {"budget": 0.5})
    back = optin.load_pruned(out)
    assert isinstance(back, BertAdapter)
    assert back.unit_counts() == ad.unit_counts()
    assert back.unit_counts() == {k: [int(m.sum()) for m in v] for k, v in masks.items()}
    assert back.kept_index == ad.kept_index
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(back.model(**inputs).logits, ad.model(**inputs).logits, atol=1e-6)
    assert not back.model.training
    plan = json.loads((out / "optin-plan.json").read_text())
    assert plan["adapter"] == "bert" and plan["info"] == {"budget": 0.5}


def test_export_has_no_pickles(batch, tmp_path, tiny_tokenizer):
    ad, _ = _pruned(1)
    ad.processor = tiny_tokenizer
    out = tmp_path / "export"
    optin.save_pruned(ad, out)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"model.safetensors", "optin-plan.json"} <= {p.name for p in files}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".pth", ".pickle")]
    for p in files:  # no pickle payloads under another name either
        assert not p.read_bytes().startswith(b"\x80"), p
    back = optin.load_pruned(out)
    assert back.processor is not None
    assert back.processor("the movie")["input_ids"] == tiny_tokenizer("the movie")["input_ids"]


def test_load_pruned_bad_dirs(tmp_path):
    with pytest.raises(OptinError, match="cannot read"):
        optin.load_pruned(tmp_path)
    (tmp_path / "optin-plan.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OptinError, match="not an optin plan"):
        optin.load_pruned(tmp_path)


def test_unpruned_round_trip(batch, tmp_path, tiny_bert):
    ad = BertAdapter(tiny_bert)
    optin.save_pruned(ad, tmp_path / "e")
    back = optin.load_pruned(tmp_path / "e")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(back.model(**inputs).logits, tiny_bert(**inputs).logits, atol=1e-6)
