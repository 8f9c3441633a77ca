"""Named models are built once into the cache, atomically (plugins/zoo/cache.build_once)."""
import json

import pytest

from optin_plugins.zoo.cache import build_once


def test_built_once_with_its_record_and_never_half_written(optin_cache, monkeypatch):
    monkeypatch.delenv("OPTIN_BUILD_THREADS", raising=False)
    calls = []
    threads = []

    def build(tmp):
        import torch

        threads.append(torch.get_num_threads())  # builds run on a fixed thread count (reproducible)
        calls.append(tmp)
        tmp.mkdir(parents=True)
        (tmp / "weights.bin").write_text("w")
        return {"task": "t", "accuracy": 0.5, "seconds": 1.0}

    first = build_once("tiny", build, "training nothing", ("accuracy", "test accuracy"))
    assert build_once("tiny", build) == first and len(calls) == 1  # cached: not built again
    assert json.loads((optin_cache / "models" / "tiny" / "optin-train.json").read_text()) == \
        {"model": "tiny", "task": "t", "accuracy": 0.5, "seconds": 1.0, "build_threads": 2}
    assert (optin_cache / "models" / "tiny" / "weights.bin").is_file() and not calls[0].exists()
    assert threads == [2]

    def interrupted(tmp):
        tmp.mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once("other", interrupted)
    assert not (optin_cache / "models" / "other").exists()  # nothing half-written in place
