"""Data tasks: labelled examples for calibration and evaluation.

Tasks come from the ``optin_tasks`` hook (built-ins in ``plugins/tasks``) or from a user file given
with ``--data`` (CSV or JSON lines with a ``text`` column, optional ``text_pair``, and ``label``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import OptinError
from .hooks import collect
from .registry import unknown_name_message

Example = dict  # {"text": str, ..., "label": int}


@dataclass
class Task:
    """A task: ``loader(split)`` returns examples for "train" or "test".

    ``target`` is what a model must predict: "classes" (examples carry ``label``) or "segmentation"
    (examples carry ``image`` and, when labelled, ``mask`` (H, W) with 255 = ignore). ``metric`` is
    "accuracy", "miou" or "agreement" (unlabelled data: fidelity to the unpruned model).
    """

    name: str
    description: str
    labels: list[str]
    loader: Callable[[str], list[Example]]
    metric: str = "accuracy"
    kind: str = "text"
    target: str = "classes"
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def examples(self, split: str) -> list[Example]:
        if split not in self._cache:
            self._cache[split] = self.loader(split)
        return self._cache[split]


def split_of(key: str, test_fraction: float = 0.2) -> str:
    """Deterministic train/test assignment from a stable hash of the example text."""
    bucket = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % 1000
    return "test" if bucket < test_fraction * 1000 else "train"


def known_tasks() -> dict[str, Task]:
    return collect("optin_tasks")


def get_task(name: str) -> Task:
    tasks = known_tasks()
    if name not in tasks:
        raise OptinError(unknown_name_message("task", name, sorted(tasks),
                                              "; or pass your own labelled file with --data FILE.csv"))
    return tasks[name]


def file_task(path: str | Path, test_fraction: float = 0.2) -> Task:
    """A task from a CSV/JSONL file with ``text`` (and optional ``text_pair``) and ``label`` columns."""
    path = Path(path)
    if not path.is_file():
        raise OptinError(f"data file {str(path)!r} does not exist")
    try:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
    except (ValueError, csv.Error, UnicodeDecodeError, OSError) as exc:
        raise OptinError(f"cannot read data file {str(path)!r}: {' '.join(str(exc).split())}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise OptinError(f"data file {str(path)!r}: row {i + 1} is a {type(row).__name__}, not an object; "
                             'each line must be a JSON object such as {"text": "...", "label": "..."}')
        if "text" not in row or "label" not in row or row["text"] is None or row["label"] is None:
            raise OptinError(f"data file {str(path)!r} needs columns 'text' and 'label' in every row; row {i + 1} "
                             f"has: {', '.join(map(str, row)) or 'nothing'}")
    if not rows:
        raise OptinError(f"data file {str(path)!r} has no rows; it needs columns 'text' and 'label'")
    labels = sorted({str(r["label"]) for r in rows})
    index = {lab: i for i, lab in enumerate(labels)}
    examples = [{"text": str(r["text"]), **({"text_pair": str(r["text_pair"])} if r.get("text_pair") else {}),
                 "label": index[str(r["label"])]} for r in rows]

    def loader(split: str) -> list[Example]:
        return [e for e in examples if split_of(e["text"], test_fraction) == split]

    return Task(name=path.stem, description=f"user data {path}", labels=labels, loader=loader)


def sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with a fixed seed (all when n >= len)."""
    if n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)
