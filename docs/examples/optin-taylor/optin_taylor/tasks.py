"""A hook plugin: contributes the tiny ``toy-polarity`` task through the ``optin_tasks`` hook."""
from __future__ import annotations

from optin.hooks import hookimpl
from optin.tasks import Task, split_of

# The same phrase with its polarity flipped: (positive, negative).
PAIRS = [
    ("a wonderful film", "a terrible film"),
    ("truly great acting", "truly awful acting"),
    ("i loved every minute", "i hated every minute"),
    ("a delightful story", "a boring story"),
    ("the best movie this year", "the worst movie this year"),
    ("warm funny and smart", "dull slow and silly"),
    ("a joy to watch", "a pain to watch"),
    ("beautiful and moving", "ugly and empty"),
    ("brilliant performances all round", "poor performances all round"),
    ("an excellent script", "a dreadful script"),
    ("charming from start to finish", "tedious from start to finish"),
    ("i would watch it again", "i would never watch it again"),
    ("a clever and touching tale", "a clumsy and lifeless tale"),
    ("superb direction", "sloppy direction"),
    ("pure fun", "pure waste"),
    ("the cast is fantastic", "the cast is wooden"),
    ("a real treat", "a real mess"),
    ("lovely music and images", "annoying music and images"),
    ("great fun for everyone", "no fun for anyone"),
    ("an uplifting experience", "a depressing experience"),
]


def load(split: str) -> list[dict]:
    """Examples of ``split`` ("train" or "test"); a stable hash of the text decides the split."""
    rows = [(positive, 1) for positive, _ in PAIRS] + [(negative, 0) for _, negative in PAIRS]
    return [{"text": t, "label": y} for t, y in rows if split_of(t) == split]


@hookimpl
def optin_tasks() -> dict[str, Task]:
    return {"toy-polarity": Task("toy-polarity", "40 hard-coded movie phrases, negative vs positive (example)",
                                 ["negative", "positive"], load)}
