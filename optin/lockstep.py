"""Several forward passes run side by side, each stopping at the same points, so that work can be done
between "every pass has reached point i" and "they all go on".

Least-squares recovery refits the reading layers one after another, each from its input as the layers
refit before it have shaped it, over the whole calibration sample. Running the sample as one forward with
the refit in a hook does that in one pass, but on one batch padded to its longest example and with every
activation of the sample in memory at once; running a forward per layer and micro-batch costs a number of
passes that grows with the square of the depth. Here each micro-batch's forward is a coroutine (a thread
of its own, only one of them running at any time): a hook inside the forward hands what it sees to the
driver and waits; once every micro-batch has handed over point i, the driver refits layer i and lets them
go on. The sample is still seen in one pass, by micro-batches each trimmed to its own length.

Only one thread runs at a time, and the driver waits while it does, so the forwards never run
concurrently: the model sees the calls one after another, as in a plain loop.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch


class Stopped(Exception):
    """Raised inside a paused forward that the driver no longer needs (``Lockstep.close``)."""


class _Job:
    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call
        self.go = threading.Semaphore(0)
        self.back = threading.Semaphore(0)
        self.value: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self.thread: threading.Thread | None = None


class Lockstep:
    """Runs ``calls`` (forward passes, each with gradients off) as coroutines.

    A hook running inside one of them calls ``pause(value)``; the driver's ``advance(j)`` runs call ``j``
    until its next pause and returns the value (or ``FINISHED`` when the call returned). ``close()`` ends
    every paused call (``pause`` raises ``Stopped`` in it) and waits for the threads. Use as a context
    manager so the threads end whatever happens in the driver.
    """

    FINISHED = object()

    def __init__(self, calls: list[Callable[[], Any]]) -> None:
        self._jobs = [_Job(c) for c in calls]
        self._local = threading.local()
        self._stopping = False
        for job in self._jobs:
            job.thread = threading.Thread(target=self._run, args=(job,), daemon=True)
            job.thread.start()

    def __enter__(self) -> "Lockstep":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._jobs)

    def _run(self, job: _Job) -> None:
        self._local.job = job
        job.go.acquire()
        try:
            if not self._stopping:
                with torch.no_grad():
                    job.value = job.call()
        except Stopped:
            pass
        except BaseException as exc:  # handed to the driver, re-raised there
            job.error = exc
        job.finished = True
        job.back.release()

    def pause(self, value: Any) -> None:
        """From inside a call (a hook): hand ``value`` to the driver and wait until it resumes this call."""
        job: _Job | None = getattr(self._local, "job", None)
        if job is None:
            raise RuntimeError("Lockstep.pause called outside the calls it runs")
        job.value = value
        job.back.release()
        job.go.acquire()
        if self._stopping:
            raise Stopped

    def advance(self, j: int) -> Any:
        """Run call ``j`` until it pauses (its value) or returns (``FINISHED``); an error in it is raised here."""
        job = self._jobs[j]
        if job.finished:
            return self.FINISHED
        job.go.release()
        job.back.acquire()
        if job.error is not None:
            error, job.error = job.error, None
            raise error
        return self.FINISHED if job.finished else job.value

    def close(self) -> None:
        """End every call that has not returned (at its pause point) and wait for all of them."""
        self._stopping = True
        for job in self._jobs:
            if not job.finished:
                job.go.release()
                job.back.acquire()
        for job in self._jobs:
            job.thread.join()
