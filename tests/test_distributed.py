"""Scoring on several processes: ``torchrun --nproc-per-node 2 -m optin.cli score`` (gloo on the CPU) gives
the scores one process gives, writes the outputs once (rank 0), and resumes per process."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_bert
from optin.rankings import Scores

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_bert(root / "tiny-bert")
    rng = random.Random(0)
    rows = [f"the movie was {rng.choice(WORDS)} and {rng.choice(WORDS)} {i}" for i in range(40)]
    data = root / "data.csv"
    data.write_text("text,label\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(rows)))
    return {"root": root, "model": model, "data": data}


def _score(setup: dict, out: Path, options: list[str], procs: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OPTIN_CACHE": str(setup["root"] / "cache")}
    args = ["-m", "optin.cli", "score", "--model", str(setup["model"]), "--data", str(setup["data"]),
            "--calib-size", "12", "--quiet", "--output", str(out), *options]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=setup["root"], timeout=300)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available in this build")
@pytest.mark.parametrize("options", [["--set", "estimator=exact", "--set", "rows=16"],
                                     ["--set", "estimator=gauss-newton", "--set", "probes=6", "--set", "rows=16"]],
                         ids=["exact", "gauss-newton"])
def test_two_processes_give_the_scores_of_one(setup, options):
    one = _score(setup, setup["root"] / f"one-{options[1]}", options, 1)
    assert one.returncode == 0, one.stderr
    two = _score(setup, setup["root"] / f"two-{options[1]}", options, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = Scores.load(setup["root"] / f"one-{options[1]}" / "scores.safetensors")
    b = Scores.load(setup["root"] / f"two-{options[1]}" / "scores.safetensors")
    for kind in a.values:
        for x, y in zip(a.values[kind], b.values[kind]):
            assert torch.allclose(x.double(), y.double(), rtol=1e-6, atol=0), kind
    out = setup["root"] / f"two-{options[1]}"
    assert not list(out.glob("*.partial*"))  # every process's checkpoint is removed once scoring completed
