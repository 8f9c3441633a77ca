"""Scores for the benchmarks: read from a folder of ``{scorer}-seed{seed}.safetensors`` (an ``optin compare``
folder's ``scores/``), or computed with the scorer's default options and saved there first."""
from __future__ import annotations

import copy
from pathlib import Path

import optin
from optin.contracts import Adapter, Batch
from optin.rankings import Scores, fingerprint


def scores_for(base: Adapter, calib: list[Batch], scorer: str, seed: int, folder: Path) -> Scores:
    """``scorer``'s scores of ``base`` on this seed's calibration sample, checked against the model."""
    path = Path(folder) / f"{scorer}-seed{seed}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        optin.score(copy.deepcopy(base), calib, scorer, seed=seed).save(path)
    scores = Scores.load(path)
    scores.check_matches(base.name, fingerprint(base.model), base.unit_counts())
    return scores
