"""The ``peftkit`` command line: what each command does with its options.

What each command takes and its ``--help`` text are in ``peftkit.cli_spec``; how a command ends
(one ``error:`` line and an exit status, no traceback; Ctrl-C and SIGTERM) in ``peftkit.cli_errors``;
what it prints in ``peftkit.cli_output``. Heavy libraries (torch, transformers, peft) are imported
inside the commands that need them, so ``peftkit --help`` and ``peftkit list`` answer at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import click
from click.core import ParameterSource

from .cli_errors import exit_status, request_debug
from .cli_output import (
    print_bench,
    print_evaluation,
    print_inspect,
    print_plan,
    print_recommend,
    print_strategies,
    print_summary,
    print_tune,
)
from .cli_spec import HELP, options
from .env import environment_report, format_report
from .errors import LearnedNothingWarning, PeftkitError, set_context
from .recommendation.config import RecommendConfig


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The options given (click's None: not given), for a config class to fill in the rest."""
    return {k: v for k, v in values.items() if v is not None}


def _echo(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, help=HELP["peftkit"])
@click.version_option(package_name="peftkit")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the full traceback when a library (transformers, peft, "
    "torch, ...) fails, instead of one line. Also: PEFTKIT_DEBUG=1.",
)
def cli(debug: bool) -> None:
    request_debug(debug)
    ctx = click.get_current_context()
    set_context(command=ctx.invoked_subcommand)


@cli.command("env", help=HELP["env"])
@options("env")
def env_cmd(as_json: bool, lock_file: str | None) -> None:
    if lock_file is not None and not os.path.isfile(lock_file):
        raise PeftkitError(f"lock file not found: {lock_file!r}; give a requirements-style file of name==version lines")
    report = environment_report(lock_file)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo("Copy-and-paste the text below in your bug report.\n")
    click.echo(format_report(report))


@cli.command("list", help=HELP["list"])
@options("list")
def list_cmd(verbose: bool, peft: bool) -> None:
    print_strategies(verbose, peft)


@cli.command("run", help=HELP["run"])
@options("run")
def run_cmd(
    strategy: str | None,
    config_file: str | None,
    set_items: tuple[str, ...],
    overwrite: bool,
    output_dir: str | None,
    resume_dir: str | None,
    report_to: tuple[str, ...],
    **flags: Any,
) -> None:
    from . import api
    from .config import build_run_config, parse_set_options

    if resume_dir is not None:
        given = (
            [k for k, v in flags.items() if v is not None]
            + (["strategy"] if strategy else [])
            + (["config"] if config_file else [])
            + (["set"] if set_items else [])
            + (["output-dir"] if output_dir else [])
            + (["report-to"] if report_to else [])
        )
        if given or overwrite:
            raise PeftkitError(
                "--resume continues a run with its own settings; drop "
                f"--{given[0].replace('_', '-') if given else 'overwrite'}"
            )
        with _own_learned_nothing_line():
            result = api.resume(resume_dir, echo=_echo)
    else:
        flags = dict(flags, strategy=strategy, output_dir=output_dir, report_to=list(report_to) or None)
        cfg = build_run_config(config_file, flags, parse_set_options(set_items))
        cfg.overwrite = overwrite
        with _own_learned_nothing_line():
            result = api.run(cfg, echo=_echo)
    if result.metrics is not None:
        print_summary(result.metrics, result.run_dir)


@contextlib.contextmanager
def _own_learned_nothing_line() -> Iterator[None]:
    """The library's ``LearnedNothingWarning`` silenced: the command prints its own warning line after
    the figures (``_print_summary``), not Python's ``file:line: Warning`` form."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LearnedNothingWarning)
        yield


@cli.command("bench", help=HELP["bench"])
@options("bench")
def bench_cmd(strategies: str, seeds: str, overwrite: bool, **opts: Any) -> None:
    from . import api
    from .benchmark.config import BenchConfig, parse_seeds, parse_train_sizes
    from .config import with_levers

    sizes = opts.pop("train_sizes")
    config = BenchConfig(
        strategies=strategies.split(","),
        seeds=parse_seeds(seeds),
        train_sizes=parse_train_sizes(sizes) if sizes is not None else None,
        command=_command_line("bench"),
        **with_levers(_given(opts)),
    )
    result = api.bench(config, overwrite=overwrite, echo=_echo)
    print_bench(result)


@cli.command("recommend", help=HELP["recommend"])
@options("recommend")
def recommend_cmd(strategies: str, seeds: str, **opts: Any) -> None:
    from . import api
    from .benchmark.config import parse_seeds
    from .config import with_levers

    config = RecommendConfig(
        strategies=strategies.split(","),
        seeds=parse_seeds(seeds),
        command=_command_line("recommend"),
        **with_levers(_given(opts)),
    )
    print_recommend(api.recommend(config, echo=_echo))


def _command_line(name: str) -> str:
    """The command as given (options from the command line only), for results to name it."""
    ctx = click.get_current_context()
    parts = ["peftkit", name]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            parts.append(flag) if value else None
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


@cli.command("tune", help=HELP["tune"])
@options("tune")
def tune_cmd(
    strategy: str | None,
    config_file: str | None,
    set_items: tuple[str, ...],
    trials: int,
    timeout: str | None,
    storage: str | None,
    study_name: str | None,
    metric: str | None,
    pruner: str,
    space_items: tuple[str, ...],
    output_dir: str | None,
    overwrite: bool,
    **flags: Any,
) -> None:
    from . import api
    from .config import build_run_config, parse_set_options
    from .tuning.config import parse_space

    if strategy is None and config_file is None:
        raise PeftkitError("peftkit tune needs --strategy NAME (see `peftkit list`)")
    flags = dict(flags, strategy=strategy)
    run = build_run_config(config_file, flags, parse_set_options(set_items))
    config = api.TuneConfig(
        run=run,
        trials=trials,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
        metric=metric,
        pruner=pruner,
        space=parse_space(space_items),
        output_dir=output_dir,
        overwrite=overwrite,
    )
    result = api.tune(config, echo=_echo)
    print_tune(result)


@cli.command("plan", help=HELP["plan"])
@options("plan")
def plan_cmd(strategies: str, as_json: bool, set_items: tuple[str, ...], **opts: Any) -> None:
    from . import api
    from .config import parse_set_options, with_levers

    settings = api.PlanSettings(
        strategies=strategies.split(","),
        strategy_options=parse_set_options(set_items),
        **with_levers(_given(opts)),
    )
    result = api.plan(settings, echo=_echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result.settings, result.estimates)
    if result.failed:
        _echo(
            f"error: planning failed for {', '.join(result.failed)} (the reason is in "
            f"{'the JSON' if as_json else 'the lines below the table'})"
        )
        raise click.exceptions.Exit(1)


@cli.command("predict", help=HELP["predict"])
@options("predict")
@click.argument("texts", nargs=-1)
def predict_cmd(adapter_dir: str | None, texts: tuple[str, ...], **settings: Any) -> None:
    from . import api

    # what is left out takes PredictConfig's defaults
    config = api.PredictConfig(adapter=adapter_dir, inputs=list(texts) or None, **_given(settings))
    if config.output is not None:
        rows = api.predict(config)
        _echo(f"wrote {len(rows):,} answers to {config.output}")
        return
    for row in api.predict_iter(config):
        click.echo(json.dumps(row, ensure_ascii=False))


@cli.command("eval", help=HELP["eval"])
@options("eval")
def eval_cmd(adapter_dir: str, as_json: bool, **opts: Any) -> None:
    from . import api

    result = api.evaluate(api.EvalConfig(adapter=adapter_dir, **_given(opts)), echo=_echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_evaluation(result)
    if result.warning:
        _echo(f"warning: {result.warning}")


@cli.command("merge", help=HELP["merge"])
@options("merge")
def merge_cmd(adapter_dir: str, **opts: Any) -> None:
    from . import api

    merged = api.merge(api.MergeConfig(adapter=adapter_dir, **opts))
    click.echo(f"merged {merged.strategy} adapter into {merged.base_model!r}: {merged.output_dir}")


@cli.command("export", help=HELP["export"])
@options("export")
def export_cmd(adapter_dir: str, fmt: str, **opts: Any) -> None:
    from . import api

    result = api.export(api.ExportConfig(adapter=adapter_dir, format=fmt, **_given(opts)), echo=_echo)
    size, precision = result.onnx_bytes, result.check.get("inference_precision")
    default = result.check.get("default_precision")
    written = result.files[0] if result.files else (result.model_file or f"model.{result.format}")
    how = "merged" if result.merged else "the adapter alone" if result.files else "adapter modules in the graph"
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.0f} KiB"  # a LoRA file can be tiny
    click.echo(
        f"exported {result.strategy} adapter on {result.base_model!r} ({how}"
        f"{', int8' if result.quantize else ''}"
        # OpenVINO: the precision it computes in (int8: the rest of the graph), which depends on the
        # CPU: its default is bf16 where the CPU has AVX512-BF16 or AMX
        + (
            ""
            if not precision
            else f"; OpenVINO computes in {precision}, its default on this CPU"
            if precision == default
            else f"; OpenVINO computes in {precision} as checked, not in {default}, its default on this CPU"
        )
        + f") to {result.output_dir}/{written} ({shown})"
        + "".join(f", with {result.output_dir}/{other}" for other in result.files[1:])
    )
    if result.usage:
        click.echo(f"run it with llama.cpp: {result.usage}")


@cli.command("inspect", help=HELP["inspect"])
@click.argument("adapter_dir")
@options("inspect")
def inspect_cmd(adapter_dir: str, as_json: bool) -> None:
    from . import api

    meta = api.inspect(adapter_dir)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    print_inspect(meta)


# what click says of a flag a command does not take (its one-line usage errors)
NOT_ACCEPTED = re.compile(r"no such option|invalid value for '?-|got unexpected extra argument", re.IGNORECASE)


def unaccepted(command: str, flags: list[str] | tuple[str, ...]) -> str | None:
    """Why ``peftkit COMMAND`` does not accept ``flags`` (click's one-line message, e.g. "No such
    option: --compile"), or None. Parsing only: nothing runs. Benchmarks ask it before running a
    variant an older peftkit may lack."""
    if not flags:
        return None
    cmd = cli.commands[command]
    try:
        cmd.make_context(command, list(flags))
    except click.UsageError as exc:  # no such option, bad value
        return exc.format_message()
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turns user errors into one line on stderr and a non-zero exit."""
    sys.exit(exit_status(lambda: cli.main(args=argv, prog_name="peftkit", standalone_mode=False)))


if __name__ == "__main__":
    main()
