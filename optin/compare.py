"""``optin compare``: one model, several scorers x budgets x recovery settings (x token reducers), repeated
over calibration seeds, on one fixed held-out sample.

Built from the recipe's stages (``optin.recipe``): the model is loaded once; for each seed the calibration
sample of that seed is drawn; for each scorer the scores are computed once per seed and saved under
``DIR/scores/`` (reused when a later run finds them valid for the model); each budget x recovery (x
reducer) is searched, applied to a fresh copy of the unpruned model, and evaluated on the SAME held-out
examples (the sample of ``optin run --seed 0``) keeping every example's result, so configurations are
compared on paired examples (``optin.stats``). Each finished cell is one line appended to
``DIR/cells.jsonl``; a rerun skips the cells found there, so a comparison interrupted by Ctrl-C or a kill
resumes. ``DIR/compare.json``, ``compare.md`` and ``compare.png`` are written at the end
(``optin.compare_report``).

The core never names a plugin: every scorer, recovery setting and reducer comes from the caller.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from filelock import FileLock, Timeout

from . import __version__, registry, stats
from .allocation import BLENDS, DEFAULT_ALLOCATION, EVALUATE_BLENDS, candidates_for, parse_allocation
from .compare_report import write_outputs, write_text_atomic
from .contracts import Adapter, Batch
from .devices import resolve_device, synchronize
from .errors import OptinError
from .measure import metric_of_examples, params, per_example, timings
from .outputs import lock_path
from .progress import bar, say
from .rankings import Scores, fingerprint
from .recovery import DEFAULT_RECOVER, DEFAULT_RECOVER_SIZE, parse_recover_size
from .recipe import (Plugins, RunConfig, apply_stage, batches_of, calibration_stage, check_budget, choose_plugins,
                     load_stage, make_scorer, more_calibration, require_tokens, score, search_stage, token_stage)
from .tasks import Task, sample
from .units import kept_counts

EVAL_SEED = 0  # the held-out sample of `optin run --seed 0`, the same for every seed and configuration
CELLS = "cells.jsonl"
SCORES_DIR = "scores"
OUTPUTS = ("compare.json", "compare.md", "compare.png")
# What the cells of a folder depend on besides the grid: a rerun with other values is refused.
SETTINGS = ("model", "adapter", "task", "data", "eval_data", "extra", "metric", "calib_size", "eval_size",
            "batch_size", "searcher", "options", "device", "dtype", "recalibrate", "allow_degenerate", "speed",
            "fingerprint", "eval_examples", "allocation", "recover_size", "allocation_candidates")
# what folders journalled before a setting existed used
SETTING_DEFAULTS = {"allocation": "scores", "recover_size": "calibration"}
# before the measured candidate (2026-11-30), ``evaluate`` tried the blends only: ``--allocation evaluate-blends``
OLD_CANDIDATES = {"evaluate": list(BLENDS)}


@dataclass
class CompareConfig:
    """What ``optin compare`` does: the grid (scorers, budgets, seeds, recovery settings, reducers) and the
    settings shared by every cell."""

    model: str | None = None
    task: str | Task | None = None
    data: str | None = None
    eval_data: str | None = None  # the user's own held-out split (with --data)
    adapter: str | None = None
    scorers: list[str] = field(default_factory=list)
    budgets: list[float] = field(default_factory=lambda: [0.6])
    seeds: list[int] = field(default_factory=lambda: [0])
    recover: list[str] = field(default_factory=lambda: [DEFAULT_RECOVER])
    reducers: list[str | None] = field(default_factory=lambda: [None])  # None: no token reducer
    reference: str | None = None  # the scorer paired differences are taken against (default: the first)
    searcher: str = "ptf"
    calib_size: int = 128
    eval_size: int = 1000
    batch_size: int = 64
    output: str | Path = "optin-compare"
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    recalibrate: bool = True
    allocation: str | float = DEFAULT_ALLOCATION  # units per layer, as `optin run --allocation` (every cell)
    recover_size: str | int = DEFAULT_RECOVER_SIZE  # examples recovery uses, as `optin run --recover-size` (every cell)
    allow_degenerate: bool = False
    speed: bool = True  # time every pruned model of the first seed against the unpruned one
    speed_warmup: int = 3
    speed_repeats: int = 20
    resamples: int = stats.RESAMPLES
    level: float = stats.LEVEL
    overwrite: bool = False  # discard the cells, scores and outputs of a previous comparison in ``output``
    extra: dict = field(default_factory=dict)  # further ``RunConfig`` fields for every cell (e.g. checkpoint)


# --- validation (everything before any work) ----------------------------------------------------------
def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


@dataclass
class Combination:
    """One scorer x reducer x recovery setting: its run configuration (budget and seed set per cell) and
    resolved plugins."""

    scorer: str
    reducer: str | None
    recover: str
    run: RunConfig
    plugins: Plugins


def check(config: CompareConfig) -> tuple[CompareConfig, list[Combination]]:
    """A validated copy of ``config`` and its combinations; bad input raises OptinError before any work."""
    cfg = copy.copy(config)
    cfg.scorers = _unique([str(s) for s in cfg.scorers])
    if not cfg.scorers:
        raise OptinError("give at least one scorer to compare: --scorers A B ... (see `optin list`)")
    if not cfg.budgets:
        raise OptinError("give at least one budget: --budgets 0.9 0.6 ...")
    cfg.budgets = _unique([check_budget(b) for b in cfg.budgets])
    if not cfg.seeds:
        raise OptinError("give at least one calibration seed: --seeds 0 1 2")
    try:
        cfg.seeds = _unique([int(s) for s in cfg.seeds])
    except (TypeError, ValueError):
        raise OptinError(f"--seeds must be integers, got {list(config.seeds)}") from None
    cfg.recover = _unique([str(r) for r in cfg.recover]) or [DEFAULT_RECOVER]
    cfg.reducers = _unique([None if r in (None, "", "none") else str(r) for r in cfg.reducers]) or [None]
    cfg.reference = cfg.reference or cfg.scorers[0]
    if cfg.reference not in cfg.scorers:
        raise OptinError(f"--reference {cfg.reference!r} is not one of the compared scorers "
                         f"({', '.join(cfg.scorers)}); pass one of them")
    if int(cfg.resamples) < 1 or not 0.0 < float(cfg.level) < 1.0:
        raise OptinError(f"need at least one resample and a level in (0, 1), got {cfg.resamples}, {cfg.level}")
    for name in cfg.scorers:
        registry.get("scorer", name)  # unknown names fail here, with the known ones listed
    for name in cfg.reducers:
        if name is not None:
            registry.get("reducer", name)
    options = dict(cfg.options or {})
    shared = {f.name for f in dataclasses.fields(RunConfig)} & {f.name for f in dataclasses.fields(CompareConfig)}
    shared -= {"options", "overwrite", "recover"}  # options per combination; recover is the grid's
    unknown = sorted(set(cfg.extra) - {f.name for f in dataclasses.fields(RunConfig)} | (set(cfg.extra) & shared))
    if unknown:
        raise OptinError(f"unknown run settings {unknown}; see optin.recipe.RunConfig for the fields")
    base = RunConfig(**{k: getattr(cfg, k) for k in shared}, **cfg.extra, scorer=cfg.scorers[0],
                     budget=cfg.budgets[0]).checked()  # sizes, device and dtype
    cfg.model = base.model
    searchers = {r: choose_plugins(dataclasses.replace(base, reducer=r, options={})).searcher for r in cfg.reducers}
    selected = [("scorer", s) for s in cfg.scorers] + [("searcher", s) for s in _unique(list(searchers.values()))] \
        + [("reducer", r) for r in cfg.reducers if r is not None]
    registry.check_options(options, selected)  # typos fail here; each combination gets the options it takes
    cfg.options = options
    combos = []
    for scorer in cfg.scorers:
        for reducer in cfg.reducers:
            mine = [("scorer", scorer), ("searcher", searchers[reducer])] + ([("reducer", reducer)] if reducer else [])
            accepted = {o for kind, name in mine for o in registry.option_names(registry.get(kind, name))}
            run = dataclasses.replace(base, scorer=scorer, reducer=reducer, searcher=searchers[reducer],
                                      options={k: v for k, v in options.items() if k in accepted})
            plugins = choose_plugins(run)
            if plugins.token_scorer is None:  # option values, and per-token scores where a token searcher needs them
                make_scorer(scorer, run.options, plugins.token_scores)
            for rec in cfg.recover:  # the recipe checks the recovery steps (RunConfig.checked)
                combos.append(Combination(scorer, reducer, rec, dataclasses.replace(run, recover=rec).checked(),
                                          plugins))
    return cfg, combos


# --- the journal of finished cells ---------------------------------------------------------------------
class Journal:
    """``cells.jsonl``: one JSON object per line, appended and flushed as each piece of work finishes. A line
    cut short by a kill is dropped when the journal is opened again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict] = []
        if path.is_file():
            raw = path.read_text()
            good = []
            for line in raw.splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "kind" in record:
                    good.append(line)
                    self.records.append(record)
            if raw != "".join(g + "\n" for g in good):  # rewrite without the damaged line(s)
                write_text_atomic(path, "".join(g + "\n" for g in good))

    def find(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_plain) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)


def _plain(value: Any) -> Any:
    """JSON for what a stage may report beyond plain types (tensors, numpy numbers, tuples)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def cell_key(scorer: str, recover: str, reducer: str | None, budget: float, seed: int) -> str:
    return json.dumps([scorer, recover, reducer, float(budget), int(seed)])


def encode(results: torch.Tensor) -> dict:
    """Per-example results as JSON: 0/1 correctness as a list; confusion matrices sparsely, per example a list
    of [flat index, count] pairs."""
    if results.dim() == 1:
        return {"correct": [int(v) for v in results.tolist()]}
    n, c = results.shape[0], results.shape[-1]
    flat = results.reshape(n, -1)
    return {"classes": int(c),
            "confusion": [[[int(i), int(row[i])] for i in torch.nonzero(row).flatten().tolist()] for row in flat]}


def decode(data: dict) -> np.ndarray:
    """The array ``encode`` stored: (N,) or (N, C, C)."""
    if "correct" in data:
        return np.asarray(data["correct"], dtype=np.float64)
    c = int(data["classes"])
    out = np.zeros((len(data["confusion"]), c * c), dtype=np.float64)
    for k, pairs in enumerate(data["confusion"]):
        for i, count in pairs:
            out[k, i] = count
    return out.reshape(-1, c, c)


# --- the work ---------------------------------------------------------------------------------------
def _examples_hash(batches: list[Batch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            if torch.is_tensor(b[k]):
                h.update(k.encode())
                h.update(b[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def scores_path(folder: Path, scorer: str, token_scores: str | None, seed: int) -> Path:
    """``DIR/scores/{scorer}-seed{seed}.safetensors`` (``-tokens`` or ``-tokens-only`` when a token searcher
    asked the scorer for per-token scores too, or only)."""
    tokens = {None: "", "also": "-tokens", "only": "-tokens-only"}[token_scores]
    return folder / SCORES_DIR / f"{scorer}{tokens}-seed{seed}.safetensors"


def _saved_scores(path: Path, ad: Adapter, fp: str, scorer: str, seed: int, n_calib: int) -> Scores | None:
    """The scores in ``path`` when they were made for this model by this scorer on this seed's calibration
    sample; None (with a note) otherwise."""
    if not path.is_file():
        return None
    try:
        saved = Scores.load(path)
        saved.check_matches(ad.name, fp, ad.unit_counts(), f"scores file {path}")
    except OptinError as exc:
        say(f"recomputing {path.name}: {' '.join(str(exc).split())}")
        return None
    if (saved.scorer, saved.seed, saved.calibration_examples) != (scorer, seed, n_calib):
        say(f"recomputing {path.name}: it holds scorer {saved.scorer!r}, seed {saved.seed}, "
            f"{saved.calibration_examples} calibration examples")
        return None
    return saved


@dataclass
class _Context:
    """What every cell shares: the unpruned model, the task, the held-out batches and the journal."""

    cfg: CompareConfig
    folder: Path
    base: Adapter
    task: Task
    evals: list[Batch]
    seq_len: float
    fingerprint: str
    journal: Journal


def _scores_for(ctx: _Context, combo: Combination, seed: int, calib: list[Batch]) -> Scores | None:
    """This scorer's scores on this seed's calibration sample: read back when saved, else computed (resuming
    from the partial file a killed run left) and saved. None for a run-time token scorer."""
    if combo.plugins.token_scorer is not None:
        return None
    path = scores_path(ctx.folder, combo.scorer, combo.plugins.token_scores, seed)
    n_calib = sum(ctx.base.batch_size(b) for b in calib)
    saved = _saved_scores(path, ctx.base, ctx.fingerprint, combo.scorer, seed, n_calib)
    if saved is not None:
        return saved
    t0 = time.perf_counter()
    result = score(ctx.base, calib, combo.scorer, combo.run.options, seed,
                   path.with_name(path.stem + ".partial.safetensors"), combo.plugins.token_scores)
    result.save(path)
    ctx.journal.append({"kind": "scores", "scorer": combo.scorer, "seed": seed, "file": str(path.name),
                        "seconds": time.perf_counter() - t0})
    return result


def _allocation_settings(how: str | float) -> dict:
    """How a folder records its allocation: ``evaluate`` with the candidates it tries (so that a folder made
    before a candidate was added resumes with ``evaluate-blends`` and is refused with the new ``evaluate``)."""
    candidates = candidates_for(how)
    return {"allocation": "evaluate" if how == EVALUATE_BLENDS else how,
            "allocation_candidates": list(candidates) if candidates is not None else None}


def _cell(ctx: _Context, combo: Combination, budget: float, seed: int, calib: list[Batch],
          scores: Scores | None, time_it: bool) -> dict:
    """Search, apply to a fresh copy of the unpruned model, recover, remove, evaluate every held-out example;
    with ``time_it``, time the pruned model against the unpruned one."""
    t0 = time.perf_counter()
    run = dataclasses.replace(combo.run, budget=budget, seed=seed)
    plugins = choose_plugins(run) if combo.plugins.token_scorer is not None else combo.plugins  # its own instance
    ad = copy.deepcopy(ctx.base)
    masks, costs, allocated = search_stage(ad, scores, run, plugins, ctx.seq_len, calib)
    # recover (run.recover) on the masked model, then remove; the final masks (rearrangement moves units)
    _, masks, applied = apply_stage(ad, masks, calib, ctx.evals[0], run, more_calibration(ctx.base, ctx.task, run))
    applied = {"recover_steps" if k == "recover" else k: v for k, v in applied.items()}
    removals, token_macs = token_stage(ad, scores, run, plugins, costs, ctx.seq_len)
    macs_after = token_macs if token_macs is not None else costs.macs_of_masks(masks)
    with bar(f"evaluating {combo.scorer} at {budget} (seed {seed})", total=len(ctx.evals)) as (advance, _):
        results = per_example(ad, ctx.evals, ctx.task.metric, ctx.base, advance)
    record = {"kind": "cell", "key": cell_key(combo.scorer, combo.recover, combo.reducer, budget, seed),
              "scorer": combo.scorer, "recover": combo.recover, "reducer": combo.reducer, "budget": budget,
              "seed": seed, "metric": metric_of_examples(results), "macs_before": costs.macs(),
              "macs_after": macs_after, "macs_ratio": macs_after / costs.macs(),
              "params_before": params(ctx.base.model),
              "params_after": params(ad.model), "kept": kept_counts(masks), "token_removals": removals,
              "allocation": allocated, **applied,
              "seconds": time.perf_counter() - t0, "results": encode(results), "timings": None}
    if time_it:
        batch = ctx.evals[0]
        dev = resolve_device(ctx.cfg.device)
        times = timings({"unpruned": lambda: ctx.base.logits(batch), "pruned": lambda: ad.logits(batch)},
                        warmup=ctx.cfg.speed_warmup, repeats=ctx.cfg.speed_repeats, sync=lambda: synchronize(dev))
        record["timings"] = {"batch": ctx.base.batch_size(batch), **times}
    return record


def _grid(cfg: CompareConfig, combos: list[Combination]) -> Iterator[tuple[int, Combination, float]]:
    for seed in cfg.seeds:
        for combo in combos:
            for budget in cfg.budgets:
                yield seed, combo, budget


def _prepare_folder(cfg: CompareConfig) -> Path:
    folder = Path(cfg.output).expanduser()
    where = f"output folder {str(folder)!r}"
    if folder.exists() and not folder.is_dir():
        raise OptinError(f"{where} is a file; choose another --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OptinError(f"cannot create {where}: a part of its path is a file; choose another --output") from None
    except OSError as exc:
        raise OptinError(f"cannot create {where}: {exc.strerror or exc}; choose a writable --output") from None
    if not os.access(folder, os.W_OK):
        raise OptinError(f"{where} is not writable; choose a writable --output")
    return folder


def compare(config: CompareConfig) -> dict:
    """Run (or resume) the comparison and write its outputs; returns what ``compare.json`` holds."""
    cfg, combos = check(config)
    folder = _prepare_folder(cfg)
    lock = FileLock(str(lock_path(folder)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OptinError(f"output folder {str(folder)!r} is in use by another optin run that has not finished; "
                         "wait for it, or choose another --output") from None
    try:
        return _compare_locked(cfg, combos, folder)
    finally:
        lock.release()


def _compare_locked(cfg: CompareConfig, combos: list[Combination], folder: Path) -> dict:
    shown = dataclasses.replace(combos[0].run, scorer=", ".join(cfg.scorers), reducer=None,
                                budget=" ".join(str(b) for b in cfg.budgets))  # only for load_stage's line
    base, task = load_stage(shown)
    for reducer in cfg.reducers:
        if reducer is not None:
            require_tokens(base, reducer)
    evals = batches_of(base, sample(task.examples("test"), cfg.eval_size, EVAL_SEED), cfg.batch_size,
                       cfg.device, cfg.dtype)
    if not evals:
        raise OptinError(f"task {task.name!r} has no held-out (test) examples to evaluate on")
    fp = fingerprint(base.model)
    settings = {"kind": "settings", "model": cfg.model, "adapter": base.name, "task": task.name,
                "data": cfg.data, "eval_data": cfg.eval_data, "extra": cfg.extra, "metric": task.metric,
                "calib_size": cfg.calib_size, "eval_size": cfg.eval_size,
                "batch_size": cfg.batch_size, "searcher": cfg.searcher, "options": cfg.options,
                "device": cfg.device, "dtype": cfg.dtype, "recalibrate": cfg.recalibrate,
                "allow_degenerate": cfg.allow_degenerate, "speed": cfg.speed, "fingerprint": fp,
                **_allocation_settings(parse_allocation(cfg.allocation)),
                "recover_size": parse_recover_size(cfg.recover_size),
                "eval_examples": _examples_hash(evals)}
    settings = json.loads(json.dumps(settings))  # as the journal stores it
    if cfg.overwrite:
        for name in (CELLS, *OUTPUTS):
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / SCORES_DIR, ignore_errors=True)
    journal = Journal(folder / CELLS)
    previous = journal.find("settings")
    if previous:
        there = {k: previous[0].get(k, SETTING_DEFAULTS.get(k)) for k in SETTINGS}
        if "allocation_candidates" not in previous[0]:
            there["allocation_candidates"] = OLD_CANDIDATES.get(there["allocation"])
        differ = [k for k in SETTINGS if there[k] != settings.get(k)]
        if differ:
            what = "; ".join(f"{k}: {there[k]!r} there, {settings.get(k)!r} now" for k in differ[:3])
            hint = " (it was made before evaluate tried the measured allocation: --allocation evaluate-blends " \
                "resumes it)" if differ == ["allocation_candidates"] and there[differ[0]] == list(BLENDS) else ""
            raise OptinError(f"output folder {str(folder)!r} holds a comparison made with other settings ({what}){hint}; "
                             "use the same settings to resume it, another --output, or --overwrite to discard it")
    else:
        journal.append(settings)
    ctx = _Context(cfg, folder, base, task, evals, base.seq_len(evals), fp, journal)
    if not journal.find("unpruned"):
        with bar("evaluating the unpruned model", total=len(evals)) as (advance, _):
            results = per_example(base, evals, task.metric, base, advance)
        costs = base.cost_model(ctx.seq_len)
        journal.append({"kind": "unpruned", "metric": metric_of_examples(results), "macs": costs.macs(),
                        "params": params(base.model), "seq_len": ctx.seq_len, "examples": len(results),
                        "results": encode(results)})
    done = {r["key"] for r in journal.find("cell")}
    grid = list(_grid(cfg, combos))
    todo = [g for g in grid if cell_key(g[1].scorer, g[1].recover, g[1].reducer, g[2], g[0]) not in done]
    if len(todo) < len(grid):
        say(f"resuming: {len(grid) - len(todo)} of {len(grid)} cells already in {folder / CELLS}")
    calib: dict[int, list[Batch]] = {}
    scores: dict[tuple, Scores | None] = {}
    for i, (seed, combo, budget) in enumerate(todo, 1):
        if seed not in calib:
            calib = {seed: calibration_stage(base, task, dataclasses.replace(combo.run, seed=seed))}
            scores = {}
        skey = (combo.scorer, combo.plugins.token_scores)
        if skey not in scores:
            scores[skey] = _scores_for(ctx, combo, seed, calib[seed])
        record = _cell(ctx, combo, budget, seed, calib[seed], scores[skey], cfg.speed and seed == cfg.seeds[0])
        journal.append(record)
        say(f"[{i}/{len(todo)}] {label(combo.scorer, combo.recover, combo.reducer, cfg)} budget {budget} "
            f"seed {seed}: {task.metric} {record['metric']:.4f}, MACs {record['macs_ratio']:.3f} "
            f"({record['seconds']:.1f}s)")
    result = aggregate(cfg, journal, task.metric)
    write_outputs(result, folder)
    return result


# --- the results -------------------------------------------------------------------------------------
def label(scorer: str, recover: str, reducer: str | None, cfg: CompareConfig) -> str:
    """A configuration's name in tables and plots: the scorer, the recovery setting where more than one is
    compared or it is not the default, the reducer where there is one."""
    parts = [scorer]
    if len(cfg.recover) > 1 or recover != DEFAULT_RECOVER:
        parts.append(f"recover={recover}")
    if reducer is not None:
        parts.append(f"reducer={reducer}")
    return " ".join(parts)


def aggregate(cfg: CompareConfig, journal: Journal, metric: str) -> dict:
    """Everything ``compare.json`` holds, from the journal's cells of this grid."""
    cells = {r["key"]: r for r in journal.find("cell")}
    unpruned = journal.find("unpruned")[0]
    base_results = decode(unpruned["results"])
    counts = stats.resample_counts(len(base_results), cfg.resamples, seed=0)
    per_config: dict[tuple, np.ndarray] = {}
    rows = []
    for scorer in cfg.scorers:
        for reducer in cfg.reducers:
            for rec in cfg.recover:
                for budget in cfg.budgets:
                    mine = [cells[cell_key(scorer, rec, reducer, budget, s)] for s in cfg.seeds]
                    arrays = np.stack([decode(c["results"]) for c in mine])
                    per_config[(scorer, rec, reducer, budget)] = arrays
                    timed = next((c["timings"] for c in mine if c.get("timings")), None)
                    rows.append({"scorer": scorer, "recover": rec, "reducer": reducer, "budget": budget,
                                 "label": label(scorer, rec, reducer, cfg), "seeds": list(cfg.seeds),
                                 "metric": stats.summarize(arrays, counts, cfg.level),
                                 "macs_ratio": float(np.mean([c["macs_ratio"] for c in mine])),
                                 "params": float(np.mean([c["params_after"] for c in mine])),
                                 "seconds": float(np.mean([c["seconds"] for c in mine])),
                                 "speedup": stats.speedup(timed["unpruned"], timed["pruned"]) if timed else None})
    for row in rows:
        ref = per_config[(cfg.reference, row["recover"], row["reducer"], row["budget"])]
        row["difference"] = {"reference": cfg.reference,
                             **stats.paired_difference(per_config[(row["scorer"], row["recover"], row["reducer"],
                                                                   row["budget"])], ref, counts, cfg.level)}
    unpruned_summary = stats.summarize(base_results[None], counts, cfg.level)
    settings = {k: v for k, v in journal.find("settings")[0].items() if k != "kind"}
    grid = {"scorers": cfg.scorers, "budgets": cfg.budgets, "seeds": cfg.seeds, "recover": cfg.recover,
            "reducers": cfg.reducers, "reference": cfg.reference, "resamples": cfg.resamples, "level": cfg.level,
            "eval_seed": EVAL_SEED}
    order = [cell_key(r["scorer"], r["recover"], r["reducer"], r["budget"], s) for r in rows for s in cfg.seeds]
    return {"settings": settings, "grid": grid, "metric": metric,
            "unpruned": {**{k: v for k, v in unpruned.items() if k not in ("kind", "results")},
                         "summary": unpruned_summary, "results": unpruned["results"]},
            "aggregates": rows, "scores": [r for r in journal.find("scores")],
            "cells": [{k: v for k, v in cells[key].items() if k != "kind"} for key in order],
            "optin_version": __version__, "date": _dt.date.today().isoformat()}
