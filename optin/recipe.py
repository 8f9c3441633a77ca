"""The one recipe: load -> calibrate -> score -> search -> apply (mask, then remove) -> evaluate -> export.

Every step is a plain function usable from a notebook; ``run`` composes them for the CLI.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, registry
from .contracts import Adapter, Batch, ScoreContext, TokenScorer
from .errors import BudgetError, OptinError
from .export import save_pruned
from .hooks import notify
from .measure import evaluate, params, throughput
from .models import adapter_for, load_model, named_models
from .progress import bar, say
from .rankings import Checkpoint, Scores, fingerprint
from .tasks import Task, file_task, get_task, known_tasks, sample
from .units import CostModel, UnitTensors, counts_of, kept_counts


def check_budget(budget: float) -> float:
    try:
        budget = float(budget)
    except (TypeError, ValueError):
        raise BudgetError(f"budget must be a number in (0, 1] (the fraction of MACs to keep), got {budget!r}")
    if not 0.0 < budget <= 1.0:
        raise BudgetError(f"budget must be in (0, 1] (the fraction of MACs to keep, e.g. 0.6), got {budget}")
    return budget


def as_adapter(model: nn.Module | Adapter, processor: Any = None, adapter: str | None = None) -> Adapter:
    if isinstance(model, Adapter):
        return model
    return adapter_for(model, adapter)(model, processor)


def batches_of(adapter: Adapter, examples: list[dict], batch_size: int) -> list[Batch]:
    return [adapter.collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def resolve_task(task: str | Task | None, data: str | None, model_source: str | None) -> Task:
    if isinstance(task, Task):
        return task
    if data:
        return file_task(data)
    if task:
        return get_task(task)
    named = named_models()
    if model_source in named:
        return get_task(named[model_source].task)
    raise OptinError("no data: pass --task NAME (see `optin list`) or --data FILE.csv with text,label columns")


def _batches_hash(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            if torch.is_tensor(b[k]):
                h.update(k.encode())
                h.update(b[k].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def score(adapter: Adapter, batches: list[Batch], scorer: str = "trajectory", options: dict | None = None,
          seed: int = 0, checkpoint: str | Path | None = None) -> Scores:
    """Importance of every unit. With ``checkpoint`` an interrupted run resumes from the partial file."""
    impl = registry.create("scorer", scorer, options)
    if impl.needs_labels and any("labels" not in b and "masks" not in b for b in batches):
        raise OptinError(f"scorer {scorer!r} needs labelled calibration data")
    fp = fingerprint(adapter.model)
    ckpt = None
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint, {"fingerprint": fp, "scorer": scorer, "options": impl.describe(),
                                       "seed": seed, "data": _batches_hash(batches)})
        if ckpt.resumed:
            say(f"resuming scoring: {ckpt.resumed} partial results found in {checkpoint}")
    torch.manual_seed(seed)
    adapter.model.eval()
    with bar(f"scoring ({scorer})") as (advance, set_total):
        ctx = ScoreContext(seed=seed, checkpoint=ckpt, advance=advance, total=set_total)
        try:
            values = impl.score(adapter, batches, ctx)
        except NotImplementedError as exc:
            raise OptinError(f"scorer {scorer!r} does not work with adapter {adapter.name!r}: {exc}") from exc
    extras = getattr(impl, "extras", {}) or {}
    result = Scores(values=values, adapter=adapter.name, fingerprint=fp, scorer=scorer,
                    options=impl.describe(), extras=extras)
    if ckpt is not None:
        ckpt.discard()
    notify("stage", stage="scored", scorer=scorer)
    return result


def search(adapter: Adapter, scores: Scores | UnitTensors, budget: float, seq_len: float,
           searcher: str = "ptf", options: dict | None = None) -> tuple[UnitTensors, CostModel]:
    """Keep-masks that fit ``budget`` x the unpruned MACs."""
    budget = check_budget(budget)
    values = scores.values if isinstance(scores, Scores) else scores
    costs = adapter.cost_model(seq_len)
    accepted = registry.option_names(registry.get("searcher", searcher))
    options = {**{k: v for k, v in adapter.search_defaults.items() if k in accepted}, **(options or {})}
    impl = registry.create("searcher", searcher, options)
    masks = impl.search(values, costs, budget)
    limit = getattr(impl, "unit_budget_for", lambda b: b)(budget)  # token searchers leave a part to tokens
    got = costs.macs_of_masks(masks)
    if got > limit * costs.macs() * (1 + 1e-9):
        raise BudgetError(f"searcher {searcher!r} returned masks with {got / costs.macs():.3f} of the MACs, "
                          f"above its budget {limit}")
    return masks, costs


@dataclass
class PruneResult:
    adapter: Adapter
    masks: UnitTensors
    scores: Scores
    macs_before: float
    macs_after: float
    info: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.adapter.model


def prune(model: nn.Module | Adapter, data: list[Batch], *, scorer: str = "trajectory", searcher: str = "ptf",
          budget: float = 0.6, scores: Scores | str | Path | None = None, options: dict | None = None,
          seed: int = 0, processor: Any = None, adapter: str | None = None,
          checkpoint: str | Path | None = None) -> PruneResult:
    """Prune ``model`` in place to ``budget`` of its MACs using calibration batches ``data``.

    ``scores`` (a Scores object or a saved scores file) skips scoring: the same scores serve any budget.
    """
    check_budget(budget)
    ad = as_adapter(model, processor, adapter)
    if scores is None:
        scores = score(ad, data, scorer, options, seed, checkpoint)
    elif not isinstance(scores, Scores):
        scores = Scores.load(scores)
        scores.check_matches(ad.name, fingerprint(ad.model), ad.unit_counts())
    seq_len = ad.seq_len(data)
    masks, costs = search(ad, scores, budget, seq_len, searcher, options)
    ad.prune(masks)
    return PruneResult(ad, masks, scores, costs.macs(), costs.macs_of_masks(masks),
                       {"seq_len": seq_len, "kept": kept_counts(masks)})


@torch.no_grad()
def _max_diff(reference: Adapter, masks: UnitTensors, pruned: Adapter, batch: Batch) -> float:
    with reference.masked(masks):
        expected = reference.logits(batch)
    return float((pruned.logits(batch) - expected).abs().max())


def check_target(adapter: Adapter, task: Task, source: str) -> None:
    """A segmentation model needs a segmentation task and a classifier a classification task."""
    if adapter.output == task.target:
        return
    what = {"classes": "classification", "segmentation": "segmentation"}
    fitting = sorted(n for n, t in known_tasks().items() if t.target == adapter.output)
    raise OptinError(f"model {source!r} is a {what.get(adapter.output, adapter.output)} model (adapter "
                     f"{adapter.name!r}) but task {task.name!r} is a {what.get(task.target, task.target)} task; "
                     f"use a {what.get(adapter.output, adapter.output)} task: {', '.join(fitting) or 'none installed'}")


def require_tokens(adapter: Adapter, reducer: str) -> None:
    """A token reducer needs an adapter with tokens (checked before scoring, and again when installing)."""
    if not adapter.has_tokens:
        raise OptinError(f"--reducer {reducer}: adapter {adapter.name!r} has no tokens to reduce; token reducers "
                         "work with the vision adapters (vit)")


def reduce_tokens(adapter: Adapter, reducer: str, budget: float, macs_before: float, *, searcher: str = "token-schedule",
                  options: dict | None = None, token_importance: torch.Tensor | None = None,
                  token_scorer: Any = None) -> list[int]:
    """Install a token reducer on a schedule whose MACs fit ``budget * macs_before`` (after any
    head/neuron pruning already applied); returns the tokens removed per block."""
    require_tokens(adapter, reducer)
    options = dict(options or {})
    shared = getattr(token_scorer, "similarity_tokens", None)
    if shared is not None:  # Zero-TPrune: the token scorer's S-stage setting drives the prune reducer
        options.setdefault("similarity_tokens", shared)
    impl = registry.create("reducer", reducer, options)
    plan = registry.create("searcher", searcher, options)
    if not hasattr(plan, "removals"):
        raise OptinError(f"--reducer needs a token searcher (e.g. --searcher token-schedule); {searcher!r} "
                         "only chooses heads/neurons")
    if impl.needs_importance and token_scorer is None:
        raise OptinError(f"reducer {reducer!r} drops tokens by importance: use a token scorer, e.g. --scorer wpr")
    n_layers = len(next(iter(adapter.unit_counts().values())))
    removals = plan.removals(adapter.n_tokens, adapter.protected, n_layers,
                             lambda rem: adapter.cost_model(removals=rem).macs(), budget * macs_before,
                             token_importance)
    adapter.install_reducer(impl, removals, token_scorer)
    return list(adapter.removals)  # as installed (a schedule never removes the last non-protected token)


def _token_importance(scores: Scores | None) -> torch.Tensor | None:
    tokens = (scores.extras.get("tokens") or {}).get("tokens") if scores is not None else None
    return torch.stack(tokens) if tokens else None


def run(model: str | None, *, task: str | Task | None = None, data: str | None = None,
        scorer: str = "trajectory", searcher: str = "ptf", reducer: str | None = None, budget: float = 0.6,
        output: str | Path = "optin-output", scores_file: str | Path | None = None, seed: int = 0,
        calib_size: int = 128, eval_size: int = 1000, batch_size: int = 64, adapter: str | None = None,
        options: dict | None = None, score_only: bool = False, recalibrate: bool = True) -> dict:
    """The CLI's job: prune ``model`` on ``task`` and write the pruned model and ``report.json``."""
    t_start = time.perf_counter()
    budget = check_budget(budget)
    for flag, value in (("calib-size", calib_size), ("eval-size", eval_size), ("batch-size", batch_size)):
        if int(value) < 1:
            raise OptinError(f"--{flag} must be a positive number of examples, got {value}")
    options = dict(options or {})
    if reducer and not hasattr(registry.get("searcher", searcher), "removals"):
        # `optin run --scorer trajectory --reducer tome` is the paper's expanded configuration: the token
        # searcher prunes heads/neurons with PTF and then schedules tokens for the rest of the budget
        say(f"--reducer {reducer}: using searcher 'token-schedule' (PTF for heads/neurons, then tokens)")
        searcher = "token-schedule"
    selected = [("scorer", scorer), ("searcher", searcher)] + ([("reducer", reducer)] if reducer else [])
    registry.check_options(options, selected)  # unknown plugin names and option typos fail before any work
    token_scorer = None
    scorer_cls = registry.get("scorer", scorer)
    if isinstance(scorer_cls, type) and issubclass(scorer_cls, TokenScorer):
        token_scorer = registry.create("scorer", scorer, options)  # ranks tokens at run time, no unit scores
    plan = registry.create("searcher", searcher, options)
    if reducer and token_scorer is None and scorer == "trajectory" and getattr(plan, "schedule_kind", "") == "trajectory":
        options.setdefault("tokens", True)  # OPTIN A.9: the schedule needs token trajectories
        if not getattr(plan, "units", True):
            options.setdefault("kinds", [])  # tokens only: no head/neuron scores needed
    source = model or "minilm-trec"
    the_task = resolve_task(task, data, source)
    say(f"[bold]model[/bold] {source}   [bold]task[/bold] {the_task.name}   "
        f"[bold]scorer[/bold] {scorer}   [bold]searcher[/bold] {searcher}   [bold]budget[/bold] {budget}"
        + (f"   [bold]reducer[/bold] {reducer}" if reducer else ""))
    ad = load_model(source, adapter)
    if reducer is not None:
        require_tokens(ad, reducer)  # fail before any scoring work
    check_target(ad, the_task, source)
    n_labels = getattr(getattr(ad.model, "config", None), "num_labels", None)
    if n_labels is not None and the_task.metric != "agreement" and n_labels != the_task.num_labels \
            and not score_only:
        raise OptinError(f"model {source!r} predicts {n_labels} classes but task {the_task.name!r} has "
                         f"{the_task.num_labels} ({', '.join(the_task.labels)}); fine-tune it on this task first "
                         "(`optin finetune`)")
    ad.model.eval()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    calib = batches_of(ad, sample(the_task.examples("train"), calib_size, seed), calib_size)
    scorer_name = scorer
    t0 = time.perf_counter()
    scores: Scores | None = None
    seconds_scoring = 0.0
    if scores_file is not None:
        scores = Scores.load(scores_file)
        scores.check_matches(ad.name, fingerprint(ad.model), ad.unit_counts(), f"scores file {scores_file}")
        scorer_name = scores.scorer
    elif token_scorer is None:
        scores = score(ad, calib, scorer, options, seed, out / "scores.partial.safetensors")
        seconds_scoring = time.perf_counter() - t0
        scores.save(out / "scores.safetensors")
    if score_only:
        return {"scores": str(out / "scores.safetensors"), "seconds_scoring": seconds_scoring}

    evals = batches_of(ad, sample(the_task.examples("test"), eval_size, seed), batch_size)
    original = copy.deepcopy(ad)
    seq_len = ad.seq_len(evals)
    if scores is not None and any(t.numel() for v in scores.values.values() for t in v):
        masks, costs = search(ad, scores, budget, seq_len, searcher, options)
    else:  # token-only runs keep every head and neuron
        costs = ad.cost_model(seq_len)
        masks = {k: [torch.ones(n) for n in ns] for k, ns in ad.unit_counts().items()}
    ad.prune(masks)
    diff = _max_diff(original, masks, ad, evals[0])
    recalibrated = bool(recalibrate) and ad.recalibrate(calib)  # after the removal == masking check
    removals = None
    macs_after = costs.macs_of_masks(masks)
    if reducer is not None:
        removals = reduce_tokens(ad, reducer, budget, costs.macs(), searcher=searcher, options=options,
                                 token_importance=_token_importance(scores), token_scorer=token_scorer)
        macs_after = ad.cost_model(seq_len, removals=removals).macs()
    with bar("evaluating", total=2 * len(evals)) as (advance, _):
        metric_before = evaluate(original, evals, the_task.metric, original, advance)
        metric_after = evaluate(ad, evals, the_task.metric, original, advance)
    bench = evals[0]
    speed = throughput({"before": lambda: original.logits(bench), "after": lambda: ad.logits(bench)},
                       examples=ad.batch_size(bench), min_seconds=2.0)
    report = {
        "model": source, "adapter": ad.name, "task": the_task.name, "scorer": scorer_name,
        "searcher": searcher, "reducer": reducer, "budget": budget, "seed": seed,
        "calibration_examples": sum(ad.batch_size(b) for b in calib), "eval_examples": sum(ad.batch_size(b) for b in evals),
        "seq_len": seq_len, "metric": the_task.metric, "metric_before": metric_before, "metric_after": metric_after,
        "macs_before": costs.macs(), "macs_after": macs_after, "macs_ratio": macs_after / costs.macs(),
        "params_before": params(original.model), "params_after": params(ad.model),
        "throughput_before": speed["before"], "throughput_after": speed["after"],
        "speedup": speed["after"] / speed["before"], "throughput_batch": ad.batch_size(bench),
        "seconds_scoring": seconds_scoring, "seconds_total": time.perf_counter() - t_start,
        "max_abs_diff_vs_masked": diff, "recalibrated": recalibrated, "kept": kept_counts(masks), "total": counts_of(masks),
        "token_removals": removals, "options": options, "optin_version": __version__,
        "date": _dt.date.today().isoformat(),
    }
    save_pruned(ad, out / "model", {k: report[k] for k in ("model", "task", "scorer", "searcher", "budget")})
    (out / "report.json").write_text(json.dumps(report, indent=2))
    notify("done", report=report)
    return report
