"""Progress for every long step: a rich bar (with ETA) in a terminal, plain log lines elsewhere.

When stderr is not a terminal (CI logs, ``nohup``, ``2> log``, notebooks capturing output) a bar would print
nothing until the end, so ``bar`` writes plain lines instead: ``label: 40% (144/360), 0:21 elapsed,
eta 0:32``, at most every ``PLAIN_EVERY`` seconds and at each further tenth of the work, plus a last line
with the total time. ``set_quiet(True)`` silences both.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True)
_quiet = False
_active: Progress | None = None  # the display a terminal bar is drawn in, while one is
PLAIN_EVERY = 30.0  # seconds between plain progress lines (at least one per tenth of the work)


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss``) for a number of seconds."""
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgress:
    """Progress as log lines: at most one every ``every`` seconds, and one whenever another tenth is done."""

    def __init__(self, label: str, total: int | None, stream: TextIO, every: float = PLAIN_EVERY,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.stream, self.every, self.now = label, total, stream, every, now
        self.done = 0
        self.start = self.last = now()
        self.tenth = 0
        self.stream.write(f"{label}: started" + (f" ({total} steps)" if total else "") + "\n")
        self.stream.flush()

    def set_total(self, total: int) -> None:
        self.total = total

    def advance(self, n: int = 1) -> None:
        self.done += n
        t = self.now()
        tenth = int(10 * self.done / self.total) if self.total else 0
        if t - self.last >= self.every or tenth > self.tenth:
            self.tenth = max(self.tenth, tenth)
            self.last = t
            self.stream.write(self.line(t) + "\n")
            self.stream.flush()

    def line(self, t: float) -> str:
        elapsed = t - self.start
        if not self.total:
            return f"{self.label}: {self.done} done, {clock(elapsed)} elapsed"
        frac = min(1.0, self.done / self.total)
        eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
        eta_text = clock(eta) if frac > 0 else "?"
        return (f"{self.label}: {100 * frac:.0f}% ({self.done}/{self.total}), {clock(elapsed)} elapsed, "
                f"eta {eta_text}")

    def finish(self) -> None:
        self.stream.write(f"{self.label}: done ({self.done} steps) in {clock(self.now() - self.start)}\n")
        self.stream.flush()


@contextmanager
def bar(description: str, total: int | None = None) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Yield ``(advance, set_total)`` for a progress display showing done/total, elapsed time and ETA."""
    if _quiet:
        yield (lambda n=1: None), (lambda n: None)
        return
    if not console.is_terminal:
        plain = PlainProgress(description, total, sys.stderr)
        yield plain.advance, plain.set_total
        plain.finish()
        return
    global _active
    if _active is not None:  # a step inside a step: one more line in the display already shown
        progress = _active
        task = progress.add_task(description, total=total)
        try:
            yield (lambda n=1: progress.advance(task, n)), (lambda n: progress.update(task, total=n))
        finally:
            progress.remove_task(task)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=console, transient=False)
    with progress:
        task = progress.add_task(description, total=total)
        _active = progress
        try:
            yield (lambda n=1: progress.advance(task, n)), (lambda n: progress.update(task, total=n))
        finally:
            _active = None


def say(message: str) -> None:
    if not _quiet:
        console.print(message)
