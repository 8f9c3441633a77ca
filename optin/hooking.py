"""Temporary forward hooks: the adapters capture and rewrite activations with hooks that must never
outlive the forward they were registered for."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch.utils.hooks import RemovableHandle


@contextmanager
def removing(handles: list[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """Run the ``with`` body, then remove every hook in ``handles`` (also those appended inside the body),
    whether the body succeeded or raised."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()
