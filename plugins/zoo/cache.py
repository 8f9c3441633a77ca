"""Building a named model into the cache safely: each build writes a private staging folder and moves it
into place when finished, so an interrupted build never leaves a half-written model, and two processes
building at once keep the first finished one. A model counts as built when ``optin-train.json`` exists."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

DONE = "optin-train.json"


def is_built(target: Path) -> bool:
    return (target / DONE).is_file()


def staging(target: Path) -> Path:
    """An empty private folder beside ``target`` to build into."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, target: Path) -> str:
    """Move a finished build into place (unless another process finished first); returns the folder."""
    if is_built(target):
        shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    shutil.rmtree(target, ignore_errors=True)  # a partial folder from an interrupted older layout
    tmp.rename(target)
    return str(target)
