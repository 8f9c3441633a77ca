"""User-facing errors. The CLI prints their message on one line and exits with code 2."""
from __future__ import annotations


class OptinError(Exception):
    """Bad input or an impossible request: the message says what was wrong and how to fix it."""


class UnknownPluginError(OptinError):
    """A plugin name that no installed package registers."""


class BudgetError(OptinError):
    """A FLOPs/MACs budget that is out of range or cannot be met."""


class ScoresMismatchError(OptinError):
    """A saved scores file that belongs to another model, or is corrupt."""
