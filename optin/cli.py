"""The ``optin`` command line: a thin layer over ``optin.recipe``."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from . import __version__, registry
from .allocation import DEFAULT_ALLOCATION
from .config import parse_option, read_config
from .errors import OptinError
from .hooks import broken, conflicts, plugin_manager
from .models import named_models
from .progress import set_quiet
from .recovery import DEFAULT_RECOVER, DEFAULT_RECOVER_SIZE
from .tasks import known_tasks

DEFAULT_MODEL = "minilm-trec"
out = Console()
DATA_HELP = ("Your own data: a CSV/JSONL with columns text,label or image,label (paths relative to the file), an "
             "image folder DIR/<class>/<image>, or a segmentation folder DIR/images + DIR/masks.")
EVAL_DATA_HELP = "Your own held-out split (same forms as --data); then all of --data is for calibration."
CHECKPOINT_HELP = "Weights file (a state dict: .safetensors, .pth, .bin) for --model timm:NAME."


class CliError(click.ClickException):
    """A one-line ``Error: ...`` and exit code 2 for bad input."""

    exit_code = 2


class OptinGroup(click.Group):
    """Turns every bad-input error of a subcommand (ours or click's) into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OptinError as exc:
            raise CliError(" ".join(str(exc).split())) from None  # one line, whatever the message
        except click.UsageError as exc:
            cmd = f" (see `optin {ctx.invoked_subcommand} --help`)" if ctx.invoked_subcommand else ""
            raise CliError(exc.format_message() + cmd) from None


RECIPE_COMMANDS = ("run", "score", "prune")  # the commands that share one --config file


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value:
        mine = [p.name for p in ctx.command.params if p.name not in ("config",)]
        # one run.yaml serves run, score and prune: a key of another of them (budget for `optin score`) is
        # ignored here, a key none of them knows is an error
        siblings = [p.name for name in RECIPE_COMMANDS if name in getattr(ctx.find_root().command, "commands", {})
                    for p in ctx.find_root().command.commands[name].params if p.name != "config"]
        try:
            cfg = read_config(value, sorted(set(mine + siblings)) + ["options"])
        except OptinError as exc:
            raise CliError(" ".join(str(exc).split())) from None
        cfg = {k: v for k, v in cfg.items() if k in mine or k == "options"}
        options = cfg.pop("options", None)
        if options is not None and not isinstance(options, dict):
            raise CliError(f"'options' in {value} must be a mapping of plugin option: value")
        ctx.meta["config_options"] = options or {}
        ctx.default_map = {**(ctx.default_map or {}), **cfg}
    return value


def _plugin_options(ctx: click.Context, pairs: tuple[str, ...]) -> dict[str, Any]:
    options = dict(ctx.meta.get("config_options", {}))
    options.update(parse_option(p) for p in pairs)
    return options


def common_options(fn=None, *, without: tuple[str, ...] = ()):
    """The flags every recipe command takes; ``@common_options(without=("seed",))`` leaves out the named ones
    for a command that defines them its own way."""
    if fn is None:
        return lambda f: common_options(f, without=without)
    decorators = [
        click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
                     expose_value=False, help="YAML file setting any of these flags (plus 'options:')."),
        click.option("--model", default=None, help=f"Named model, model folder, optin output or hub id "
                                                   f"[default: {DEFAULT_MODEL}]."),
        click.option("--task", default=None, help="Built-in task (see `optin list`)."),
        click.option("--data", default=None, type=click.Path(), help=DATA_HELP),
        click.option("--eval-data", default=None, type=click.Path(), help=EVAL_DATA_HELP),
        click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help=CHECKPOINT_HELP),
        click.option("--adapter", default=None, help="Force an adapter instead of auto-detection."),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--calib-size", default=128, show_default=True, type=click.IntRange(min=1),
                     help="Calibration examples (one batch) for scoring."),
        click.option("--output", default="optin-output", show_default=True, type=click.Path(file_okay=False)),
        click.option("--overwrite", is_flag=True,
                     help="Replace the outputs of a previous run in --output (refused without it)."),
        click.option("--set", "plugin_opts", multiple=True, metavar="KEY=VALUE",
                     help="Plugin option, e.g. --set neuron_group=8 (repeatable)."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
        click.option("--device", default="cpu", show_default=True,
                     help="Where to score, evaluate and time: cpu, cuda, cuda:N or mps."),
        click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Precision of the model's forward passes (scores are accumulated in float64)."),
    ]
    theirs = len(getattr(fn, "__click_params__", []))  # the command's own flags, applied before these
    for d in reversed(decorators):
        fn = d(fn)
    fn.__click_params__ = fn.__click_params__[:theirs] + [p for p in fn.__click_params__[theirs:]
                                                           if p.name not in without]
    return fn


@click.group(cls=OptinGroup)
@click.version_option(__version__, prog_name="optin")
def cli() -> None:
    """Retraining-free pruning of pre-trained transformers and CNNs (OPTIN)."""


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json: bool) -> None:
    """Installed plugins (adapters, scorers, searchers, reducers), tasks and named models."""
    infos = registry.plugins()
    tasks, models = known_tasks(), named_models()
    if as_json:
        click.echo(json.dumps({
            "plugins": [{"kind": i.kind, "name": i.name, "origin": i.origin, "target": i.target,
                         "available": i.available, "error": i.error, "summary": i.summary,
                         **({"sources": _sources(i)} if i.kind == "adapter" else {})} for i in infos],
            "tasks": {n: t.description for n, t in tasks.items()},
            "models": {n: m.description for n, m in models.items()},
            "broken_hooks": broken, "conflicts": conflicts}, indent=2))
        return
    table = Table(title="optin plugins")
    for col in ("kind", "name", "origin", "status", "what it does"):
        table.add_column(col)
    for i in infos:
        status = "[green]ok[/green]" if i.available else f"[red]unavailable[/red]: {i.error}"
        table.add_row(i.kind, i.name, i.origin, status, i.summary)
    out.print(table)
    sources = Table(title="model sources (--model): which adapter loads what")
    sources.add_column("adapter")
    sources.add_column("loads")
    for i in infos:
        if i.kind == "adapter":
            sources.add_row(i.name, _sources(i) or "(not said)")
    out.print(sources)
    t2 = Table(title="tasks (--task) and named models (--model)")
    t2.add_column("kind")
    t2.add_column("name")
    t2.add_column("description")
    for n, t in tasks.items():
        t2.add_row("task", n, t.description)
    for n, m in models.items():
        t2.add_row("model", n + (" (default)" if n == DEFAULT_MODEL else ""), m.description)
    out.print(t2)
    out.print("Named models and your own folders get the same defaults: the trajectory scorer plans its work from "
              "the model and prints the plan with an estimated time (docs/plugins.md, trajectory).")
    for name, why in broken.items():
        out.print(f"[red]hook plugin {name} failed to load[/red]: {why}")
    for name, why in conflicts.items():
        out.print(f"[yellow]{name}[/yellow]: {why}")


def _sources(info: registry.PluginInfo) -> str:
    """What an adapter loads (``Adapter.sources``), '' when unavailable or not said."""
    if not info.available:
        return ""
    return str(getattr(registry.get("adapter", info.name), "sources", "") or "")


def _apply_model_defaults(ctx: click.Context, model: str | None, values: dict, options: dict) -> None:
    """Named models may carry faster defaults (used only for flags the user did not set, and plugin
    options only where the chosen scorer takes them)."""
    named = named_models().get(model or DEFAULT_MODEL)
    for key, value in (getattr(named, "defaults", None) or {}).items():
        if key == "options":
            accepted = registry.option_names(registry.get("scorer", values["scorer"]))
            for k, v in value.items():
                if k in accepted:
                    options.setdefault(k, v)
        elif ctx.get_parameter_source(key) == ParameterSource.DEFAULT:
            values[key] = value


def _summary(report: dict) -> None:
    table = Table(title=f"{report['model']} on {report['task']}: {report['scorer']} + {report['searcher']}, "
                        f"budget {report['budget']}")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")
    m = report["metric"]
    table.add_row(m, f"{report['metric_before']:.4f}", f"{report['metric_after']:.4f}",
                  f"{report['metric_after'] - report['metric_before']:+.4f}")
    table.add_row("MACs", f"{report['macs_before'] / 1e6:.1f} M", f"{report['macs_after'] / 1e6:.1f} M",
                  f"{report['macs_ratio']:.3f}")
    table.add_row("parameters", f"{report['params_before'] / 1e6:.2f} M", f"{report['params_after'] / 1e6:.2f} M",
                  f"{report['params_after'] / report['params_before']:.3f}")
    table.add_row("throughput (ex/s)", f"{report['throughput_before']:.0f}", f"{report['throughput_after']:.0f}",
                  f"{report['speedup']:.2f}x")
    out.print(table)
    out.print(f"scoring {report['seconds_scoring']:.1f}s, total {report['seconds_total']:.1f}s; "
              f"pruned model and report.json in {report['output']}")


def prune_options(fn):
    """Flags shared by the commands that prune, evaluate and export (run, prune)."""
    for d in reversed([
        click.option("--searcher", default="ptf", show_default=True),
        click.option("--budget", default=0.6, show_default=True, type=float,
                     help="Fraction of MACs to keep, in (0, 1]."),
        click.option("--eval-size", default=1000, show_default=True, type=click.IntRange(min=1)),
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1)),
        click.option("--recover", default=DEFAULT_RECOVER, show_default=True, metavar="STEPS",
                     help="After the search, before removal: auto (reconstruct where the adapter names the layers "
                          "that read its units: every built-in does), none, ptf (rearrange,tune), or a comma-separated "
                          "list of rearrange, tune, reconstruct (least-squares refit of the layers that read pruned "
                          "units)."),
        click.option("--allocation", default=DEFAULT_ALLOCATION, show_default=True, metavar="HOW",
                     help="How many units each layer keeps: scores (as the scores rank them across layers), "
                          "measured (each layer's scores rescaled by how much masking its lowest units moves the "
                          "output), evaluate (try blends toward the cost model's allocation and the measured one, and "
                          "keep the one whose pruned model stays closest to the unpruned one on held-out calibration "
                          "examples), evaluate-blends (evaluate without the measured candidate), or a fixed blend in "
                          "[0, 1]."),
        click.option("--recover-size", default=DEFAULT_RECOVER_SIZE, show_default=True, metavar="N",
                     help="Examples the recovery fits on: auto (the calibration sample, plus more training examples "
                          "where a layer would get fewer than 2 rows per fitted column, e.g. a CNN's last "
                          "convolutions on small maps; at most 2048), calibration (the calibration sample only), or "
                          "a number."),
        click.option("--allow-degenerate", is_flag=True,
                     help="Accept a pruned model that loses every unit of a layer or of a kind (refused without it)."),
        click.option("--recalibrate/--no-recalibrate", default=True, show_default=True,
                     help="After removal, re-estimate normalisation statistics on the calibration data where "
                          "the adapter can (CNNs: BatchNorm running stats; no gradients)."),
    ]):
        fn = d(fn)
    return fn


def _invoke_recipe(ctx: click.Context, kw: dict, **extra: Any) -> dict:
    """Common CLI plumbing: progress bars, plugin options, named-model defaults, then the recipe."""
    from .recipe import RunConfig, run_config

    set_quiet(kw.pop("quiet"))
    options = _plugin_options(ctx, kw.pop("plugin_opts"))
    if "scorer" in kw:  # a scoring command: the named model's scoring defaults apply
        _apply_model_defaults(ctx, kw["model"], kw, options)
    return run_config(RunConfig(options=options, **kw, **extra))


reducer_option = click.option("--reducer", default=None,
                              help="Token reducer (vision adapters; with --searcher token-schedule).")


def _prune_and_report(ctx: click.Context, kw: dict) -> None:
    """The recipe up to the export, then the summary of its report."""
    report = _invoke_recipe(ctx, kw)
    if _helper_process(report):
        return
    report["output"] = kw["output"]
    _summary(report)


def _helper_process(result: dict) -> bool:
    """Under torchrun, a process of rank > 0 scored its share and stops there: one line, no summary."""
    if "rank" not in result:
        return False
    out.print(f"process {result['rank']}: scored its share in {result['seconds_scoring']:.1f}s (rank 0 writes the outputs)")
    return True


@cli.command()
@common_options
@click.option("--scorer", default="trajectory", show_default=True)
@reducer_option
@prune_options
@click.pass_context
def run(ctx: click.Context, **kw: Any) -> None:
    """Score, search, prune, evaluate and export (the whole recipe)."""
    _prune_and_report(ctx, kw)


@cli.command()
@common_options
@click.option("--scorer", default="trajectory", show_default=True)
@click.pass_context
def score(ctx: click.Context, **kw: Any) -> None:
    """Only score: write OUTPUT/scores.safetensors (resumes if interrupted)."""
    res = _invoke_recipe(ctx, kw, score_only=True)
    if not _helper_process(res):
        out.print(f"scores written to {res['scores']} ({res['seconds_scoring']:.1f}s)")


@cli.command()
@common_options
@click.option("--scores", "scores_file", required=True, type=click.Path(dir_okay=False),
              help="Scores from `optin score` (any budget, no rescoring).")
@reducer_option
@prune_options
@click.pass_context
def prune(ctx: click.Context, **kw: Any) -> None:
    """Prune from saved scores at a budget, evaluate and export."""
    _prune_and_report(ctx, kw)


@cli.command()
@click.option("--model", required=True, help="Pre-trained model folder or hub id (no head needed).")
@click.option("--task", default=None)
@click.option("--data", default=None, type=click.Path(), help=DATA_HELP)
@click.option("--eval-data", default=None, type=click.Path(), help=EVAL_DATA_HELP)
@click.option("--output", required=True, type=click.Path(file_okay=False))
@click.option("--epochs", default=2.0, show_default=True, type=float)
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--adapter", default=None)
def finetune(model: str, task: str | None, data: str | None, eval_data: str | None, output: str, epochs: float,
             lr: float, batch_size: int, seed: int, adapter: str | None) -> None:
    """Fine-tune a pre-trained encoder on a task so it can be pruned and evaluated."""
    from .measure import accuracy
    from .recipe import batches_of, resolve_task
    from .train import finetune as train

    the_task = resolve_task(task, data, None, eval_data)
    if the_task.metric == "agreement":
        raise OptinError(f"task {the_task.name!r} is unlabelled (it measures agreement with the unpruned model); "
                         "fine-tuning needs a labelled task")
    from .models import load_with
    from .safety import refuse_remote_code

    refuse_remote_code(model)
    candidates = [adapter] if adapter else [i.name for i in registry.plugins("adapter") if i.available]
    cls = next((registry.get("adapter", n) for n in candidates if registry.get("adapter", n).claims(model)), None)
    if cls is None:
        raise OptinError(f"no adapter can load {model!r} for fine-tuning")
    ad = load_with(cls, model, num_labels=the_task.num_labels)
    if not hasattr(ad.model, "save_pretrained"):  # refused before training, not after it
        raise OptinError(f"optin finetune writes Hugging Face model folders, and the {type(ad.model).__name__} of "
                         f"adapter {ad.name!r} has no save_pretrained; fine-tune it with its own library (for timm, "
                         "save the result with timm.models.save_for_hf and pass that folder as --model)")
    the_task.prepare(ad, model)
    log = train(ad, the_task, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    acc = accuracy(ad, batches_of(ad, the_task.examples("test"), 64))
    Path(output).mkdir(parents=True, exist_ok=True)
    ad.model.save_pretrained(output)
    ad.save_extras(output)
    (Path(output) / "optin-finetune.json").write_text(json.dumps({**log, "test_accuracy": acc}, indent=2))
    out.print(f"fine-tuned {model} on {the_task.name}: test accuracy {acc:.4f}; saved to {output}")


@cli.command()
@click.option("--model", default=None, help=f"The original model [default: {DEFAULT_MODEL}].")
@click.option("--compare", "others", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="A pruned/token-reduced model folder (OUTPUT/model of `optin run`); repeatable.")
@click.option("--task", default=None)
@click.option("--data", default=None, type=click.Path(), help=DATA_HELP)
@click.option("--eval-data", default=None, type=click.Path(), help="Your own held-out split: the timed batch.")
@click.option("--checkpoint", default=None, type=click.Path(dir_okay=False), help=CHECKPOINT_HELP)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads [default: torch's]")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--onnx", is_flag=True, help="Also time each model exported to ONNX in onnxruntime (CPU, float32; "
                                           "the ONNX files are cached next to the models).")
def bench(model: str | None, others: tuple[str, ...], task: str | None, data: str | None, eval_data: str | None,
          checkpoint: str | None, batch_size: int, repeats: int, warmup: int, threads: int | None, device: str,
          dtype: str, as_json: bool, onnx: bool) -> None:
    """Throughput of the original vs pruned / token-reduced models, one process, interleaved, median."""
    import torch

    from .devices import resolve_device, resolve_dtype, synchronize
    from .measure import throughput
    from .models import load_model
    from .recipe import batches_of, resolve_task
    from .tasks import sample

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if onnx:
        from .deploy import require_onnx

        require_onnx("--onnx")
        if dev.type != "cpu" or dt != torch.float32:
            raise OptinError("--onnx times onnxruntime on the CPU in float32, next to PyTorch on the same batch: drop "
                             "--device/--dtype (or time PyTorch alone on them without --onnx)")

    if threads:
        torch.set_num_threads(threads)
    source = model or DEFAULT_MODEL
    the_task = resolve_task(task, data, source, eval_data)
    models = {source: load_model(source, checkpoint=checkpoint)}
    for path in others:
        models[path] = load_model(path)
    the_task.prepare(models[source], source)
    for ad in models.values():
        ad.model.to(device=dev, dtype=dt).eval()
    first = next(iter(models.values()))
    batch = batches_of(first, sample(the_task.examples("test"), batch_size, 0), batch_size, dev, dt)[0]
    runs = {(name, "pytorch"): (lambda ad=ad: ad.logits(batch)) for name, ad in models.items()}
    exports = {}
    if onnx:
        runs.update(_onnx_runs(models, source, batch, exports))
    speed = throughput(runs, examples=first.batch_size(batch), warmup=warmup, repeats=repeats,
                       sync=lambda: synchronize(dev))
    rows = [{"model": name, "runtime": runtime, "examples_per_s": v, "ratio": v / speed[(source, runtime)],
             **({"onnx": exports[name]} if runtime == "onnxruntime" else {})}
            for (name, runtime), v in speed.items()]
    if as_json:
        click.echo(json.dumps({"batch_size": batch_size, "repeats": repeats, "threads": torch.get_num_threads(),
                               "results": rows}, indent=2))
        return
    table = Table(title=f"throughput, batch {batch_size}, median of {repeats} (interleaved), "
                        f"{torch.get_num_threads()} threads")
    for col in ("model", "runtime", "examples/s", "vs original"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], r["runtime"], f"{r['examples_per_s']:.1f}", f"{r['ratio']:.2f}x")
    out.print(table)
    for name, e in exports.items():
        out.print(f"{name}: ONNX {e['path']} ({e['exporter']} exporter)")


def _onnx_runs(models: dict, source: str, batch: dict, exports: dict) -> dict:
    """onnxruntime calls of every model on ``batch`` (exported once, cached next to each model folder or in the
    optin cache); fills ``exports`` with what each export is."""
    from dataclasses import asdict

    from .deploy import cached_onnx, onnx_cache_path
    from .models import cache_dir, named_models

    runs = {}
    for name, ad in models.items():
        folder = name
        if name == source and name in named_models():
            folder = named_models()[name].build()
        folder = folder if Path(folder).is_dir() else None
        call, export = cached_onnx(ad, batch, onnx_cache_path(name, folder, cache_dir()))
        runs[(name, "onnxruntime")] = call
        exports[name] = asdict(export)
    return runs


@cli.command("export")
@click.option("--model", required=True, help="The model to export: a pruned optin folder (OUTPUT/model of `optin run`), "
                                             "a model folder, a named model or a hub id.")
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "hf"]),
              help="onnx: one ONNX file checked with onnxruntime; hf: a plain Hugging Face folder (same-size layers).")
@click.option("--output", required=True, type=click.Path(),
              help="The ONNX file (--format onnx) or the folder (--format hf) to write.")
@click.option("--task", default=None, help="Sample inputs for tracing and checking [default: the task recorded in the "
                                           "pruned model's plan].")
@click.option("--data", default=None, type=click.Path(), help="Sample inputs from your own data file or folder.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Examples in the sample batch.")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0.0),
              help="Largest difference of logits from the PyTorch model accepted (else nothing is written).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
def export_cmd(model: str, fmt: str, output: str, task: str | None, data: str | None, batch_size: int,
               tolerance: float, overwrite: bool) -> None:
    """Export a (pruned) model to ship without optin: ONNX, or a plain Hugging Face folder."""
    from .deploy import clear, export_hf, export_onnx_to, require_onnx, sample_batch
    from .models import load_model

    target = Path(output)
    if fmt == "onnx" and target.is_dir():
        raise OptinError(f"--output {output} is a folder; --format onnx writes a file, e.g. {target / 'model.onnx'}")
    if fmt == "hf" and target.is_file():
        raise OptinError(f"--output {output} is a file; --format hf writes a folder")
    source = Path(model).expanduser()
    if source.exists() and (target.resolve() == source.resolve() or target.resolve() in source.resolve().parents):
        raise OptinError(f"--output {output} would replace the model being exported ({model}); pick another --output")
    taken = target.exists() and (target.is_file() or any(target.iterdir()))
    if taken and not overwrite:
        raise OptinError(f"--output {output} exists; pass --overwrite to replace it, or another --output")
    if fmt == "onnx":
        require_onnx("--format onnx")
    ad = load_model(model)
    batch = sample_batch(ad, model, task, data, batch_size)
    if fmt == "onnx":  # an earlier --output is replaced only by an export that passed its check
        result = export_onnx_to(ad, batch, target, tolerance)
        out.print(f"wrote {result.describe()}")
    else:
        result = export_hf(ad, batch, target, tolerance, before_writing=lambda: clear(target) if taken else None)
        out.print(f"wrote {result['path']}: {result['model_class']} (AutoModel.from_pretrained loads it without optin; "
                  f"max abs difference from the pruned model {result['max_abs_diff']:.2g})")


def spread_values(args: list[str], names: set[str]) -> list[str]:
    """``--budgets 0.9 0.6`` as click reads it, ``--budgets 0.9 --budgets 0.6``: an option named in ``names``
    takes every following word up to the next option (a word starting with ``-`` that is not a number)."""
    out: list[str] = []
    current = None
    for i, arg in enumerate(args):
        if arg == "--":  # the rest is not options
            return out + args[i:]
        if arg.startswith("-") and not _is_number(arg):
            name = arg.split("=", 1)[0]
            current = name if name in names else None
            out.append(arg)
            continue
        if current is not None and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class MultiValueOption(click.Option):
    """A repeatable option that also takes several values in a row (``--scorers magnitude random``, with
    ``MultiValueCommand``) and, in a --config file, one value or a list."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, multiple=True, **kw)

    def type_cast_value(self, ctx: click.Context, value: Any) -> Any:
        if isinstance(value, (str, int, float)):
            value = (value,)
        return super().type_cast_value(ctx, value)


class MultiValueCommand(click.Command):
    """A command whose ``MultiValueOption`` options take every following word up to the next option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        names = {o for p in self.params if isinstance(p, MultiValueOption) for o in p.opts}
        return super().parse_args(ctx, spread_values(list(args), names))


def multi_option(*decls: str, **kw: Any):
    return click.option(*decls, cls=MultiValueOption, **kw)


def _compare_table(result: dict) -> Table:
    from .compare_report import table

    header, body = table(result)
    s = result["settings"]
    t = Table(title=f"{s['model']} on {s['task']}: {result['metric']}, mean over seeds "
                    f"{', '.join(map(str, result['grid']['seeds']))} [{round(100 * result['grid']['level'])}% CI]; "
                    f"unpruned {result['unpruned']['metric']:.3f}")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right")
    for name, cells in body:
        t.add_row(name, *("\n".join(text) for text in cells))
    return t


@cli.command(cls=MultiValueCommand)
@common_options(without=("seed", "output"))
@multi_option("--scorers", "--scorer", "scorers", required=True, metavar="NAME ...",
              help="Scorers to compare (several in a row, or repeated).")
@multi_option("--budgets", "--budget", "budgets", type=float, default=(0.6,), show_default=True, metavar="FLOAT ...",
              help="Fractions of MACs to keep, each in (0, 1].")
@multi_option("--seeds", "--seed", "seeds", type=int, default=(0,), show_default=True, metavar="INT ...",
              help="Calibration seeds (the held-out examples are the same for all).")
@multi_option("--recover", "recover", default=(DEFAULT_RECOVER,), show_default=True, metavar="STEPS ...",
              help="Recovery settings to compare, each as `optin run --recover` takes it.")
@multi_option("--reducers", "--reducer", "reducers", default=(), metavar="NAME ...",
              help="Token reducers to compare (vision; `none` for no reducer) [default: none].")
@click.option("--reference", default=None, help="Scorer the paired differences are taken against [default: the first].")
@click.option("--searcher", default="ptf", show_default=True)
@click.option("--output", default="optin-compare", show_default=True, type=click.Path(file_okay=False),
              help="Folder of cells.jsonl, scores/ and the compare.* outputs (a rerun resumes).")
@click.option("--eval-size", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--allocation", default=DEFAULT_ALLOCATION, show_default=True, metavar="HOW",
              help="How many units each layer keeps, for every cell, as `optin run --allocation` takes it.")
@click.option("--recover-size", default=DEFAULT_RECOVER_SIZE, show_default=True, metavar="N",
              help="Examples the recovery fits on, for every cell, as `optin run --recover-size` takes it.")
@click.option("--allow-degenerate", is_flag=True,
              help="Accept pruned models that lose every unit of a layer or of a kind (refused without it).")
@click.option("--recalibrate/--no-recalibrate", default=True, show_default=True,
              help="After removal, re-estimate normalisation statistics where the adapter can.")
@click.option("--speed/--no-speed", default=True, show_default=True,
              help="Time every pruned model of the first seed against the unpruned one.")
@click.pass_context
def compare(ctx: click.Context, **kw: Any) -> None:
    """Compare scorers x budgets x recovery (x reducers) over calibration seeds on the same test examples."""
    import dataclasses

    from .compare import CompareConfig, compare as run_compare

    set_quiet(kw.pop("quiet"))
    options = _plugin_options(ctx, kw.pop("plugin_opts"))
    for scorer in kw["scorers"]:  # a named model's scoring defaults, for the scorers that take them
        values = {**kw, "scorer": scorer}
        _apply_model_defaults(ctx, kw["model"], values, options)
        kw.update({k: values[k] for k in kw})
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    kw["reducers"] = kw["reducers"] or [None]
    known = {f.name for f in dataclasses.fields(CompareConfig)}
    extra = {k: kw.pop(k) for k in list(kw) if k not in known}  # flags every recipe command has, for the cells
    result = run_compare(CompareConfig(options=options, extra=extra, **kw))
    out.print(_compare_table(result))
    out.print(f"Δ: paired difference against {result['grid']['reference']} on the same examples (* its CI "
              f"excludes 0); tables, plot and JSON in {kw['output']} (compare.md, compare.png, compare.json)")


def main() -> None:
    plugin_manager().hook.optin_cli(cli=cli)
    cli(prog_name="optin")


if __name__ == "__main__":
    sys.exit(main())
