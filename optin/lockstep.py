"""Several forward passes run side by side, each stopping at the same points, so that work can be done
between "every pass has reached point i" and "they all go on".

Least-squares recovery refits the reading layers one after another, each from its input as the layers
refit before it have shaped it, over the whole calibration sample. Running the sample as one forward with
the refit in a hook does that in one pass, but on one batch padded to its longest example; running a
forward per layer and micro-batch costs a number of passes that grows with the square of the depth. Here
each micro-batch's forward is a coroutine (a greenlet: its own stack, in this thread): a hook inside the
forward hands what it sees to the driver and waits; once every micro-batch has handed over point i, the
driver refits layer i and lets them go on. The sample is still seen in one pass, by micro-batches each
trimmed to its own length.

Greenlets, not threads: one call runs at a time in the caller's thread, so thread-local state (torch's
grad mode, the allocator's arena) is the caller's, and the model sees the calls one after another as in a
plain loop. (Threads did the same job but gave each forward its own malloc arena: +0.3 GB peak memory in
the default run.)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import greenlet
import torch


class Stopped(Exception):
    """Raised inside a paused forward that the driver no longer needs (``Lockstep.close``)."""


class Lockstep:
    """Runs ``calls`` (forward passes, gradients off) as coroutines.

    A hook running inside one of them calls ``pause(value)``; the driver's ``advance(j)`` runs call ``j``
    until its next pause and returns the value (or ``FINISHED`` when the call returned). ``close()`` ends
    every paused call (``pause`` raises ``Stopped`` in it). Use as a context manager so the calls end
    whatever happens in the driver.
    """

    FINISHED = object()

    def __init__(self, calls: list[Callable[[], Any]]) -> None:
        self._driver = greenlet.getcurrent()
        self._calls = [greenlet.greenlet(self._wrap(c), parent=self._driver) for c in calls]
        self._finished = [False] * len(calls)
        self._current: int | None = None
        self._stopping = False

    def __enter__(self) -> Lockstep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wrap(self, call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:  # started only by ``advance``, never once closing began
            try:
                call()
            except Stopped:
                pass
            return self.FINISHED
        return run

    def pause(self, value: Any) -> None:
        """From inside a call (a hook): hand ``value`` to the driver and wait until it resumes this call."""
        if self._current is None or greenlet.getcurrent() is not self._calls[self._current]:
            raise RuntimeError("Lockstep.pause called outside the calls it runs")
        self._driver.switch(value)
        if self._stopping:
            raise Stopped

    def advance(self, j: int) -> Any:
        """Run call ``j`` until it pauses (its value) or returns (``FINISHED``); an error in it is raised here."""
        if self._finished[j]:
            return self.FINISHED
        self._current = j
        try:
            with torch.no_grad():  # the calls run only inside these switches: always without gradients
                value = self._calls[j].switch()
        except BaseException:
            self._finished[j] = True
            raise
        finally:
            self._current = None
        if self._calls[j].dead:
            self._finished[j] = True
            return self.FINISHED
        return value

    def close(self) -> None:
        """End every call that has not returned (at its pause point)."""
        self._stopping = True
        for j, g in enumerate(self._calls):
            if not self._finished[j]:
                self._current = j
                try:
                    if g:  # started and paused: resume it so that pause raises Stopped
                        with torch.no_grad():
                            g.switch()
                finally:
                    self._current = None
                    self._finished[j] = True
