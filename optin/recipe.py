"""The one recipe: load -> calibrate -> score -> search -> apply (mask, then remove) -> evaluate -> export.

Every step is a plain function usable from a notebook; ``run`` composes them, one named stage after the
other, over one ``RunConfig`` (the fields the CLI flags and the YAML keys set).
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__, registry
from .allocation import DEFAULT_ALLOCATION, MEASURED, Trial, candidate_scores, candidates_for, choose, judge, label, \
    parse_allocation, split_for_trial
from .contracts import Adapter, Batch, Scorer, ScoreContext, TokenAdapter, TokenScorer, TokenSearcher
from .degenerate import check_not_degenerate
from .errors import BudgetError, OptinError
from .devices import resolve_device, resolve_dtype, synchronize, to_device
from .distributed import leave_group, rank_and_world, reducer
from .export import save_pruned
from .hooks import notify
from .measure import evaluate, params, throughput
from .measured import forwards_needed, measured_scores, priced_kinds
from .outputs import MODEL, PARTIAL, REPORT, SCORES, OutputFolder
from .models import adapter_for, load_model, named_models
from .progress import bar, say
from .recovery import DEFAULT_RECOVER, DEFAULT_RECOVER_SIZE, parse_recover_size, parse_steps, recover as recover_masks, recovery_size, steps_for
from .rankings import Checkpoint, Scores, check_unit_tensors, fingerprint
from .tasks import Task, file_task, get_task, known_tasks, sample
from .units import CostModel, UnitTensors, counts_of, kept_counts, same_masks


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


def batches_of(adapter: Adapter, examples: list[dict], batch_size: int, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> list[Batch]:
    """``examples`` collated by the adapter into batches of ``batch_size`` (on ``device``, floating tensors in
    ``dtype``, when given)."""
    batches = [adapter.collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    if device is None and dtype is None:
        return batches
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    return [to_device(b, dev, dt) for b in batches]


def resolve_task(task: str | Task | None, data: str | None, model_source: str | None,
                 eval_data: str | None = None) -> Task:
    """The task: a Task, the user's ``data`` (with ``eval_data``, their own held-out split), a built-in
    task, or the named model's task."""
    if isinstance(task, Task):
        return task
    if eval_data and not data:
        raise OptinError("--eval-data is the held-out split of your own --data: pass --data FILE too (its examples "
                         "are used for calibration, the --eval-data examples only for evaluation)")
    if data:
        return file_task(data, eval_path=eval_data)
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


# --- scoring and search (the Python API) ------------------------------------------------------------
TOKEN_SCORES = (None, "also", "only")


def make_scorer(scorer: str, options: dict | None = None, token_scores: str | None = None) -> Scorer:
    """The scorer plugin ``scorer`` with its options; ``token_scores`` asks it to score token positions too
    ("also") or only ("only"), for a token searcher that needs them."""
    impl = registry.create("scorer", scorer, options)
    if token_scores is not None:
        if not impl.scores_tokens:
            raise OptinError(f"the token schedule needs per-token scores, which scorer {scorer!r} does not give; "
                             "use --scorer trajectory, or another schedule (--set schedule=constant)")
        impl.request_tokens(units=token_scores == "also")
    return impl


def score(adapter: Adapter, batches: list[Batch], scorer: str = "trajectory", options: dict | None = None,
          seed: int = 0, checkpoint: str | Path | None = None, token_scores: str | None = None) -> Scores:
    """Importance of every unit. With ``checkpoint`` an interrupted run resumes from the partial file."""
    impl = make_scorer(scorer, options, token_scores)
    if impl.needs_labels and any("labels" not in b and "masks" not in b for b in batches):
        raise OptinError(f"scorer {scorer!r} needs labelled calibration data")
    fp = fingerprint(adapter.model)
    rank, world = rank_and_world()  # several processes under torchrun: each does its share (optin.distributed)
    ckpt = None
    if checkpoint is not None:
        if world > 1:  # one resumable checkpoint per process
            checkpoint = Path(checkpoint).with_name(f"{Path(checkpoint).stem}.rank{rank}-of-{world}.safetensors")
        ckpt = Checkpoint(checkpoint, {"fingerprint": fp, "scorer": scorer, "options": impl.describe(),
                                       "seed": seed, "data": _batches_hash(batches), "rank": rank, "world": world})
        if ckpt.resumed:
            say(f"resuming scoring: {ckpt.resumed} partial results found in {checkpoint}")
    torch.manual_seed(seed)
    adapter.model.eval()
    device = next(iter(adapter.model.parameters())).device
    with bar(f"scoring ({scorer})" + (f" [process {rank + 1} of {world}]" if world > 1 else "")) as (advance, set_total):
        ctx = ScoreContext(seed=seed, checkpoint=ckpt, advance=advance, total=set_total, note=say, rank=rank,
                           world=world, reduce=reducer(device))
        try:
            values = impl.score(adapter, batches, ctx)
        except NotImplementedError as exc:
            raise OptinError(f"scorer {scorer!r} does not work with adapter {adapter.name!r}: {exc}") from exc
    check_unit_tensors(values, f"the scores from scorer {scorer!r}", "the model gives non-finite outputs or the "
                       "scorer is broken for it; check the model on a few examples, or try another --scorer")
    counts = adapter.unit_counts()
    wrong = {k: [int(t.numel()) for t in v] for k, v in values.items() if k not in counts or
             [int(t.numel()) for t in v] != counts[k]}
    if wrong:
        raise OptinError(f"scorer {scorer!r} returned scores for units {wrong} but the model has {counts}; the "
                         "scorer plugin is broken for this adapter (report it to its authors)")
    result = Scores(values=values, adapter=adapter.name, fingerprint=fp, scorer=scorer,
                    options=impl.describe(), extras=dict(impl.extras or {}), scale=impl.scale, seed=seed,
                    calibration_examples=sum(adapter.batch_size(b) for b in batches))
    if ckpt is not None:
        ckpt.discard()
    notify("stage", stage="scored", scorer=scorer)
    return result


def _search(adapter: Adapter, scores: Scores | UnitTensors, budget: float, seq_len: float, searcher: str,
            options: dict | None, allow_degenerate: bool = False, alpha: float = 0.0) -> tuple[UnitTensors, CostModel]:
    values, scale = (scores.values, scores.scale) if isinstance(scores, Scores) else (scores, "global")
    costs = adapter.cost_model(seq_len)
    accepted = registry.option_names(registry.get("searcher", searcher))
    options = {**{k: v for k, v in adapter.search_defaults.items() if k in accepted}, **(options or {})}
    impl = registry.create("searcher", searcher, options)
    masks = impl.search(candidate_scores(values, scale, costs, alpha), costs, budget)
    limit = impl.unit_budget_for(budget)  # token searchers leave a part of the budget to tokens
    got = costs.macs_of_masks(masks)
    if got > limit * costs.macs() * (1 + 1e-9):
        raise BudgetError(f"searcher {searcher!r} returned masks with {got / costs.macs():.3f} of the MACs, "
                          f"above its budget {limit}")
    check_not_degenerate(masks, costs, budget, allow_degenerate)
    return masks, costs


def search(adapter: Adapter, scores: Scores | UnitTensors, budget: float, seq_len: float,
           searcher: str = "ptf", options: dict | None = None, allow_degenerate: bool = False,
           allocation: float = 0.0) -> tuple[UnitTensors, CostModel]:
    """Keep-masks that fit ``budget`` x the unpruned MACs (scores brought to one scale first). A result that
    removes every unit of a layer or of a kind (``optin.degenerate``) is refused unless ``allow_degenerate``.
    ``allocation`` (a blend in [0, 1], ``optin.allocation``) moves how many units each layer keeps from the
    scores' allocation (0) toward the cost model's (1); which units a layer keeps stays the scores' choice."""
    alpha = parse_allocation(allocation)
    if isinstance(alpha, str):
        raise OptinError("search(allocation=...) takes a blend in [0, 1]; 'evaluate' needs the model and data: "
                         "use optin.prune(..., allocation='evaluate')")
    return _search(adapter, scores, check_budget(budget), seq_len, searcher, options, allow_degenerate, alpha)


def allocate(adapter: Adapter, scores: Scores, budget: float, seq_len: float, searcher: str, options: dict | None,
             allow_degenerate: bool, allocation: str | float, calib: list[Batch], steps: tuple[str, ...],
             recalibrate: bool = True) -> tuple[UnitTensors, CostModel, dict]:
    """The search with the allocation ``allocation`` (``optin.allocation``): a fixed blend, the measured
    allocation (``optin.measured``, on ``calib``), or (``"evaluate"``) the candidate of ``CANDIDATES`` (``BLENDS``
    for ``"evaluate-blends"``) whose recovered, pruned model stays closest to the unpruned one on held-out
    calibration examples (the first within ``MARGIN`` of the closest, ``choose``). Returns the masks, the cost
    model and what was tried."""
    how = parse_allocation(allocation)
    if how == MEASURED:
        masks, costs = _candidate(adapter, scores, budget, seq_len, searcher, options, allow_degenerate, how, calib)
        return masks, costs, {"allocation": how, "alpha": how}
    candidates = candidates_for(how)
    if candidates is None:
        alpha = 0.0 if how == "scores" else float(how)
        masks, costs = _search(adapter, scores, budget, seq_len, searcher, options, allow_degenerate, alpha)
        return masks, costs, {"allocation": how, "alpha": alpha}
    fit, check = split_for_trial(calib, adapter.batch_size)
    with torch.no_grad():
        reference = [adapter.logits(b) for b in check]
    trials: list[Trial] = []
    costs = None
    with bar("choosing the allocation", total=len(candidates)) as (advance, _):
        for candidate in candidates:
            try:
                masks, costs = _candidate(adapter, scores, budget, seq_len, searcher, options, allow_degenerate,
                                          candidate, fit)
            except BudgetError as exc:
                trials.append(Trial(candidate, None, error=str(exc)))
                say(f"allocation {label(candidate)}: not a candidate ({exc})")
                advance(1)
                continue
            same = next((t for t in trials if t.masks is not None and same_masks(t.masks, masks)), None)
            value = same.divergence if same is not None else \
                judge(adapter, masks, fit, check, steps, recalibrate, reference)
            trials.append(Trial(candidate, masks, value))
            say(f"allocation {label(candidate)}: held-out divergence {value:.4g}")
            advance(1)
    if all(t.masks is None for t in trials):
        raise BudgetError(trials[0].error)
    best = choose(trials)
    say(f"allocation: kept {label(best.alpha)} (blend 0 = the scores' own allocation)")
    return best.masks, costs, {"allocation": how, "alpha": best.alpha,
                               "trials": [t.record() for t in trials]}


def _candidate(adapter: Adapter, scores: Scores, budget: float, seq_len: float, searcher: str, options: dict | None,
               allow_degenerate: bool, candidate: float | str, batches: list[Batch]) -> tuple[UnitTensors, CostModel]:
    """The search for one candidate allocation: a blend of ``scores``, or ``MEASURED`` (the scores' order,
    each layer rescaled by its measured removal curve on ``batches``)."""
    if candidate != MEASURED:
        return _search(adapter, scores, budget, seq_len, searcher, options, allow_degenerate, float(candidate))
    values = scores.values if isinstance(scores, Scores) else scores
    priced = priced_kinds(adapter, values)
    with bar("measuring each layer's removal curve", total=forwards_needed(priced)) as (advance, _):
        measured = measured_scores(adapter, priced, batches, advance)
    return _search(adapter, {**values, **measured}, budget, seq_len, searcher, options, allow_degenerate, 0.0)


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
          checkpoint: str | Path | None = None, allow_degenerate: bool = False,
          recover: str = DEFAULT_RECOVER, allocation: str | float = DEFAULT_ALLOCATION) -> PruneResult:
    """Prune ``model`` in place to ``budget`` of its MACs using calibration batches ``data``.

    ``scores`` (a Scores object or a saved scores file) skips scoring: the same scores serve any budget.
    A degenerate result (every unit of a layer or a kind removed) is refused unless ``allow_degenerate``.
    ``recover`` (as ``optin run --recover``: ``auto``, ``none``, ``ptf`` or steps of rearrange/tune/reconstruct)
    runs on the masked model before removal, from ``data``; what it did is in ``info["recovery"]``. Recovery
    fits on ``data`` alone, where ``optin run`` may draw more examples (``--recover-size auto``: a CNN's last
    convolutions on small maps need hundreds of images); ``info["recovery"]["wanted"]`` says how many that
    rule would have used.
    ``allocation`` (as ``optin run --allocation``: ``scores``, ``evaluate``, ``evaluate-blends``, ``measured`` or a
    blend in [0, 1]) decides how many units each layer keeps (``optin.allocation``, ``optin.measured``); what was
    tried is in ``info["allocation"]``.
    """
    parse_steps(recover)
    parse_allocation(allocation)
    budget = check_budget(budget)
    ad = as_adapter(model, processor, adapter)
    if scores is None:
        scores = score(ad, data, scorer, options, seed, checkpoint)
    elif not isinstance(scores, Scores):
        scores = Scores.load(scores)
        scores.check_matches(ad.name, fingerprint(ad.model), ad.unit_counts())
    seq_len = ad.seq_len(data)
    steps, _ = steps_for(recover, ad)
    masks, costs, allocated = allocate(ad, scores, budget, seq_len, searcher, options, allow_degenerate, allocation,
                                       data, steps, recalibrate=False)
    recovery: dict = {"steps": [], "layers": []}
    if steps:
        wanted, _ = recovery_size(ad, masks, data, "auto")
        masks, recovery = recover_masks(ad, copy.deepcopy(ad), masks, data, steps)
        recovery["wanted"] = wanted
    ad.prune(masks)
    return PruneResult(ad, masks, scores, costs.macs(), costs.macs_of_masks(masks),
                       {"seq_len": seq_len, "kept": kept_counts(masks), "recovery": recovery,
                        "allocation": allocated})


def check_target(adapter: Adapter, task: Task, source: str) -> None:
    """A segmentation model needs a segmentation task and a classifier a classification task."""
    if adapter.output == task.target:
        return
    what = {"classes": "classification", "segmentation": "segmentation"}
    fitting = sorted(n for n, t in known_tasks().items() if t.target == adapter.output)
    raise OptinError(f"model {source!r} is a {what.get(adapter.output, adapter.output)} model (adapter "
                     f"{adapter.name!r}) but task {task.name!r} is a {what.get(task.target, task.target)} task; "
                     f"use a {what.get(adapter.output, adapter.output)} task: {', '.join(fitting) or 'none installed'}")


def check_examples(adapter: Adapter, task: Task, source: str) -> None:
    """The adapter must be able to batch the task's examples (a text file given to an image model is refused
    in one line instead of a KeyError deep in ``collate``)."""
    first = task.examples("train")[:1] or task.examples("test")[:1]
    if not first:
        raise OptinError(f"task {task.name!r} has no examples; give a data file with rows")
    try:
        adapter.collate(first)
    except OptinError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        fields = ", ".join(sorted(first[0])) or "none"
        need = f"a field {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else f"other examples ({exc})"
        kinds = sorted(n for n, t in known_tasks().items() if t.target == adapter.output and t.kind != task.kind)
        raise OptinError(f"model {source!r} (adapter {adapter.name!r}) cannot read the examples of task {task.name!r}: "
                         f"they have fields {fields} but it needs {need}; --data takes text (columns text,label) or "
                         "images (a class folder, a CSV/JSONL with columns image,label, a segmentation folder): use "
                         f"data of this model's kind{' (or ' + ', '.join(kinds) + ')' if kinds else ''}") \
            from None


def require_tokens(adapter: Adapter, reducer: str) -> TokenAdapter:
    """A token reducer needs an adapter with tokens (checked before scoring, and again when installing)."""
    if not isinstance(adapter, TokenAdapter):
        with_tokens = [i.name for i in registry.plugins("adapter")
                       if i.available and isinstance(registry.get("adapter", i.name), type)
                       and issubclass(registry.get("adapter", i.name), TokenAdapter)]
        raise OptinError(f"--reducer {reducer}: adapter {adapter.name!r} has no tokens to reduce; token reducers "
                         f"work with the adapters that have tokens ({', '.join(with_tokens) or 'none installed'})")
    return adapter


def token_searcher(searcher: str, options: dict | None = None) -> TokenSearcher:
    """The searcher plugin ``searcher``, which must also schedule tokens."""
    impl = registry.create("searcher", searcher, options)
    if not isinstance(impl, TokenSearcher):
        raise OptinError(f"--reducer needs a token searcher (e.g. --searcher token-schedule); {searcher!r} "
                         "only chooses heads/neurons")
    return impl


def reduce_tokens(adapter: Adapter, reducer: str, budget: float, macs_before: float, *, searcher: str = "token-schedule",
                  options: dict | None = None, token_importance: torch.Tensor | None = None,
                  token_scorer: TokenScorer | None = None) -> list[int]:
    """Install a token reducer on a schedule whose MACs fit ``budget * macs_before`` (after any
    head/neuron pruning already applied); returns the tokens removed per block."""
    ad = require_tokens(adapter, reducer)
    options = {**(token_scorer.method_options() if token_scorer is not None else {}), **(options or {})}
    impl = registry.create("reducer", reducer, options)
    plan = token_searcher(searcher, options)
    if impl.needs_importance and token_scorer is None:
        raise OptinError(f"reducer {reducer!r} drops tokens by importance: use a token scorer, e.g. --scorer wpr")
    if plan.needs_token_scores() and token_importance is None:
        raise OptinError(f"searcher {searcher!r} schedules tokens from per-token scores and none were given: "
                         "score with --scorer trajectory (it scores tokens for this searcher), or pick a schedule "
                         "that needs none (--set schedule=constant)")
    n_layers = len(next(iter(ad.unit_counts().values())))
    removals = plan.removals(ad.n_tokens, ad.protected, n_layers,
                             lambda rem: ad.cost_model(removals=rem).macs(), budget * macs_before, token_importance)
    ad.install_reducer(impl, removals, token_scorer)
    return list(ad.removals)  # as installed (a schedule never removes the last non-protected token)


def _token_importance(scores: Scores | None) -> torch.Tensor | None:
    tokens = (scores.extras.get("tokens") or {}).get("tokens") if scores is not None else None
    return torch.stack(tokens) if tokens else None


# --- the CLI's job, in stages ---------------------------------------------------------------------
@dataclass
class RunConfig:
    """What ``optin run`` / ``score`` / ``prune`` do: the fields their flags and YAML keys set."""

    model: str | None = None
    task: str | Task | None = None
    data: str | None = None
    eval_data: str | None = None  # the user's own held-out split (then all of ``data`` is for calibration)
    checkpoint: str | None = None  # a weights file for an architecture named without weights (timm:NAME)
    scorer: str = "trajectory"
    searcher: str = "ptf"
    reducer: str | None = None
    budget: float = 0.6
    output: str | Path = "optin-output"
    scores_file: str | Path | None = None
    seed: int = 0
    calib_size: int = 128
    eval_size: int = 1000
    batch_size: int = 64
    adapter: str | None = None
    options: dict = field(default_factory=dict)
    score_only: bool = False
    recalibrate: bool = True
    overwrite: bool = False  # replace the outputs of a previous run in ``output``
    allow_degenerate: bool = False  # accept a search result that empties a layer or a kind, or removes every unit
    device: str = "cpu"
    dtype: str = "float32"
    recover: str = DEFAULT_RECOVER  # recovery after the search: auto, none, ptf, or rearrange/tune/reconstruct (comma-separated)
    allocation: str | float = DEFAULT_ALLOCATION  # units per layer: scores, evaluate(-blends), measured, or a blend
    recover_size: str | int = DEFAULT_RECOVER_SIZE  # examples recovery uses: auto, calibration, or a number (recovery.recovery_size)

    def checked(self) -> "RunConfig":
        """A copy with the budget and sizes validated (the only place a run checks them)."""
        cfg = copy.copy(self)
        cfg.budget = check_budget(self.budget)
        for flag, value in (("calib-size", self.calib_size), ("eval-size", self.eval_size),
                            ("batch-size", self.batch_size)):
            if int(value) < 1:
                raise OptinError(f"--{flag} must be a positive number of examples, got {value}")
        cfg.options = dict(self.options or {})
        cfg.model = self.model or "minilm-trec"
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        parse_steps(self.recover)
        cfg.allocation = parse_allocation(self.allocation)
        cfg.recover_size = parse_recover_size(self.recover_size)
        return cfg


@dataclass
class Plugins:
    """The plugins a run uses, resolved and checked before any work."""

    searcher: str
    token_scorer: TokenScorer | None
    token_scores: str | None  # what the token searcher asks of the unit scorer (see TOKEN_SCORES)


def choose_plugins(cfg: RunConfig) -> Plugins:
    """Resolve the searcher (a reducer needs a token searcher), check every plugin option against the
    selected plugins, and find out what the token searcher needs from the scorer."""
    searcher = cfg.searcher
    if cfg.reducer and not issubclass(registry.get("searcher", searcher), TokenSearcher):
        # `optin run --scorer trajectory --reducer tome` is the paper's expanded configuration: the token
        # searcher prunes heads/neurons with PTF and then schedules tokens for the rest of the budget
        say(f"--reducer {cfg.reducer}: using searcher 'token-schedule' (PTF for heads/neurons, then tokens)")
        searcher = "token-schedule"
    selected = [("scorer", cfg.scorer), ("searcher", searcher)] + ([("reducer", cfg.reducer)] if cfg.reducer else [])
    registry.check_options(cfg.options, selected)  # unknown plugin names and option typos fail before any work
    scorer_cls = registry.get("scorer", cfg.scorer)
    token_scorer = registry.create("scorer", cfg.scorer, cfg.options) \
        if isinstance(scorer_cls, type) and issubclass(scorer_cls, TokenScorer) else None
    token_scores = None
    if cfg.reducer and token_scorer is None:
        plan = token_searcher(searcher, cfg.options)
        if plan.needs_token_scores():
            token_scores = "also" if plan.prunes_units() else "only"
    return Plugins(searcher, token_scorer, token_scores)


def load_stage(cfg: RunConfig) -> tuple[Adapter, Task]:
    """The model (in eval mode) and the task, checked against each other."""
    the_task = resolve_task(cfg.task, cfg.data, cfg.model, cfg.eval_data)
    say(f"[bold]model[/bold] {cfg.model}   [bold]task[/bold] {the_task.name}   "
        f"[bold]scorer[/bold] {cfg.scorer}   [bold]searcher[/bold] {cfg.searcher}   [bold]budget[/bold] {cfg.budget}"
        + (f"   [bold]reducer[/bold] {cfg.reducer}" if cfg.reducer else ""))
    ad = load_model(cfg.model, cfg.adapter, cfg.checkpoint)
    the_task.prepare(ad, cfg.model)  # image files: decoded with the model's preprocessing
    if cfg.reducer is not None:
        require_tokens(ad, cfg.reducer)  # fail before any scoring work
    check_target(ad, the_task, cfg.model)
    check_examples(ad, the_task, cfg.model)
    n_labels = ad.num_classes()
    if n_labels is not None and the_task.metric != "agreement" and n_labels != the_task.num_labels \
            and not cfg.score_only:
        raise OptinError(f"model {cfg.model!r} predicts {n_labels} classes but task {the_task.name!r} has "
                         f"{the_task.num_labels} ({', '.join(the_task.labels)}); fine-tune it on this task first "
                         "(`optin finetune`)")
    ad.model.to(device=resolve_device(cfg.device), dtype=resolve_dtype(cfg.dtype)).eval()
    return ad, the_task


def calibration_stage(ad: Adapter, task: Task, cfg: RunConfig) -> list[Batch]:
    """One batch of ``calib_size`` training examples drawn with the run's seed."""
    return batches_of(ad, _calibration_examples(task.examples("train"), cfg), cfg.calib_size, cfg.device, cfg.dtype)


def _calibration_examples(pool: list, cfg: RunConfig) -> list:
    """Which of the training examples ``pool`` are the run's calibration sample."""
    return sample(pool, cfg.calib_size, cfg.seed)


def more_calibration(ad: Adapter, task: Task, cfg: RunConfig) -> Callable[[int], list[Batch]]:
    """A function giving up to ``n`` more training examples, not in the calibration sample, drawn with the
    run's seed (in batches of ``calib_size``): what recovery adds when the calibration sample is too small."""
    def more(n: int) -> list[Batch]:
        pool = task.examples("train")
        taken = {id(e) for e in _calibration_examples(pool, cfg)}
        rest = [e for e in pool if id(e) not in taken]
        return batches_of(ad, sample(rest, n, cfg.seed), cfg.calib_size, cfg.device, cfg.dtype)
    return more


def score_stage(ad: Adapter, calib: list[Batch], cfg: RunConfig, plugins: Plugins, out: Path
                ) -> tuple[Scores | None, float]:
    """Scores from ``scores_file`` (checked against the model) or computed (resumably) and saved; None for a
    run-time token scorer. Returns the scores and the seconds spent scoring."""
    if cfg.scores_file is not None:
        scores = Scores.load(cfg.scores_file)
        scores.check_matches(ad.name, fingerprint(ad.model), ad.unit_counts(), f"scores file {cfg.scores_file}")
        return scores, 0.0
    if plugins.token_scorer is not None:
        return None, 0.0
    t0 = time.perf_counter()
    scores = score(ad, calib, cfg.scorer, cfg.options, cfg.seed, Path(cfg.output) / PARTIAL,  # survives a crash
                   plugins.token_scores)
    seconds = time.perf_counter() - t0
    scores.save(out / SCORES)
    return scores, seconds


def search_stage(ad: Adapter, scores: Scores | None, cfg: RunConfig, plugins: Plugins, seq_len: float,
                 calib: list[Batch]) -> tuple[UnitTensors, CostModel, dict]:
    """Keep-masks under the budget with the run's allocation (tried on ``calib`` for ``evaluate``), the cost
    model and what the allocation did; every unit kept when there are no unit scores (token-only runs)."""
    if scores is not None and any(t.numel() for v in scores.values.values() for t in v):
        steps, _ = steps_for(cfg.recover, ad)
        return allocate(ad, scores, cfg.budget, seq_len, plugins.searcher, cfg.options, cfg.allow_degenerate,
                        cfg.allocation, calib, steps, cfg.recalibrate)
    if scores is not None and cfg.reducer is None:
        raise OptinError(f"the scores ({cfg.scores_file or cfg.scorer}) hold only token scores, no head/neuron scores, "
                         "so nothing could be pruned to the budget: add a token reducer (--reducer tome|prune), or "
                         "score heads and neurons too (e.g. optin score without --set units=false)")
    return {k: [torch.ones(n) for n in ns] for k, ns in ad.unit_counts().items()}, ad.cost_model(seq_len), {}


def apply_stage(ad: Adapter, masks: UnitTensors, calib: list[Batch], check: Batch, cfg: RunConfig,
                more: Callable[[int], list[Batch]] | None = None) -> tuple[Adapter, UnitTensors, dict]:
    """Recover (``cfg.recover``: PTF's rearrangement/tuning or least-squares reconstruction, on the masked
    model), physically remove the masked units (in place), check the result against the recovered masked
    model on ``check``, then re-estimate stale statistics. Recovery and re-estimation use the calibration
    sample, plus ``more(n)`` examples where ``cfg.recover_size`` asks for more (``recovery.recovery_size``).
    Returns the unpruned original, the final masks (rearrangement may change which units go) and what was done."""
    original = copy.deepcopy(ad)
    steps, note = steps_for(cfg.recover, ad)
    if note:
        say(note)
    t0 = time.perf_counter()
    data = calib
    if steps:
        have = sum(ad.batch_size(b) for b in calib)
        want, why = recovery_size(ad, masks, calib, cfg.recover_size)
        if want > have and more is not None:
            data = calib + more(want - have)
            got = sum(ad.batch_size(b) for b in data)
            say(f"recovery: {got} examples ({why}" + (f"; the data has {got}" if got < want else "") + ")")
        with bar(f"recovering ({', '.join(steps)})", total=None) as (advance, _):
            masks, recovery = recover_masks(ad, original, masks, data, steps, advance=advance)
        recovery["examples"] = sum(ad.batch_size(b) for b in data)
        recovery["examples_why"] = why
    else:
        recovery = {"steps": [], "layers": []}
    recovery["seconds"] = time.perf_counter() - t0
    with torch.no_grad(), ad.masked(masks):
        expected = ad.logits(check)
    ad.prune(masks)
    with torch.no_grad():
        diff = float((ad.logits(check) - expected).abs().max())
    recalibrated = bool(cfg.recalibrate) and ad.recalibrate(data)  # after the removal == masking check
    return original, masks, {"max_abs_diff_vs_masked": diff, "recalibrated": recalibrated,
                             "recover": list(steps), "recovery": recovery}


def token_stage(ad: Adapter, scores: Scores | None, cfg: RunConfig, plugins: Plugins, costs: CostModel,
                seq_len: float) -> tuple[list[int] | None, float]:
    """Install the token reducer for the rest of the budget; returns the removals and the MACs after."""
    macs_after = None
    if cfg.reducer is None:
        return None, macs_after
    removals = reduce_tokens(ad, cfg.reducer, cfg.budget, costs.macs(), searcher=plugins.searcher,
                             options=cfg.options, token_importance=_token_importance(scores),
                             token_scorer=plugins.token_scorer)
    return removals, require_tokens(ad, cfg.reducer).cost_model(seq_len, removals=removals).macs()


def evaluate_stage(original: Adapter, ad: Adapter, evals: list[Batch], task: Task, device: str = "cpu") -> dict:
    """The task's metric before and after, and the measured throughput of both on one batch."""
    with bar("evaluating", total=2 * len(evals)) as (advance, _):
        before = evaluate(original, evals, task.metric, original, advance)
        after = evaluate(ad, evals, task.metric, original, advance)
    bench = evals[0]
    speed = throughput({"before": lambda: original.logits(bench), "after": lambda: ad.logits(bench)},
                       examples=ad.batch_size(bench), min_seconds=2.0, sync=lambda: synchronize(resolve_device(device)))
    return {"metric_before": before, "metric_after": after, "throughput_before": speed["before"],
            "throughput_after": speed["after"], "speedup": speed["after"] / speed["before"],
            "throughput_batch": ad.batch_size(bench)}


def provenance(cfg: RunConfig, scores: Scores | None) -> dict:
    """What a run's scores were made with, for its report and plan: the scorer's options and calibration size
    and seed (read from the scores file when pruning from one), and the options given to this run."""
    if scores is None:
        return {"scorer_options": {}, "scores_file": None}
    out = {"scorer_options": scores.options, "scores_seed": scores.seed,
           "scores_file": str(cfg.scores_file) if cfg.scores_file is not None else None}
    if cfg.scores_file is not None:  # `optin prune`: the options and calibration size are the scores file's
        out["options"] = {**scores.options, **cfg.options}
        out["calibration_examples"] = scores.calibration_examples
    return out


# What the plan (``optin-plan.json`` "info") records about the run that made the pruned model.
PLAN_RECORD = ("model", "task", "scorer", "searcher", "reducer", "budget", "seed", "options", "scorer_options",
               "calibration_examples", "scores_file", "scores_seed")


def export_stage(ad: Adapter, report: dict, out: Path) -> None:
    """Write the pruned model and ``report.json``."""
    save_pruned(ad, out / "model", {k: report.get(k) for k in PLAN_RECORD})
    (out / "report.json").write_text(json.dumps(report, indent=2))


def run(model: str | None = None, **fields: Any) -> dict:
    """The CLI's job: prune ``model`` on its task and write the pruned model and ``report.json``
    (keyword arguments: the fields of ``RunConfig``)."""
    return run_config(RunConfig(model=model, **fields))


def run_config(config: RunConfig) -> dict:
    """``run`` for a ``RunConfig``: the stages in order. The outputs are written into a staging folder and
    moved into ``output`` only when the run succeeds; a folder holding a previous run's outputs is refused
    unless ``overwrite``, and one in use by another run always (``optin.outputs.OutputFolder``)."""
    t_start = time.perf_counter()
    cfg = config.checked()
    plugins = choose_plugins(cfg)
    rank, world = rank_and_world()
    try:
        if rank > 0:  # torchrun: the other processes only score their share; rank 0 writes every output
            return score_share(cfg, plugins)
        with OutputFolder(cfg.output, outputs_of(cfg), cfg.overwrite) as staging:
            return run_stages(cfg, plugins, staging, t_start)
    finally:
        if world > 1:
            leave_group()


def score_share(cfg: RunConfig, plugins: Plugins) -> dict:
    """A process of rank > 0 under torchrun: its share of the scoring (resumable in its own checkpoint in
    ``output``), added to the others' by the all-reduce inside scoring; no other output."""
    if cfg.scores_file is not None or plugins.token_scorer is not None:
        return {"rank": rank_and_world()[0], "seconds_scoring": 0.0}
    ad, the_task = load_stage(cfg)
    calib = calibration_stage(ad, the_task, cfg)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    score(ad, calib, cfg.scorer, cfg.options, cfg.seed, Path(cfg.output) / PARTIAL, plugins.token_scores)
    return {"rank": rank_and_world()[0], "seconds_scoring": time.perf_counter() - t0}


def outputs_of(cfg: RunConfig) -> tuple[str, ...]:
    """The outputs a run writes: scores unless it reads them from a file; the model and report unless it only
    scores."""
    scores = () if cfg.scores_file is not None else (SCORES,)
    return scores if cfg.score_only else (*scores, MODEL, REPORT)


def run_stages(cfg: RunConfig, plugins: Plugins, out: Path, t_start: float) -> dict:
    """The stages of ``run_config`` after the plugins are chosen, writing into ``out`` (the staging folder)."""
    ad, the_task = load_stage(cfg)
    calib = calibration_stage(ad, the_task, cfg)
    scores, seconds_scoring = score_stage(ad, calib, cfg, plugins, out)
    if cfg.score_only:
        return {"scores": str(Path(cfg.output) / SCORES), "seconds_scoring": seconds_scoring}
    evals = batches_of(ad, sample(the_task.examples("test"), cfg.eval_size, cfg.seed), cfg.batch_size, cfg.device,
                       cfg.dtype)
    seq_len = ad.seq_len(evals)
    masks, costs, allocated = search_stage(ad, scores, cfg, plugins, seq_len, calib)
    original, masks, applied = apply_stage(ad, masks, calib, evals[0], cfg, more_calibration(ad, the_task, cfg))
    removals, token_macs = token_stage(ad, scores, cfg, plugins, costs, seq_len)
    macs_after = token_macs if token_macs is not None else costs.macs_of_masks(masks)
    measured = evaluate_stage(original, ad, evals, the_task, cfg.device)
    report = {
        "model": cfg.model, "adapter": ad.name, "task": the_task.name, "eval_split": the_task.eval_split,
        "scorer": scores.scorer if scores is not None else cfg.scorer, "searcher": plugins.searcher,
        "reducer": cfg.reducer, "budget": cfg.budget, "seed": cfg.seed,
        "calibration_examples": sum(ad.batch_size(b) for b in calib),
        "eval_examples": sum(ad.batch_size(b) for b in evals), "seq_len": seq_len, "metric": the_task.metric,
        "metric_before": measured["metric_before"], "metric_after": measured["metric_after"],
        "macs_before": costs.macs(), "macs_after": macs_after, "macs_ratio": macs_after / costs.macs(),
        "params_before": params(original.model), "params_after": params(ad.model),
        **{k: measured[k] for k in ("throughput_before", "throughput_after", "speedup", "throughput_batch")},
        "seconds_scoring": seconds_scoring, "seconds_total": time.perf_counter() - t_start, **applied,
        "kept": kept_counts(masks), "total": counts_of(masks), "token_removals": removals,
        "allocation": allocated, "options": cfg.options, "device": cfg.device, "dtype": cfg.dtype, "optin_version": __version__, "date": _dt.date.today().isoformat(),
        **provenance(cfg, scores),  # for --scores: what the scores were made with (overrides the keys above)
    }
    export_stage(ad, report, out)
    notify("done", report=report)
    return report


def config_fields() -> list[str]:
    """The names of ``RunConfig``'s fields (what ``run`` accepts)."""
    return list(asdict(RunConfig()))
