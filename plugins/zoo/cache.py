"""Building a named model into the cache safely: each build writes a private staging folder and moves it
into place when finished, so an interrupted build never leaves a half-written model; a lock per model
(``build_lock``) lets one process build while a second one waits and then uses the finished model. A model
counts as built when its marker (``optin-train.json``, or the builder's own) exists."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from optin.models import cache_dir
from optin.progress import say

DONE = "optin-train.json"
# Training's float reductions depend on how many threads share them: a fixed count makes a build the same bit
# for bit on every machine with the same torch version and CPU instruction set (more threads would be faster
# but give another model). OPTIN_BUILD_THREADS overrides it.
BUILD_THREADS = 2


@contextmanager
def reproducible() -> Iterator[int]:
    """Within the context torch uses ``BUILD_THREADS`` threads (or ``$OPTIN_BUILD_THREADS``); restored after."""
    import torch

    threads = int(os.environ.get("OPTIN_BUILD_THREADS") or BUILD_THREADS)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(saved)


def build_once(name: str, build: Callable[[Path], dict], what: str | None = None,
               result: tuple[str, str] | None = None) -> str:
    """The cached folder of the named model ``name``, built on first use: ``build(tmp)`` writes the model into
    a private staging folder and returns what ``optin-train.json`` records besides the name (written last:
    it marks the model as built); then the folder is moved into place. ``what`` is announced before, and
    ``result = (key, label)`` after: the record's ``key`` (a test metric) and the training ``seconds``."""
    target = cache_dir() / "models" / name
    if is_built(target):
        return str(target)
    with build_lock(target):
        if is_built(target):  # another process built it while we waited
            return str(target)
        if what:
            say(f"building {name}: {what} (first use only, several minutes; cached in {target})")
        tmp = staging(target)
        with reproducible() as threads:
            record = {**build(tmp), "build_threads": threads}
        if result:
            key, label = result
            say(f"{name}: {label} {record[key]:.4f} after {record['seconds']:.0f}s of training")
        (tmp / DONE).write_text(json.dumps({"model": name, **record}, indent=2))
        return publish(tmp, target)


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold the build lock of the model folder ``target``: a second builder waits here, then finds it built
    (the operating system releases the lock if the builder dies)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.build.lock")):
        yield


def is_built(target: Path, done: str = DONE) -> bool:
    return (target / done).is_file()


def staging(target: Path) -> Path:
    """An empty private folder beside ``target`` to build into."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, target: Path, done: str = DONE) -> str:
    """Move a finished build into place (unless another process finished first); returns the folder. Call it
    holding ``build_lock(target)``."""
    if is_built(target, done):
        shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    shutil.rmtree(target, ignore_errors=True)  # a partial folder from an interrupted older layout
    tmp.rename(target)
    return str(target)
