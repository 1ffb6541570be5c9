"""What the commands print: a run's summary, a bench's notes, a tune's best trial, a plan's table,
an evaluation, an adapter's metadata, the strategies and tasks. Kept apart from ``peftkit.cli`` so
that the commands read as what they do (parse, call ``peftkit.api``, print); warnings go to stderr.
Like the commands, it imports peftkit's modules where they are used, so that ``peftkit --help``
and ``peftkit list`` load no more than they need.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import click

from . import registry
from .data import EMBEDDED_DATASETS, EMBEDDED_IMAGE_DATASETS
from .memory import format_size, parse_size
from .models import EMBEDDED_MODELS
from .strategies import peft_methods
from .strategies.base import option_help
from .strategies.peft_methods import survey as peft_survey
from .tasks import TASKS, get_task, task_names, task_plugin_errors

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import RunMetrics


def _echo(message: str) -> None:
    click.echo(message, err=True)


def print_strategies(verbose: bool, peft: bool = False) -> None:
    """``peftkit list``: the registered strategies (``verbose``: their defaults and options, the
    tasks, the embedded models and datasets) and peft's methods (``peft``: where each runs, found
    by a dry build made once; without it, as far as the cache already knows)."""
    strategies = registry.available()
    plugins = registry.loaded_plugins()
    width = max(len(n) for n in strategies)
    for name, cls in strategies.items():
        origin = f"  [plugin: {plugins[name]}]" if name in plugins else ""
        click.echo(f"{name:<{width}}  {cls.description}{origin}")
        if verbose:
            _print_defaults(cls.defaults, width)
            if cls.covers:
                click.echo(f"{'':<{width}}  covers: {cls.covers}")
            for opt, typ, default in option_help(cls):
                click.echo(f"{'':<{width}}  --set {opt}=...  ({typ}, default {default})")
    for message in registry.plugin_errors():
        _echo(f"warning: {message}")
    print_peft_methods(verbose, peft, width)
    if verbose:
        click.echo("\ntasks (--task; default: read from the model):")
        task_plugins = TASKS.loaded_plugins()
        for task in task_names():
            t = get_task(task)
            origin = f" [plugin: {task_plugins[task]}]" if task in task_plugins else ""
            click.echo(
                f"  {task:<24} {t.description} Default: --model {t.default_model} --dataset {t.default_dataset}{origin}"
            )
        for message in task_plugin_errors():
            _echo(f"warning: {message}")
        click.echo("embedded models (--model):")
        for name, emb in EMBEDDED_MODELS.items():
            click.echo(f"  {name:<10} {emb.description} [{emb.task}]")
        click.echo("embedded datasets (--dataset):")
        for name, ds in EMBEDDED_DATASETS.items():
            click.echo(f"  {name:<16} {ds.description}")
        for name, (_, _, description) in EMBEDDED_IMAGE_DATASETS.items():
            click.echo(f"  {name:<16} {description} [image-classification]")


def _print_defaults(d: Any, width: int, note: str = "") -> None:
    """A strategy's ``TrainingDefaults``, two lines under its name (``peftkit list -v``)."""
    click.echo(
        f"{'':<{width}}  defaults: lr={d.lr:g} epochs={d.epochs} batch_size={d.batch_size} "
        f"weight_decay={d.weight_decay:g} warmup_ratio={d.warmup_ratio:g} "
        f"(warmup at most {d.max_warmup_steps} steps){note}"
    )
    click.echo(
        f"{'':<{width}}  small data: at least min_steps={d.min_steps} optimizer steps, epochs "
        f"raised up to max_epochs={d.max_epochs}, with early stopping (unless --epochs)"
    )


def print_peft_methods(verbose: bool, survey_now: bool, width: int) -> None:
    """The ``peft:NAME`` family: each method with the tasks and architectures it runs on and why not
    elsewhere (``survey_now``: made now where not cached, which imports peft and takes seconds; with
    ``verbose`` also each method's options, read from peft), else one line saying how to get that."""
    found = peft_survey.cached_survey()
    if found is None and survey_now:
        _echo("building each peft method on tiny models of 5 architectures (once for this peft and transformers) ...")
        found = peft_survey.survey()
    if found is None:
        click.echo(
            f"{'peft:NAME':<{width}}  Each of peft's methods (peft:ia3, peft:loha, peft:adalora, ...); "
            "`peftkit list --peft` shows which run where (a dry build on tiny models, about 20 s once, then cached)."
        )
        return
    names = [f"peft:{m}" for m in found["methods"]]
    wide = max(len(n) for n in names)
    click.echo(
        f"\npeft methods (--strategy peft:NAME; built and trained a step on tiny models with peft "
        f"{found['peft']}, transformers {found['transformers']}; runs on):"
    )
    for name, (method, info) in zip(names, found["methods"].items()):
        runs = "; ".join(f"{task}: {' '.join(archs)}" for task, archs in info["runs"].items() if archs)
        click.echo(f"  {name:<{wide}}  {runs or 'nowhere'}")
        by_reason: dict[str, dict[str, list[str]]] = {}
        for task, archs in info["refused"].items():
            for arch, said in archs.items():
                by_reason.setdefault(said, {}).setdefault(task, []).append(arch)
        for said, where in by_reason.items():
            places = "; ".join(f"{task}: {' '.join(archs)}" for task, archs in where.items())
            click.echo(f"  {'':<{wide}}    not {places} ({said})")
        if verbose:
            defaults = peft_methods.DEFAULTS.get(method, peft_methods.LORA_LIKE)
            _print_defaults(defaults, wide + 2, f" ({peft_methods.defaults_origin(method)})")
        if verbose and survey_now:  # the options are peft's config fields: peft is loaded already
            cls = peft_methods.resolve(method)
            why = peft_methods.not_merged(method, cls.config_class)
            click.echo(f"  {'':<{wide}}  merge: {'peft merge_and_unload' if why is None else 'refused, ' + why}")
            for opt, typ, default in option_help(cls):
                click.echo(f"  {'':<{wide}}  --set {opt}=...  ({typ}, default {default})")
    for method, why in found.get("not_offered", {}).items():
        click.echo(f"  not offered: peft:{method}: {why}")


def print_bench(result: Any) -> None:
    """``peftkit bench``: the table, what its ranking is worth, the tuning and sizes reports."""
    click.echo(result.table)
    from .benchmark.report import baseline_note, comparison_note, sizes_report, tuning_report

    # what the table's ranking is worth (intervals, paired tests) belongs beside it, not only in results.md
    for line in baseline_note(result.results) + (
        comparison_note(result.results) if result.results.get("comparison") else []
    ):
        click.echo(line)
    for line in [""] + tuning_report(result.results) if result.results.get("tuning") else []:
        click.echo(line)
    for line in [""] + sizes_report(result.results) if result.results.get("train_sizes") else []:
        click.echo(line)
    click.echo(f"results: {os.path.join(result.output_dir, 'results.md')} (and results.json, plots, runs/)")


def print_recommend(result: Any) -> None:
    """``peftkit recommend``: the answer's paragraph, then where the rest is."""
    click.echo("")
    click.echo(result.decision.paragraph)
    best = os.path.join(result.output_dir, "best")
    if os.path.isdir(best):
        click.echo(
            f"adapter: {os.path.join(best, 'adapter')}; again: peftkit run --config {os.path.join(best, 'config.yaml')}"
        )
    click.echo(f"report: {os.path.join(result.output_dir, 'recommend.md')} (and results.json, plots, runs/)")


def print_inspect(meta: dict[str, Any]) -> None:
    """``peftkit inspect``: an adapter's metadata, a line a property."""
    m = meta.get("metrics", {})
    rows = [
        ("strategy", meta.get("strategy", meta.get("peft_type", "?"))),
        ("options", json.dumps(meta.get("strategy_options", {}))),
        ("format", meta.get("format", "?")),
        ("base model", meta.get("base_model", "?")),
        ("base fingerprint", meta.get("base_fingerprint", "not recorded")),
        ("labels", ", ".join(f"{i}={n}" for i, n in enumerate(meta.get("label_names", []))) or "ids only"),
        ("max length", meta.get("max_length", "?")),
        ("trainable params", f"{m['trainable_params']:,} of {m['total_params']:,}" if "trainable_params" in m else "?"),
        # predict loads the base the way the adapter was trained on it: worth seeing before a merge
        (
            "base quantization",
            (meta["base_quantization"] or "none (full-precision base)")
            if "base_quantization" in meta
            else "not recorded",
        ),
        ("size", f"{meta['adapter_bytes']:,} bytes ({adapter_size(meta['adapter_bytes'])})"),
        ("task", meta.get("task", "sequence-classification")),
        (
            "test accuracy",
            f"{m['test_accuracy']:.4f}" + (f" (macro-F1 {m['test_f1_macro']:.4f})" if "test_f1_macro" in m else "")
            if "test_accuracy" in m
            else "-",
        ),
        *(
            [
                (
                    "test perplexity",
                    f"{m['test_perplexity']:.4f}"
                    + (f" (exact match {m['test_exact_match']:.4f})" if "test_exact_match" in m else ""),
                )
            ]
            if "test_perplexity" in m
            else []
        ),
        ("trained on", f"{meta.get('dataset', '?')}, seed {m.get('seed', '?')}, {epochs_trained(m)}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")


def adapter_size(size: int) -> str:
    """An adapter's size: ``3 KiB`` for head_only's head (not ``0.00 MiB``), ``3.53 MiB`` above a MiB."""
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else format_size(size)


def print_summary(m: RunMetrics, out: str) -> None:
    task = get_task(m.task)
    shown = ", ".join(
        f"{k.replace('_', ' ')} {m.test[k]:.4f}" for k in task.headline_metrics if m.test.get(k) is not None
    )
    chosen = m.validation.get(task.selection_metric)
    click.echo(
        f"{m.strategy}: test {shown} (validation {task.selection_metric} "
        f"{chosen:.4f}, best epoch {m.best_epoch})\n"
        f"  trainable {m.trainable_params:,} of {m.total_params:,} parameters "
        f"({m.trainable_percent:.2f}%), adapter {adapter_size(m.adapter_bytes or 0)}\n"
        f"  train {m.train_seconds:.1f} s ({m.samples_per_second:.1f} examples/s), "
        f"wall {m.wall_seconds or 0:.1f} s on {m.device}\n"
        f"  peak memory training {format_size(m.peak_memory_bytes)} "
        f"(+{format_size(m.peak_memory_increase_bytes)} over the loaded model), "
        f"evaluation {format_size(m.peak_memory_eval_bytes)}\n"
        f"  run directory: {out}"
    )
    if m.learned is False:  # after the figures, so that they do not read as a result (metrics.json: learned)
        _echo(f"warning: this run learned nothing: {m.learned_note}")


def print_tune(result: Any) -> None:
    from .tuning.report import describe_best, describe_versus_defaults

    m = result.best_run.metrics
    test = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in (m.test if m else {}).items() if k != "loss")
    first, *rest = describe_best(
        result.counts, result.best_trial, result.metric, result.best_value, result.best_params, result.defaults_best
    )
    click.echo(first)
    for line in rest:
        click.echo(f"  {line}")
    if result.versus_defaults:
        click.echo(f"  {describe_versus_defaults(result.versus_defaults)}")
    click.echo(f"  trained again as a run: test {test} ({os.path.join(result.output_dir, 'best-run')})")
    click.echo(
        f"  written: {result.output_dir} (best.yaml, trials.csv, trials.json"
        + "".join(f", {p}" for p in result.plots)
        + "); study "
        f"{result.study_name!r} in {result.storage}"
    )


def plan_row(e: Any, settings: Any, budget: int | None) -> list[str]:
    """One strategy's cells; a strategy not planned keeps the table's shape (its reason goes below)."""
    several = settings.processes > 1
    cells = 7 + several + (settings.device == "cpu") + (2 if budget else 0)
    if e.status != "ok":
        return [e.strategy, e.status] + ["-"] * cells
    row = [
        e.strategy,
        e.status,
        f"{e.trainable_params:,}",
        format_size(e.weights),
        format_size(e.gradients),
        format_size(e.optimizer),
        format_size(e.activations),
        format_size(e.workspace),
    ]
    row += [format_size(e.communication)] if several else []
    row += [format_size(e.runtime)] if settings.device == "cpu" else []
    row += [format_size(e.total)]
    if budget:
        row += ["yes" if e.total <= budget else "no", str(e.max_batch_size)]
    return row


def print_plan(settings: Any, estimates: list[Any]) -> None:
    from .benchmark.ladder import describe_levers

    budget = parse_size(settings.memory_budget) if settings.memory_budget else None
    length = f" x {settings.max_length} tokens" if settings.max_length else ""
    if settings.loss_positions:
        length += f" (loss on {settings.loss_positions} per example)"
    where = (
        settings.device
        if settings.processes == 1
        else (
            f"each of {settings.processes} {settings.device} processes, "
            + ("fully sharded (FSDP)" if settings.fsdp else "data parallel (DDP)")
        )
    )
    click.echo(
        f"{settings.model} ({settings.task}): batch {settings.batch_size}{length}"
        + (" per process" if settings.processes > 1 else "")
        + f", levers: {describe_levers(settings.levers)}, on {where}"
        + (f", budget {format_size(budget)}" if budget else "")
        + "".join(f", {k}={v}" for k, v in settings.strategy_options.items())
    )
    header = ["strategy", "status", "trainable", "weights", "gradients", "optimizer", "activations", "workspace"]
    header += ["communication"] if settings.processes > 1 else []
    header += ["runtime"] if settings.device == "cpu" else []
    header += ["peak"] + (["fits?", "largest batch"] if budget else [])
    rows = [header] + [plan_row(e, settings, budget) for e in estimates]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths))))
    for e in estimates:
        if e.status != "ok":
            click.echo(f"{e.strategy} {e.status}: {e.error}")
    notes: dict[str, list[str]] = {}
    for e in estimates:
        for note in e.notes:
            notes.setdefault(note, []).append(e.strategy)
    for note, names in notes.items():
        who = "" if len(names) == len(estimates) else f" ({', '.join(names)})"
        click.echo(f"note{who}: {note}")
    if settings.device == "cpu" and not budget:
        click.echo(f"note: {CPU_PEAK_NOTE}")


# What a CPU plan's peak is (env.lean_host_memory): the figures are vs_trainer.py's job a
CPU_PEAK_NOTE = (
    "peaks are those of a CPU run given a --memory-budget, which returns free memory to the system "
    "between transformer blocks; a run without one keeps it for its next steps (faster) and can peak "
    "higher (SmolLM2 LoRA at 8 x 512 tokens: 6.1 GiB against 4.4 GiB; benchmarks/README.md)"
)


def print_evaluation(result: Any) -> None:
    from .evaluation import confusion_table, per_class_table

    def figures(values: dict[str, Any]) -> str:
        return ", ".join(f"{k.replace('_', ' ')} {values[k]:.4f}" for k in result.headline if values.get(k) is not None)

    click.echo(
        f"{result.strategy} adapter on {result.dataset!r} ({result.task}, {result.examples:,} examples): "
        f"{figures(result.metrics)}"
    )
    b = result.baseline
    click.echo(
        f"baseline, {b['name']} (always {b['predicts']!r}): {figures(b) or '-'}"
        if b
        else "baseline: none (no input-blind answer means anything for this data)"
    )
    if result.per_class:
        click.echo("\n" + per_class_table(result.per_class))
    if result.confusion_matrix is not None:
        click.echo("\nconfusion matrix (rows: true label, columns: predicted):")
        names = result.label_names or [str(i) for i in range(len(result.confusion_matrix))]
        click.echo(confusion_table(result.confusion_matrix, names))
    if result.output_dir:
        click.echo(
            f"\nwritten: {result.output_dir} (metrics.json"
            + (", confusion_matrix.png)" if result.confusion_matrix is not None else ")")
        )


def epochs_trained(m: dict[str, Any]) -> str:
    """``7 of 15 epoch(s) (stopped early), best 2``: what training did, not only what was planned
    (an adapter saved before epochs_run and best_epoch were recorded shows the planned epochs)."""
    planned, ran, best = m.get("epochs", "?"), m.get("epochs_run"), m.get("best_epoch")
    if ran is None:
        return f"{planned} epoch(s)"
    early = " (stopped early)" if isinstance(planned, int) and ran < planned else ""
    shown = f"{ran} of {planned} epoch(s){early}" if early else f"{ran} epoch(s)"
    return shown + (f", best {best}" if best is not None else "")
