"""optin: retraining-free pruning of pre-trained transformers and CNNs (OPTIN, ICLR 2024).

Notebook use::

    import optin
    result = optin.prune(model, calibration_batches, scorer="trajectory", searcher="ptf", budget=0.6)
    optin.save_pruned(result.adapter, "pruned/")
"""
__version__ = "0.1.0"

from .contracts import Adapter, Reducer, Scorer, ScoreContext, Searcher, Trace  # noqa: E402
from .errors import BudgetError, OptinError, ScoresMismatchError, UnknownPluginError  # noqa: E402
from .export import load_pruned, save_pruned  # noqa: E402
from .models import load_model  # noqa: E402
from .rankings import Scores  # noqa: E402
from .recipe import prune, run, score, search  # noqa: E402
from .registry import plugins, register  # noqa: E402
from .units import CostModel  # noqa: E402

__all__ = ["Adapter", "BudgetError", "CostModel", "OptinError", "Reducer", "ScoreContext", "Scorer",
           "Scores", "ScoresMismatchError", "Searcher", "Trace", "UnknownPluginError", "load_model",
           "load_pruned", "plugins", "prune", "register", "run", "save_pruned", "score", "search"]
