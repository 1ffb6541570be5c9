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

from .config import KERNELS, LOSSES, OPTIMIZERS, PRECISIONS, QUANTIZATIONS, REPORTERS
from .errors import PeftkitError, debug_requested, error_context, library_error_line, raising_library, set_context

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import RunMetrics

# -- the options, each declared once ----------------------------------------------------------
# A command lists the options it takes by key (``@options("task", "model", ...)``); type and
# parsing are declared here once. Values are checked where every front door (flags, YAML, Python)
# meets, not here: counts by the config classes' ``validate`` (``RunConfig``, ``BenchConfig``,
# ``PlanSettings``), the task by ``peftkit.tasks.get_task`` (so plugin tasks are accepted). Closed
# sets (levers, trackers) are click choices read from their one definition in ``peftkit.config``.
# A command may only word the help differently where the option means something else there
# (``--batch-size`` of a bench is the effective batch).

_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}


def _declare(key: str, *decls: str, **attrs: Any) -> None:
    _OPTIONS[key] = (decls, attrs)


_declare("strategy", "--strategy", "-s", default=None, help="Strategy name (see `peftkit list`). Default: lora.")
_declare(
    "strategies",
    "--strategies",
    default="all",
    show_default=True,
    help="'all' (every registered strategy, plugins included) or names: lora,full,head_only.",
)
_declare(
    "task",
    "--task",
    default=None,
    metavar="TASK",
    help="What to learn: sequence-classification, causal-lm, image-classification or a plugin's task "
    "(`peftkit list -v`). Default: what the model is made for (read from its config), else "
    "sequence-classification.",
)
_declare(
    "config",
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML file with the same settings as these flags plus a strategy_options block; flags override it.",
)
_declare(
    "model",
    "--model",
    default=None,
    help="Short name (minilm, smollm2, vit-tiny), hub id or local model directory. Default: the task's "
    "(minilm; smollm2 for causal-lm; vit-tiny for image-classification).",
)
_declare("base_model", "--model", default=None, help="Base model (default: the one named in the adapter's metadata).")
_declare(
    "dataset",
    "--dataset",
    default=None,
    help="Short name (rotten_tomatoes, digits, mnist), hub id, data file (.csv/.json/.jsonl/.parquet, "
    "compressed too) or a datasets save_to_disk directory. Default: the task's.",
)
_declare(
    "text_column",
    "--text-column",
    default=None,
    help="Column holding the text (causal-lm: the prompt; images: the image) (default: guessed: text, "
    "sentence, prompt, ...).",
)
_declare(
    "label_column",
    "--label-column",
    default=None,
    help="Column holding the label (default: guessed: label, labels, ...).",
)
_declare(
    "response_column",
    "--response-column",
    default=None,
    help="causal-lm: column holding the answer to learn (default: guessed: response, output, completion, "
    "answer); without one, a labelled dataset is phrased as a completion task.",
)
_declare(
    "epochs",
    "--epochs",
    type=int,
    default=None,
    help="Epochs, obeyed as given (default: each strategy's own, raised on a small training set to reach "
    "its minimum optimizer steps, with early stopping; the run says so).",
)
_declare(
    "batch_size",
    "--batch-size",
    type=int,
    default=None,
    help="Training batch size (default: the strategy's own); with several processes, the global batch.",
)
_declare("lr", "--lr", type=float, default=None, help="Peak learning rate (default: the strategy's own).")
_declare(
    "max_length",
    "--max-length",
    type=int,
    default=None,
    help="Tokens per example, longer texts truncated. Default: the task's (64; causal-lm 128).",
)
_declare(
    "max_train_samples", "--max-train-samples", type=int, default=None, help="Use at most N training examples (seeded)."
)
_declare(
    "max_eval_samples",
    "--max-eval-samples",
    type=int,
    default=None,
    help="Use at most N validation and N test examples (seeded); evaluating a language model on a CPU is slow.",
)
_declare(
    "seed", "--seed", type=int, default=None, help="Random seed for split, sampling and initialisation. Default: 0."
)
_declare("weight_decay", "--weight-decay", type=float, default=None, help="AdamW weight decay on weight matrices.")
_declare(
    "warmup_ratio",
    "--warmup-ratio",
    type=float,
    default=None,
    help="Fraction of the run's optimizer steps with linear warmup (at most the strategy's max_warmup_steps, 1000).",
)
_declare(
    "grad_accumulation",
    "--grad-accumulation",
    type=int,
    default=None,
    help="Micro-batches per optimizer step. Default: 1.",
)
_declare("eval_batch_size", "--eval-batch-size", type=int, default=None, help="Evaluation batch size. Default: 128.")
_declare(
    "early_stopping_patience",
    "--early-stopping-patience",
    type=int,
    default=None,
    help="Stop after N epochs without better validation accuracy (default: never, unless the "
    "epochs were raised for a small training set).",
)
_declare(
    "quantize",
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    default=None,
    help="Load the frozen base quantized (bitsandbytes; 4bit = NF4 + double quantization, QLoRA). "
    "For lora, adapter, prefix, head_only.",
)
_declare(
    "optimizer",
    "--optimizer",
    type=click.Choice(OPTIMIZERS),
    default=None,
    help="adamw (torch, default), adamw8bit or paged_adamw8bit (bitsandbytes; paged: CUDA only).",
)
_declare(
    "gradient_checkpointing",
    "--gradient-checkpointing",
    is_flag=True,
    default=None,
    help="Recompute activations in the backward pass: less memory, slower.",
)
_declare(
    "precision",
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Mixed precision via accelerate (default fp32; fp16 needs CUDA). Frozen weights are then stored in 16 bits.",
)
_declare(
    "loss",
    "--loss",
    type=click.Choice(LOSSES),
    default=None,
    help="causal-lm: chunked computes the loss from the output layer's input a chunk of tokens at a "
    "time (batch x length x vocabulary logits never exist at once); plain from the model's "
    "logits. Default: chunked where the model allows it.",
)
_declare(
    "packing",
    "--packing",
    is_flag=True,
    default=None,
    help="causal-lm: several whole training examples share each row of --max-length tokens (attention "
    "and loss kept inside each example): far less padding when lengths vary.",
)
_declare(
    "compile",
    "--compile",
    is_flag=True,
    default=None,
    help="torch.compile each transformer block for training (evaluation stays eager); the first step "
    "pays for compiling, reported apart.",
)
_declare(
    "kernels",
    "--kernels",
    type=click.Choice(KERNELS),
    default=None,
    help="torch: gated (SwiGLU) MLPs keep only their inputs for the backward pass (less memory, same "
    "results); liger: Liger's Triton kernels (CUDA, pip install 'peftkit[liger]'); none: the model's "
    "own modules. Default: torch where the model has gated MLPs.",
)
_declare(
    "memory_budget",
    "--memory-budget",
    default=None,
    metavar="SIZE",
    help="Cap on memory, e.g. 4GiB: on CUDA the allocator's limit, on CPU the process's peak resident "
    "memory; a run over it stops with an error.",
)
_declare(
    "checkpoint_every",
    "--checkpoint-every",
    type=int,
    default=None,
    metavar="N",
    help="Write the whole training state every N optimizer steps; a run that stops (even killed) "
    "continues with --resume.",
)
_declare(
    "resume",
    "--resume",
    "resume_dir",
    default=None,
    metavar="RUN_DIR",
    help="Continue the interrupted run that was going to RUN_DIR (its --output-dir) from its last "
    "checkpoint, with its own settings and as many processes as wrote it; give no other option.",
)
_declare(
    "report_to",
    "--report-to",
    "report_to",
    multiple=True,
    type=click.Choice(REPORTERS),
    help="Send losses and metrics to TensorBoard (event files in RUN_DIR/tensorboard) or W&B "
    "(if installed); repeatable.",
)
_declare(
    "set",
    "--set",
    "set_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Strategy option, repeatable (e.g. --set r=16 --set alpha=32); see `peftkit list -v`.",
)
_declare("output_dir", "--output-dir", default=None, help="Run directory. Default: runs/<strategy>-<timestamp>.")
_declare("overwrite", "--overwrite", is_flag=True, help="Replace an existing output directory.")
_declare(
    "processes",
    "--processes",
    type=int,
    default=None,
    metavar="N",
    help="Plan for N devices (processes), each taking a micro-batch of --batch-size (a run's global "
    "--batch-size is N times that): the peak on each. Default: 1.",
)
_declare(
    "fsdp",
    "--fsdp",
    is_flag=True,
    default=None,
    help="With --processes N: fully sharded (FSDP2), weights, gradients and optimizer state split N ways "
    "(default: data parallel, each process holding all of them).",
)
_declare(
    "seeds",
    "--seeds",
    default="0",
    show_default=True,
    help="Comma-separated seeds; each seed is its own split and run, summarised as mean and spread.",
)
_declare(
    "auto_fit",
    "--auto-fit",
    is_flag=True,
    help="With --memory-budget: before reporting a strategy as not fitting, add levers in turn "
    "(bf16, gradient checkpointing, 8-bit AdamW, 4-bit base), skipping what the planner "
    "predicts will not fit.",
)
_declare("num_labels", "--num-labels", type=int, default=None, help="Classes of the task. Default: 2.")
_declare(
    "loss_tokens",
    "--loss-tokens",
    "loss_positions",
    type=int,
    default=None,
    help="causal-lm: tokens per example the loss is on, whose vocabulary-wide logits are kept "
    "(default: a short answer, 4; plain text: give --max-length). peftkit bench measures it.",
)
_declare(
    "device",
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="What to plan for (default: cuda if this machine has a GPU, else cpu). On cpu the "
    "process's runtime memory is included, as a CPU run's measured peak includes it.",
)
_declare("json", "--json", "as_json", is_flag=True, help="Print it as JSON.")
_declare(
    "adapter",
    "--adapter",
    "adapter_dir",
    required=True,
    help="Adapter directory: a run's adapter/ folder, one in adapters/, or a plain peft adapter.",
)
_declare(
    "predict_adapter",
    "--adapter",
    "adapter_dir",
    default=None,
    help="Adapter directory: a run directory or its adapter/ folder, one in adapters/, or a plain peft "
    "adapter (or give --onnx).",
)
_declare(
    "onnx",
    "--onnx",
    default=None,
    metavar="DIR",
    help="Answer with an ONNX export (what peftkit export --output wrote), run by ONNX Runtime, instead of "
    "an --adapter.",
)
_declare(
    "output", "--output", required=True, help="Directory for the merged model (must not exist unless --overwrite)."
)
_declare(
    "eval_dataset",
    "--dataset",
    required=True,
    help="Labelled data to evaluate on, every example of it (no split): a data file (.csv/.json/.jsonl/"
    ".parquet, compressed too), a datasets save_to_disk directory, a short name or a hub id. Labels "
    "are matched to the adapter's by name.",
)
_declare(
    "eval_output",
    "--output",
    default=None,
    help="Directory for metrics.json and confusion_matrix.png (must not exist unless --overwrite). "
    "Default: print only.",
)
_declare(
    "input",
    "--input",
    "input_file",
    default=None,
    metavar="FILE",
    help="Read the inputs from FILE instead of TEXTS: .txt (one per line; - for stdin), .csv, .tsv or "
    ".jsonl (one per row, in --text-column).",
)
_declare(
    "predict_output",
    "--output",
    "output",
    default=None,
    metavar="FILE",
    help="Write the answers to FILE, .csv or .jsonl by its extension (must not exist unless --overwrite). "
    "Default: JSON lines on stdout.",
)
_declare(
    "max_new_tokens",
    "--max-new-tokens",
    type=int,
    default=None,
    metavar="N",
    help="causal-lm: generate at most N tokens (default: a label's length for an adapter trained on "
    "labelled data, else 64).",
)
_declare(
    "do_sample",
    "--do-sample",
    is_flag=True,
    default=False,
    help="causal-lm: sample instead of greedy decoding (seeded by --seed).",
)
_declare(
    "temperature", "--temperature", type=float, default=None, help="causal-lm, with --do-sample: sampling temperature."
)
_declare(
    "top_p",
    "--top-p",
    type=float,
    default=None,
    help="causal-lm, with --do-sample: nucleus sampling, keep the tokens of the top P probability.",
)
_declare(
    "chat",
    "--chat",
    is_flag=True,
    default=False,
    help="causal-lm: put each prompt in the model's chat template (an error if its tokenizer has none).",
)
_declare(
    "force",
    "--force",
    is_flag=True,
    help="Use the adapter even if the base model's weights differ from those it was trained on.",
)

_declare(
    "trials",
    "--trials",
    type=int,
    default=20,
    show_default=True,
    help="Trials the study should hold at the end; those already in it (an earlier tune, another process) count.",
)
_declare(
    "timeout",
    "--timeout",
    default=None,
    metavar="DURATION",
    help="Start no new trial after this long (90s, 30m, 2h, 1h30m); the running one finishes.",
)
_declare(
    "tune",
    "--tune",
    type=int,
    default=None,
    metavar="N",
    help="Tune every strategy first (peftkit tune: N trials each, trial 0 its defaults, on validation of the "
    "first seed), then run its defaults and its best configuration over the seeds; the table shows "
    "the tuned ones, a second table default vs tuned. Trials and studies: OUTPUT_DIR/tuning/.",
)
_declare(
    "train_sizes",
    "--train-sizes",
    default=None,
    metavar="SIZES",
    help="Accuracy against training-set size: run every strategy and seed at each size (comma-separated "
    "example counts or 'all', e.g. 250,500,1000,2000,all; nested seeded subsets). Adds a table per size "
    "and learning_curve.png; the main table shows the largest. Not with --max-train-samples or --tune.",
)
_declare(
    "tune_timeout",
    "--tune-timeout",
    default=None,
    metavar="DURATION",
    help="With --tune: start no trial of a strategy's study after this long (90s, 30m, 2h); the same "
    "for every strategy.",
)
_declare(
    "tune_storage",
    "--tune-storage",
    default=None,
    metavar="URL",
    help="With --tune: keep the studies in this database (sqlite:///studies.db, postgresql://...) instead "
    "of OUTPUT_DIR/tuning/, so that the same bench run again after an interruption continues them.",
)
_declare(
    "storage",
    "--storage",
    default=None,
    metavar="URL",
    help="Where the study lives: an SQLAlchemy database URL (sqlite:///study.db, postgresql://...). "
    "Default: sqlite:///OUTPUT_DIR/study.db.",
)
_declare("study_name", "--study-name", default=None, metavar="NAME", help="The study's name. Default: tune-<strategy>.")
_declare(
    "metric",
    "--metric",
    default=None,
    metavar="M",
    help="Validation metric to optimise (accuracy, f1_macro, loss, ...). Default: the task's selection "
    "metric (accuracy; causal-lm: loss).",
)
_declare(
    "pruner",
    "--pruner",
    type=click.Choice(["median", "hyperband", "none"]),
    default="median",
    show_default=True,
    help="Stop unpromising trials after an epoch's validation (never trial 0, the defaults).",
)
_declare(
    "space",
    "--space",
    "space_items",
    multiple=True,
    metavar="NAME=V1,V2,...",
    help="Search only these values of a searched setting (e.g. --space r=4,8,16); repeatable.",
)

LEVERS = ("quantize", "optimizer", "gradient_checkpointing", "precision", "loss", "packing", "kernels", "compile")


def options(*keys: str, **help_for: str) -> Callable[[Any], Any]:
    """Decorate a command with the declared options ``keys``, in that order (``help_for`` words a
    key's help for this command)."""

    def decorate(func: Any) -> Any:
        for key in reversed(keys):
            decls, attrs = _OPTIONS[key]
            func = click.option(*decls, **{**attrs, "help": help_for.get(key, attrs.get("help"))})(func)
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
@options("json", json="Print the report as JSON.")
@click.option(
    "--lock",
    "lock_file",
    default=None,
    metavar="FILE",
    help="Compare with this lock file (default: the repository's requirements.lock; $PEFTKIT_LOCK).",
)
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
@click.option(
    "--verbose", "-v", is_flag=True, help="Also show each strategy's options, defaults and the models it covers."
)
def list_cmd(verbose: bool) -> None:
    """List the registered strategies (built-in and plugins)."""
    from . import registry
    from .strategies.base import option_help

    strategies = registry.available()
    plugins = registry.loaded_plugins()
    width = max(len(n) for n in strategies)
    for name, cls in strategies.items():
        origin = f"  [plugin: {plugins[name]}]" if name in plugins else ""
        click.echo(f"{name:<{width}}  {cls.description}{origin}")
        if verbose:
            d = cls.defaults
            click.echo(
                f"{'':<{width}}  defaults: lr={d.lr:g} epochs={d.epochs} batch_size={d.batch_size} "
                f"weight_decay={d.weight_decay:g} warmup_ratio={d.warmup_ratio:g} "
                f"(warmup at most {d.max_warmup_steps} steps)"
            )
            click.echo(
                f"{'':<{width}}  small data: at least min_steps={d.min_steps} optimizer steps, epochs "
                f"raised up to max_epochs={d.max_epochs}, with early stopping (unless --epochs)"
            )
            if cls.covers:
                click.echo(f"{'':<{width}}  covers: {cls.covers}")
            for opt, typ, default in option_help(cls):
                click.echo(f"{'':<{width}}  --set {opt}=...  ({typ}, default {default})")
    for message in registry.plugin_errors():
        _echo(f"warning: {message}")
    if verbose:
        from .data import EMBEDDED_DATASETS, EMBEDDED_IMAGE_DATASETS
        from .models import EMBEDDED_MODELS
        from .tasks import TASKS, get_task, task_names, task_plugin_errors

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
    "fsdp",
    "report_to",
    "set",
    "output_dir",
    "overwrite",
    fsdp="Under several processes (torchrun, accelerate launch): shard parameters, gradients and optimizer "
    "state over them (FSDP2) instead of data parallel; see docs/scale-out.md.",
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
        _print_summary(result.metrics, result.run_dir)


@contextlib.contextmanager
def _own_learned_nothing_line() -> Iterator[None]:
    """The library's ``LearnedNothingWarning`` silenced: the command prints its own warning line after
    the figures (``_print_summary``), not Python's ``file:line: Warning`` form."""
    from .errors import LearnedNothingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LearnedNothingWarning)
        yield


def _adapter_size(size: int) -> str:
    """An adapter's size: ``3 KiB`` for head_only's head (not ``0.00 MiB``), ``3.53 MiB`` above a MiB."""
    from .memory import format_size

    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else format_size(size)


def _print_summary(m: RunMetrics, out: str) -> None:
    from .memory import format_size
    from .tasks import get_task

    task = get_task(m.task)
    shown = ", ".join(
        f"{k.replace('_', ' ')} {m.test[k]:.4f}" for k in task.headline_metrics if m.test.get(k) is not None
    )
    chosen = m.validation.get(task.selection_metric)
    click.echo(
        f"{m.strategy}: test {shown} (validation {task.selection_metric} "
        f"{chosen:.4f}, best epoch {m.best_epoch})\n"
        f"  trainable {m.trainable_params:,} of {m.total_params:,} parameters "
        f"({m.trainable_percent:.2f}%), adapter {_adapter_size(m.adapter_bytes or 0)}\n"
        f"  train {m.train_seconds:.1f} s ({m.samples_per_second:.1f} examples/s), "
        f"wall {m.wall_seconds or 0:.1f} s on {m.device}\n"
        f"  peak memory training {format_size(m.peak_memory_bytes)} "
        f"(+{format_size(m.peak_memory_increase_bytes)} over the loaded model), "
        f"evaluation {format_size(m.peak_memory_eval_bytes)}\n"
        f"  run directory: {out}"
    )
    if m.learned is False:  # after the figures, so that they do not read as a result (metrics.json: learned)
        _echo(f"warning: this run learned nothing: {m.learned_note}")


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
    "batch_size",
    "max_length",
    "eval_batch_size",
    "early_stopping_patience",
    *LEVERS,
    "memory_budget",
    "auto_fit",
    "tune",
    "tune_timeout",
    "tune_storage",
    "train_sizes",
    "output_dir",
    "overwrite",
    batch_size="Effective batch for every strategy (default: 32); under a memory budget it is kept with "
    "gradient accumulation when the micro-batch must shrink.",
    memory_budget="Memory each run may use, e.g. 4GiB (CUDA: allocator cap; CPU: peak resident memory). "
    "The largest micro-batch that fits is found by halving.",
    output_dir="Where results go. Default: runs/bench-<timestamp>.",
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
    *LEVERS,
    "memory_budget",
    "set",
    "trials",
    "timeout",
    "storage",
    "study_name",
    "metric",
    "pruner",
    "space",
    "output_dir",
    "overwrite",
    strategy="Strategy to tune (see `peftkit list`); required.",
    epochs="Epochs of every trial (default: searched around those a plain run trains on this data).",
    lr="Fix the learning rate (default: searched, log-uniform over 1/10..10x the strategy's own).",
    set="Fix a strategy option (not searched), repeatable: --set r=16.",
    output_dir="Where the study and reports go; give the same one again to continue the study. "
    "Default: runs/tune-<strategy>-<timestamp>.",
    overwrite="Start afresh: replace the output directory, and a study of that name made for "
    "another strategy, model, dataset or metric.",
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
    _print_tune(result)


def _print_tune(result: Any) -> None:
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


@cli.command("plan")
@options(
    "task",
    "model",
    "strategies",
    "batch_size",
    "max_length",
    "num_labels",
    "loss_tokens",
    *LEVERS,
    "processes",
    "fsdp",
    "memory_budget",
    "device",
    "json",
    strategies="'all' or names: lora,full,head_only.",
    batch_size="Micro-batch size. Default: 32.",
    memory_budget="Say what fits in SIZE (e.g. 8GiB), and the largest batch that does.",
    json="Print the estimates as JSON.",
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
        _print_plan(result.settings, result.estimates)
    if result.failed:
        _echo(
            f"error: planning failed for {', '.join(result.failed)} (the reason is in "
            f"{'the JSON' if as_json else 'the lines below the table'})"
        )
        raise click.exceptions.Exit(1)


def _plan_row(e: Any, settings: Any, budget: int | None) -> list[str]:
    """One strategy's cells; a strategy not planned keeps the table's shape (its reason goes below)."""
    from .memory import format_size

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


def _print_plan(settings: Any, estimates: list[Any]) -> None:
    from .benchmark.ladder import describe_levers
    from .memory import format_size, parse_size

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
    )
    header = ["strategy", "status", "trainable", "weights", "gradients", "optimizer", "activations", "workspace"]
    header += ["communication"] if settings.processes > 1 else []
    header += ["runtime"] if settings.device == "cpu" else []
    header += ["peak"] + (["fits?", "largest batch"] if budget else [])
    rows = [header] + [_plan_row(e, settings, budget) for e in estimates]
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


@cli.command("predict")
@options(
    "predict_adapter",
    "onnx",
    "base_model",
    "force",
    "input",
    "text_column",
    "predict_output",
    "overwrite",
    "batch_size",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "seed",
    "chat",
    text_column="Column of an --input .csv/.tsv/.jsonl file holding the inputs (default: guessed: text, "
    "sentence, prompt, ...; images: image, path, file).",
    overwrite="Replace an existing --output file.",
    batch_size="Inputs per forward pass (default: 64; causal-lm 16).",
    seed="Seed for --do-sample (default 0: the same command samples the same answers).",
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
    "adapter",
    "eval_dataset",
    "text_column",
    "label_column",
    "response_column",
    "base_model",
    "force",
    "max_eval_samples",
    "batch_size",
    "eval_output",
    "overwrite",
    "json",
    adapter="Adapter directory (a run's adapter/ folder, one in adapters/, a plain peft adapter) or a run directory.",
    max_eval_samples="Evaluate a seeded sample of N examples instead of all (a language model's "
    "generation on a CPU is slow).",
    batch_size="Evaluation batch size. Default: 32.",
    json="Print the results as JSON.",
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
        _print_evaluation(result)
    if result.warning:
        _echo(f"warning: {result.warning}")


def _print_evaluation(result: Any) -> None:
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


@cli.command("merge")
@options(
    "adapter", "output", "base_model", "force", "overwrite", adapter="Adapter directory to merge into its base model."
)
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
@options("adapter", "base_model", "force", adapter="Adapter directory to export (a run directory means its adapter/).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "gguf"]),
    default="onnx",
    show_default=True,
    help="What to write: onnx (sequence and image classification) or gguf (causal-lm on a Llama-"
    "architecture base: llama.cpp, Ollama).",
)
@click.option("--output", required=True, help="Directory to write (must not exist unless --overwrite).")
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    default=None,
    help="ONNX Runtime dynamic int8 quantization (weights per channel): ~4x smaller, faster on CPU; "
    "kept only if it gives PyTorch's label on at least 99% of the check examples.",
)
@click.option(
    "--min-agreement",
    type=float,
    default=None,
    metavar="FRACTION",
    help="With --quantize int8: the share of check examples on which it must give PyTorch's label "
    "(default 0.99); recorded in peftkit_export.json.",
)
@click.option("--opset", type=int, default=None, help="ONNX opset, 18 to 23. Default: 18.")
@click.option(
    "--dataset",
    default=None,
    help="Labelled data to check the export on, every example (default: the test split the adapter "
    "was evaluated on, from its recorded dataset and seed).",
)
@options("text_column", "label_column", "overwrite")
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
@options("json", json="Print the metadata as JSON.")
def inspect_cmd(adapter_dir: str, as_json: bool) -> None:
    """Show what an adapter is: strategy, base model and fingerprint, labels, size, metrics."""
    from . import api

    meta = api.inspect(adapter_dir)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
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
        ("size", f"{meta['adapter_bytes']:,} bytes ({_adapter_size(meta['adapter_bytes'])})"),
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
        ("trained on", f"{meta.get('dataset', '?')}, seed {m.get('seed', '?')}, {_epochs_trained(m)}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")


def _epochs_trained(m: dict[str, Any]) -> str:
    """``7 of 15 epoch(s) (stopped early), best 2``: what training did, not only what was planned
    (an adapter saved before epochs_run and best_epoch were recorded shows the planned epochs)."""
    planned, ran, best = m.get("epochs", "?"), m.get("epochs_run"), m.get("best_epoch")
    if ran is None:
        return f"{planned} epoch(s)"
    early = " (stopped early)" if isinstance(planned, int) and ran < planned else ""
    shown = f"{ran} of {planned} epoch(s){early}" if early else f"{ran} epoch(s)"
    return shown + (f", best {best}" if best is not None else "")


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
