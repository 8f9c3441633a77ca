"""A hook plugin: contributes the tiny ``toy-polarity`` task through the ``optin_tasks`` hook."""
from __future__ import annotations

from optin.hooks import hookimpl
from optin.tasks import Task, split_of

POSITIVE = [
    "a wonderful film", "truly great acting", "i loved every minute", "a delightful story",
    "the best movie this year", "warm funny and smart", "a joy to watch", "beautiful and moving",
    "brilliant performances all round", "an excellent script", "charming from start to finish",
    "i would watch it again", "a clever and touching tale", "superb direction", "pure fun",
    "the cast is fantastic", "a real treat", "lovely music and images", "great fun for everyone",
    "an uplifting experience",
]
NEGATIVE = [
    "a terrible film", "truly awful acting", "i hated every minute", "a boring story",
    "the worst movie this year", "dull slow and silly", "a pain to watch", "ugly and empty",
    "poor performances all round", "a dreadful script", "tedious from start to finish",
    "i would never watch it again", "a clumsy and lifeless tale", "sloppy direction", "pure waste",
    "the cast is wooden", "a real mess", "annoying music and images", "no fun for anyone",
    "a depressing experience",
]


def load(split: str) -> list[dict]:
    """Examples of ``split`` ("train" or "test"); a stable hash of the text decides the split."""
    rows = [(t, 1) for t in POSITIVE] + [(t, 0) for t in NEGATIVE]
    return [{"text": t, "label": y} for t, y in rows if split_of(t) == split]


@hookimpl
def optin_tasks() -> dict[str, Task]:
    return {"toy-polarity": Task("toy-polarity", "40 hard-coded movie phrases, negative vs positive (example)",
                                 ["negative", "positive"], load)}
