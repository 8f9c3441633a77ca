"""Rich progress bars (with ETA) that every long step uses; silenced with ``set_quiet(True)``."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


@contextmanager
def bar(description: str, total: int | None = None) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Yield ``(advance, set_total)`` for a progress bar showing done/total, elapsed time and ETA."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=console, disable=_quiet, transient=False)
    with progress:
        task = progress.add_task(description, total=total)
        yield (lambda n=1: progress.advance(task, n)), (lambda n: progress.update(task, total=n))


def say(message: str) -> None:
    if not _quiet:
        console.print(message)
