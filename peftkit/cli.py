"""The ``peftkit`` command line.

Heavy libraries (torch, transformers, peft) are imported inside the commands that need them, so
``peftkit --help`` and ``peftkit list`` answer at once. Every error a user can cause is printed as
one line starting with ``error:`` and exits with status 2; no traceback. An exception raised inside
a library (transformers, peft, accelerate, bitsandbytes, torch, ...) is one line too, naming the
library, the strategy, the model type and the library's message, with status 1; ``--debug`` (or
``PEFTKIT_DEBUG=1``) shows its traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from .cli_output import (
    print_bench,
    print_evaluation,
    print_inspect,
    print_plan,
    print_strategies,
    print_summary,
    print_tune,
)
from .errors import PeftkitError, debug_requested, error_context, library_error_line, raising_library, set_context
from .settings import LEVERS, SETTINGS, Setting

if TYPE_CHECKING:  # pragma: no cover
    pass

# -- the options --------------------------------------------------------------------------------
# Each is declared once in ``peftkit.settings`` (flags, type, default, help, closed set), which the
# config classes' fields are declared from too; a command lists the ones it takes by key
# (``@options("task", "model", ...)``; ``bench:batch_size`` for a command's own wording).


def _click_option(s: Setting) -> Callable[[Any], Any]:
    """The click option of setting ``s``."""
    attrs: dict[str, Any] = {"help": s.help}
    # click tells a default left out from an explicit None: a flag left out is False (an explicit
    # None stays None: "not given", for the levers), a repeatable option (), a required one none
    if not (s.multiple or s.required or s.cli_default is False):
        attrs["default"] = s.cli_default
    if s.type is bool:
        attrs["is_flag"] = True
    elif s.choices:
        attrs["type"] = click.Choice(s.choices)
    elif s.file:
        attrs["type"] = click.Path(dir_okay=False)
    elif s.type is not str:
        attrs["type"] = s.type
    for name in ("show_default", "multiple", "required", "metavar"):
        if getattr(s, name):
            attrs[name] = getattr(s, name)
    return click.option(*s.flags, *([s.dest] if s.dest else []), **attrs)


def options(*keys: str) -> Callable[[Any], Any]:
    """Decorate a command with the options of settings ``keys`` (``peftkit.settings``), in that order."""

    def decorate(func: Any) -> Any:
        for key in reversed(keys):
            func = _click_option(SETTINGS[key])(func)
        return func

    return decorate


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """The options given (click's None: not given), for a config class to fill in the rest."""
    return {k: v for k, v in values.items() if v is not None}


def _echo(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit")
@click.option(
    "--debug",
    is_flag=True,
    help="Show the full traceback when a library (transformers, peft, "
    "torch, ...) fails, instead of one line. Also: PEFTKIT_DEBUG=1.",
)
def cli(debug: bool) -> None:
    """Fine-tune pretrained models with interchangeable strategies.

    \b
    peftkit list                      strategies and what they do
    peftkit run --strategy lora       fine-tune and evaluate (embedded default: MiniLM on Rotten Tomatoes)
    peftkit bench                     every strategy side by side: memory, speed, accuracy
    peftkit tune --strategy lora      search its hyper-parameters (Optuna), selected on validation
    peftkit plan --memory-budget 8GiB predicted peak memory of each strategy, without training
    peftkit predict --adapter DIR T   answer texts (or --input FILE) with a trained adapter
    peftkit eval --adapter DIR --dataset FILE   how well it does on a labelled file, beside a baseline
    peftkit inspect DIR               what an adapter is, what it was trained on, how well it did
    peftkit merge --adapter DIR --output OUT   base + adapter as one plain transformers model
    peftkit export --adapter DIR --output F    one file to serve without PyTorch: ONNX (int8) or GGUF
    peftkit env                       versions, device and lock status, for bug reports
    """
    global _DEBUG
    _DEBUG = _DEBUG or debug
    ctx = click.get_current_context()
    set_context(command=ctx.invoked_subcommand)


@cli.command("env")
@options("env:json", "env:lock")
def env_cmd(as_json: bool, lock_file: str | None) -> None:
    """Print what a bug report needs: versions of peftkit, Python and the libraries, whether each
    matches requirements.lock, the machine, and the device (CUDA, cuDNN, GPUs and their memory).

    Paste its output into a bug report. The same version table is in every run's metrics.json.
    """
    from .env import environment_report, format_report

    if lock_file is not None and not os.path.isfile(lock_file):
        raise PeftkitError(f"lock file not found: {lock_file!r}; give a requirements-style file of name==version lines")
    report = environment_report(lock_file)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo("Copy-and-paste the text below in your bug report.\n")
    click.echo(format_report(report))


@cli.command("list")
@options("list:verbose")
def list_cmd(verbose: bool) -> None:
    """List the registered strategies (built-in and plugins)."""
    print_strategies(verbose)


@cli.command("run")
@options(
    "strategy",
    "task",
    "config",
    "model",
    "dataset",
    "text_column",
    "label_column",
    "response_column",
    "epochs",
    "batch_size",
    "lr",
    "max_length",
    "max_train_samples",
    "max_eval_samples",
    "seed",
    "weight_decay",
    "warmup_ratio",
    "grad_accumulation",
    "early_stopping_patience",
    *LEVERS,
    "memory_budget",
    "checkpoint_every",
    "resume",
    "run:fsdp",
    "report_to",
    "set",
    "output_dir",
    "overwrite",
)
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
    """Fine-tune a model with a strategy, evaluate it, and save the run.

    The run directory holds config.yaml (every setting, resolved), metrics.json, train.log and
    adapter/ (what the strategy trained, as safetensors, with its metadata). It appears only when
    the run has finished; until then the run is written into .NAME.partial beside it.

    A run that learned nothing (test accuracy not clearly above the majority class, or a language
    model's validation perplexity no better than before training) ends with a warning giving the
    likely cause and the flag to try; metrics.json records `learned` and the `baseline`.

    Runs unchanged under `accelerate launch` or `torchrun` (data parallel; only the main process
    writes). See docs/scale-out.md on multi-GPU and multi-node runs.
    """
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
    from .errors import LearnedNothingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LearnedNothingWarning)
        yield


@cli.command("bench")
@options(
    "strategies",
    "task",
    "model",
    "dataset",
    "text_column",
    "label_column",
    "response_column",
    "epochs",
    "max_train_samples",
    "max_eval_samples",
    "seeds",
    "bench:batch_size",
    "max_length",
    "eval_batch_size",
    "early_stopping_patience",
    *LEVERS,
    "bench:memory_budget",
    "auto_fit",
    "tune",
    "tune_timeout",
    "tune_storage",
    "train_sizes",
    "bench:output_dir",
    "overwrite",
)
def bench_cmd(strategies: str, seeds: str, overwrite: bool, **opts: Any) -> None:
    """Run every strategy on the same model and data and compare memory, speed and accuracy.

    \b
    Each strategy and seed runs in its own process. The output directory holds
    results.json   every run, a summary per strategy, versions, plugins, machine
    results.md     the table, best values in bold; the majority-class baseline, and a
                   † on each strategy not better than it or with a run that learned
                   nothing (that run's cause and flag to try under the table); 95%
                   intervals over seeds, and which strategies a paired test cannot
                   tell from the best
    *.png          accuracy vs peak memory (Pareto front), accuracy vs time, validation curves
                   (not with one epoch: a single point each)
    learning_curve.png  with --train-sizes: accuracy against training examples, a line
                   per strategy (the table per size in results.md, train_sizes in results.json)
    runs/          each run's directory (config, metrics, log, adapter); NAME-tuned-seedN
                   with --tune, NAME-nSIZE-seedN with --train-sizes
    tuning/        with --tune: each strategy's study (study.db, trials, best.yaml);
                   --tune-storage URL keeps the studies there, and a rerun continues them

    \b
    peftkit bench --train-sizes 250,500,1000,2000,all --max-eval-samples 500
                   accuracy of every strategy at each training-set size
    """
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


def _command_line(name: str) -> str:
    """The command as given (options from the command line only), for results to name it."""
    import shlex

    from click.core import ParameterSource

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


@cli.command("tune")
@options(
    "tune:strategy",
    "task",
    "config",
    "model",
    "dataset",
    "text_column",
    "label_column",
    "response_column",
    "tune:epochs",
    "batch_size",
    "tune:lr",
    "max_length",
    "max_train_samples",
    "max_eval_samples",
    "seed",
    "weight_decay",
    "warmup_ratio",
    "grad_accumulation",
    *LEVERS,
    "memory_budget",
    "tune:set",
    "trials",
    "timeout",
    "storage",
    "study_name",
    "metric",
    "pruner",
    "space",
    "tune:output_dir",
    "tune:overwrite",
)
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
    """Search a strategy's hyper-parameters with Optuna, selecting on validation only.

    \b
    Trial 0 is the strategy's defaults; then TPE (seeded by --seed) searches the learning rate,
    epochs, warmup, weight decay and the strategy's own options (`peftkit list -v`; docs/tuning.md
    lists each space). Settings you give (--lr, --epochs, --set ...) are fixed. Each trial runs in
    its own process; a crash or out-of-memory is a failed trial; one whose tune was killed is
    re-run by the next tune (2 minutes after its last heartbeat). Unpromising trials are pruned
    after an epoch. At the end the best configuration is trained once more as a normal run, the
    only one evaluated on test. The output directory holds
    study.db         the study (default storage): run the same command again to continue it
    best.yaml        the best settings: peftkit run --config best.yaml reproduces the run
    trials.csv/json  every trial: state, validation, parameters, each epoch, time, error
    *.png            optimisation history; parameter importance (2+ parameters, 3+ complete trials)
    best-run/        the best configuration's run directory (test metrics, adapter)
    trials/NNNN/     each trial's config.yaml, train.log and worker.log
    """
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


@cli.command("plan")
@options(
    "task",
    "model",
    "plan:strategies",
    "plan:batch_size",
    "max_length",
    "num_labels",
    "loss_tokens",
    *LEVERS,
    "processes",
    "fsdp",
    "plan:memory_budget",
    "device",
    "plan:json",
)
def plan_cmd(strategies: str, as_json: bool, **opts: Any) -> None:
    """Predict each strategy's peak training memory without training.

    \b
    The peak is split into weights, gradients and optimizer state (arithmetic), activations
    (measured: up to 12 training steps of a random-weight copy, whole if small, else at depth
    2 and 3 and extrapolated; once per distinct structure) and, on CPU, the runtime. Unlike
    `accelerate estimate-memory` it knows each strategy, activations, batch size, quantized
    bases and 8-bit optimizers. What will be measured, roughly how long it takes and a line
    per strategy go to stderr. --processes N [--fsdp]: the peak on each of N devices ("does a
    full fine-tune fit on 8 cards of 24 GiB?" is --processes 8 --fsdp --memory-budget 24GiB).

    \b
    Exit status: 0 when every strategy was planned or refused (it cannot be used with these
    levers: a row saying why), 1 when planning a strategy failed (its row says failed, the
    error is below the table and in the JSON), 2 for bad input.
    """
    from . import api
    from .config import with_levers

    settings = api.PlanSettings(strategies=strategies.split(","), **with_levers(_given(opts)))
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


@cli.command("predict")
@options(
    "predict:adapter",
    "onnx",
    "base_model",
    "force",
    "input",
    "predict:text_column",
    "predict:output",
    "predict:overwrite",
    "predict:batch_size",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "predict:seed",
    "chat",
)
@click.argument("texts", nargs=-1)
def predict_cmd(adapter_dir: str | None, texts: tuple[str, ...], **settings: Any) -> None:
    """Answer TEXTS (or the inputs of --input FILE) with a trained adapter (or an ONNX export:
    --onnx DIR); prints one JSON object per input (or writes them to --output FILE).

    \b
    sequence-classification: the label of each text
    causal-lm: the generated completion of each prompt (an adapter trained on labelled data
               phrases each text as it learned, and gives the label it answered; other prompts are
               given as they are, or in the model's chat template with --chat)
    image-classification: the inputs are image files; the label of each
    """
    from . import api

    # what is left out takes PredictConfig's defaults
    config = api.PredictConfig(adapter=adapter_dir, inputs=list(texts) or None, **_given(settings))
    if config.output is not None:
        rows = api.predict(config)
        _echo(f"wrote {len(rows):,} answers to {config.output}")
        return
    for row in api.predict_iter(config):
        click.echo(json.dumps(row, ensure_ascii=False))


@cli.command("eval")
@options(
    "eval:adapter",
    "eval:dataset",
    "text_column",
    "label_column",
    "response_column",
    "base_model",
    "force",
    "eval:max_eval_samples",
    "eval:batch_size",
    "eval:output",
    "overwrite",
    "eval:json",
)
def eval_cmd(adapter_dir: str, as_json: bool, **opts: Any) -> None:
    """Evaluate an adapter on a labelled file it has not seen, beside a majority-class baseline.

    \b
    sequence- and image-classification: accuracy, macro-F1, per-class precision / recall / F1 /
        support, the confusion matrix (a table; with --output also confusion_matrix.png)
    causal-lm: perplexity and the exact match of generated answers (= accuracy for labelled data)
    Baseline: always answering the file's most frequent label (or answer); a warning says when
    the adapter does no better.
    """
    from . import api

    result = api.evaluate(api.EvalConfig(adapter=adapter_dir, **_given(opts)), echo=_echo)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print_evaluation(result)
    if result.warning:
        _echo(f"warning: {result.warning}")


@cli.command("merge")
@options("merge:adapter", "output", "base_model", "force", "overwrite")
def merge_cmd(adapter_dir: str, output: str, model: str | None, force: bool, overwrite: bool) -> None:
    """Merge an adapter into its base and write a standard transformers model directory.

    The result (safetensors + tokenizer or image processor) loads with the task's AutoModelFor...
    class (sequence or image classification, causal LM) and predicts like base + adapter. Works for
    lora (weights folded in), full and
    gradual_unfreeze; strategies that add modules of their own (head_only, adapter, prefix) cannot be merged.
    """
    from . import api

    merged = api.merge(adapter_dir, output, model, force=force, overwrite=overwrite)
    click.echo(f"merged {merged.strategy} adapter into {merged.base_model!r}: {merged.output_dir}")


@cli.command("export")
@options(
    "export:adapter",
    "base_model",
    "force",
    "export:format",
    "export:output",
    "export:quantize",
    "export:min_agreement",
    "export:opset",
    "export:dataset",
    "text_column",
    "label_column",
    "overwrite",
)
def export_cmd(adapter_dir: str, fmt: str, output: str, model: str | None, force: bool, **opts: Any) -> None:
    """Export an adapter on its base as a model that serves without PyTorch: ONNX (classifiers) or
    GGUF (language models), checked against PyTorch before anything is written.

    \b
    Merged into the base where the strategy merges (lora, full, gradual_unfreeze); the adapter's
    own modules in the graph otherwise (adapter, prefix, head_only). The graph takes the
    tokenizer's outputs (input_ids, attention_mask, ...; images: pixel_values), batch and sequence
    dynamic, and gives the label probabilities. Beside model.onnx: the tokenizer (or image
    processor), config.json and peftkit_export.json (labels, max length, base fingerprint, what
    was checked, versions).
    Checked before anything is written: ONNX Runtime's probabilities within 1e-4 of PyTorch's on
    64 examples; with --quantize int8, PyTorch's label on >= 99% of the check examples (or
    --min-agreement; the agreement and both accuracies printed). A failed check writes nothing.
    Serve it with `peftkit predict --onnx OUTPUT TEXT...`.

    \b
    --format gguf (causal-lm adapters of lora, full, gradual_unfreeze on a Llama-architecture base,
    such as the embedded SmolLM2): merged, written as OUTPUT/model.gguf in float32 with the
    tokenizer, chat template and llama.cpp's tensor names; checked by reading it back with
    transformers' GGUF loader: the same tokens and greedy generations as PyTorch on a few prompts.
    """
    from . import api

    result = api.export(adapter_dir, output, fmt, model, force=force, echo=_echo, **_given(opts))
    size = result.onnx_bytes
    click.echo(
        f"exported {result.strategy} adapter on {result.base_model!r} "
        f"({'merged' if result.merged else 'adapter modules in the graph'}"
        f"{', int8' if result.quantize else ''}) to {result.output_dir}/model.{result.format} "
        f"({size / 2**20:.1f} MiB)"
    )


@cli.command("inspect")
@click.argument("adapter_dir")
@options("inspect:json")
def inspect_cmd(adapter_dir: str, as_json: bool) -> None:
    """Show what an adapter is: strategy, base model and fingerprint, labels, size, metrics."""
    from . import api

    meta = api.inspect(adapter_dir)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    print_inspect(meta)


# --debug given (PEFTKIT_DEBUG=1 is read when an error happens)
_DEBUG = False


def _left_behind(exc: BaseException | None) -> str:
    """What an interrupted command leaves: a run with checkpoints says so (``RunInterrupted``)."""
    return getattr(exc, "kept", "nothing was written")


_SIGNALLED: list[int] = []  # the signal that stopped the command (SIGTERM), for its exit status


def _terminate(signum: int, frame: Any) -> None:
    # `kill` (SIGTERM) gets the same clean-up as Ctrl-C: staged output removed, workers stopped
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _interrupted_status() -> int:
    """128 + the signal, as shells report a process a signal stopped: 130 for Ctrl-C (SIGINT),
    143 for ``kill`` (SIGTERM)."""
    import signal

    return 128 + (_SIGNALLED[-1] if _SIGNALLED else int(signal.SIGINT))


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
    import signal

    from .env import own_process

    global _DEBUG
    _DEBUG = False
    _SIGNALLED.clear()
    own_process()  # the command line's process is peftkit's (env.freeze_imported_objects)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): keep the default
        pass
    try:
        with error_context():  # the command's own, for its one-line library errors; cli() adds its name
            code = cli.main(args=argv, prog_name="peftkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # `peftkit` alone: the help, not "error: Usage: ..."
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort as exc:  # click's form of Ctrl-C (and of our SIGTERM handler)
        click.echo(f"error: interrupted; {_left_behind(exc.__cause__)}", err=True)
        code = _interrupted_status()
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        code = exc.exit_code
    except PeftkitError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 2
    except KeyboardInterrupt as exc:
        click.echo(f"error: interrupted; {_left_behind(exc)}", err=True)
        code = _interrupted_status()
    except OSError as exc:  # disk full, permission denied: the user's environment, not our bug
        if _DEBUG or debug_requested():
            raise
        click.echo(f"error: {exc}", err=True)
        code = 1
    except Exception as exc:
        # Raised inside a library (found by walking the traceback, not by the exception's type):
        # the library's own message, one line, with what we were doing. Anything raised in peftkit's
        # own code is a bug, and its traceback is what a bug report needs: it propagates.
        library = raising_library(exc)
        if library is None:
            raise
        line = library_error_line(exc, library)
        if _DEBUG or debug_requested():
            import traceback

            traceback.print_exc()
            click.echo(f"error: {line}", err=True)
        else:
            click.echo(f"error: {line} (peftkit --debug ... shows the traceback)", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
