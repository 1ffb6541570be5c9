"""The ``peftkit`` command line.

Heavy libraries (torch, transformers, peft) are imported inside the commands that need them, so
``peftkit --help`` and ``peftkit list`` answer at once. Every error a user can cause is printed as
one line starting with ``error:`` and exits with status 2; no traceback. An exception raised inside
a library (transformers, peft, accelerate, bitsandbytes, torch, ...) is one line too, naming the
library, the strategy, the model type and the library's message, with status 1; ``--debug`` (or
``PEFTKIT_DEBUG=1``) shows its traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .errors import PeftkitError, clear_context, debug_requested, library_error_line, raising_library, set_context
from .tasks import TASK_NAMES


def _quiet_libraries() -> None:
    """Silence library chatter that is not for our users (load reports, per-map progress bars)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes (imported by peft) warns on CPUs with AVX512-BF16 that an optional kernel
    # package is missing; the fallback it uses works, and the message only alarms users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: ours is the one that matters


def lever_options(func: Any) -> Any:
    """The memory levers, the same in run, bench and plan."""
    from .levers import OPTIMIZERS, PRECISIONS, QUANTIZATIONS

    options = [
        click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
                     help="Load the frozen base quantized (bitsandbytes; 4bit = NF4 + double quantization, "
                          "QLoRA). For lora, adapter, prefix, head_only."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None,
                     help="adamw (torch, default), adamw8bit or paged_adamw8bit (bitsandbytes; paged: CUDA only)."),
        click.option("--gradient-checkpointing", is_flag=True, default=None,
                     help="Recompute activations in the backward pass: less memory, slower."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="Mixed precision via accelerate (default fp32; fp16 needs CUDA). Frozen weights "
                          "are then stored in 16 bits."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _echo(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit")
@click.option("--debug", is_flag=True, help="Show the full traceback when a library (transformers, peft, "
                                            "torch, ...) fails, instead of one line. Also: PEFTKIT_DEBUG=1.")
def cli(debug: bool) -> None:
    """Fine-tune pretrained models with interchangeable strategies.

    \b
    peftkit list                      strategies and what they do
    peftkit run --strategy lora       fine-tune and evaluate (embedded default: MiniLM on Rotten Tomatoes)
    peftkit bench                     every strategy side by side: memory, speed, accuracy
    peftkit plan --memory-budget 8GiB predicted peak memory of each strategy, without training
    peftkit predict --adapter DIR T   classify texts with a trained adapter
    peftkit inspect DIR               what an adapter is, what it was trained on, how well it did
    peftkit merge --adapter DIR --output OUT   base + adapter as one plain transformers model
    peftkit env                       versions, device and lock status, for bug reports
    """
    global _DEBUG
    _DEBUG = _DEBUG or debug
    ctx = click.get_current_context()
    set_context(command=ctx.invoked_subcommand)


@cli.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--lock", "lock_file", default=None, metavar="FILE",
              help="Compare with this lock file (default: the repository's requirements.lock; $PEFTKIT_LOCK).")
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
@click.option("--verbose", "-v", is_flag=True, help="Also show each strategy's options and defaults.")
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
            click.echo(f"{'':<{width}}  defaults: lr={d.lr:g} epochs={d.epochs} batch_size={d.batch_size} "
                       f"weight_decay={d.weight_decay:g} warmup_ratio={d.warmup_ratio:g}")
            for opt, typ, default in option_help(cls):
                click.echo(f"{'':<{width}}  --set {opt}=...  ({typ}, default {default})")
    for message in registry.plugin_errors():
        _echo(f"warning: {message}")
    if verbose:
        from .data import EMBEDDED_DATASETS, EMBEDDED_IMAGE_DATASETS
        from .models import EMBEDDED_MODELS

        click.echo("\ntasks (--task; default: read from the model):")
        from .tasks import get_task

        for task in TASK_NAMES:
            t = get_task(task)
            click.echo(f"  {task:<24} {t.description} Default: --model {t.default_model} --dataset {t.default_dataset}")
        click.echo("embedded models (--model):")
        for name, emb in EMBEDDED_MODELS.items():
            click.echo(f"  {name:<10} {emb.description} [{emb.task}]")
        click.echo("embedded datasets (--dataset):")
        for name, ds in EMBEDDED_DATASETS.items():
            click.echo(f"  {name:<16} {ds.description}")
        for name, (_, _, description) in EMBEDDED_IMAGE_DATASETS.items():
            click.echo(f"  {name:<16} {description} [image-classification]")


@cli.command("run")
@click.option("--strategy", "-s", default=None, help="Strategy name (see `peftkit list`). Default: lora.")
@click.option("--task", type=click.Choice(TASK_NAMES),
              default=None, help="What to learn. Default: what the model is made for (read from its config), "
                                 "else sequence-classification.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file with the same settings as these flags plus a strategy_options block; flags override it.")
@click.option("--model", default=None,
              help="Short name (minilm, smollm2, vit-tiny), hub id or local model directory. Default: the task's "
                   "(minilm; smollm2 for causal-lm; vit-tiny for image-classification).")
@click.option("--dataset", default=None,
              help="Short name (rotten_tomatoes, digits, mnist), hub id, data file (.csv/.json/.jsonl/.parquet, "
                   "compressed too) or a datasets save_to_disk directory. Default: the task's.")
@click.option("--text-column", default=None,
              help="Column holding the text (causal-lm: the prompt) (default: guessed: text, sentence, prompt, ...).")
@click.option("--label-column", default=None, help="Column holding the label (default: guessed: label, labels, ...).")
@click.option("--response-column", default=None,
              help="causal-lm: column holding the answer to learn (default: guessed: response, output, completion, "
                   "answer); without one, a labelled dataset is phrased as a completion task.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the strategy's own).")
@click.option("--batch-size", type=int, default=None,
              help="Training batch size (default: the strategy's own); with several processes, the global batch.")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: the strategy's own).")
@click.option("--max-length", type=int, default=None, help="Tokens per example, longer texts truncated. "
                                                            "Default: 64 (causal-lm: 128).")
@click.option("--max-train-samples", type=int, default=None, help="Use at most N training examples (seeded).")
@click.option("--max-eval-samples", type=int, default=None,
              help="Use at most N validation and N test examples (seeded); evaluating a language model on a CPU is slow.")
@click.option("--seed", type=int, default=None, help="Random seed for split, sampling and initialisation. Default: 0.")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay on weight matrices.")
@click.option("--warmup-ratio", type=float, default=None, help="Fraction of steps with linear warmup.")
@click.option("--grad-accumulation", type=int, default=None, help="Micro-batches per optimizer step. Default: 1.")
@click.option("--early-stopping-patience", type=int, default=None,
              help="Stop after N epochs without better validation accuracy.")
@lever_options
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Cap on memory, e.g. 4GiB: on CUDA the allocator's limit, on CPU the process's peak "
                   "resident memory; a run over it stops with an error.")
@click.option("--checkpoint-every", type=int, default=None, metavar="N",
              help="Write the whole training state every N optimizer steps; a run that stops (even killed) "
                   "continues with --resume.")
@click.option("--resume", "resume_dir", default=None, metavar="RUN_DIR",
              help="Continue the interrupted run that was going to RUN_DIR (its --output-dir) from its last "
                   "checkpoint, with its own settings; give no other option.")
@click.option("--report-to", "report_to", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              help="Send losses and metrics to TensorBoard (event files in RUN_DIR/tensorboard) or W&B "
                   "(if installed); repeatable.")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Strategy option, repeatable (e.g. --set r=16 --set alpha=32); see `peftkit list -v`.")
@click.option("--output-dir", default=None, help="Run directory. Default: runs/<strategy>-<timestamp>.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
def run_cmd(strategy: str | None, config_file: str | None, set_items: tuple[str, ...], overwrite: bool,
            output_dir: str | None, resume_dir: str | None, report_to: tuple[str, ...], **flags: Any) -> None:
    """Fine-tune a model with a strategy, evaluate it, and save the run.

    The run directory holds config.yaml (every setting, resolved), metrics.json, train.log and
    adapter/ (what the strategy trained, as safetensors, with its metadata). It appears only when
    the run has finished; until then the run is written into .NAME.partial beside it.

    Runs unchanged under `accelerate launch` or `torchrun` (data parallel; only the main process
    writes). See the README on multi-GPU and multi-node runs.
    """
    from .config import build_run_config, default_output_dir, parse_set_options

    if resume_dir is not None:
        given = [k for k, v in flags.items() if v is not None] + (["strategy"] if strategy else []) \
            + (["config"] if config_file else []) + (["set"] if set_items else []) \
            + (["output-dir"] if output_dir else []) + (["report-to"] if report_to else [])
        if given or overwrite:
            raise PeftkitError(f"--resume continues a run with its own settings; drop --{given[0].replace('_', '-') if given else 'overwrite'}")
        cfg = _resumed_config(resume_dir)
        cfg.output_dir = resume_dir  # as given now: the recorded one may be relative to another directory
    else:
        flags = dict(flags, strategy=strategy, output_dir=output_dir, report_to=list(report_to) or None)
        cfg = build_run_config(config_file, flags, parse_set_options(set_items))
        cfg.overwrite = overwrite
    from .train import execute_run, resolve

    run = resolve(cfg)  # unknown strategy or bad options fail here, before anything heavy loads
    set_context(strategy=run.strategy.name, model=cfg.model)
    out = cfg.output_dir or default_output_dir(run.strategy.name)
    run.config.output_dir = out
    _quiet_libraries()
    metrics = _run_staged(run, out, resume=resume_dir is not None, execute=execute_run)
    if metrics is not None:
        _print_summary(metrics, out)


def _resumed_config(run_dir: str) -> Any:
    """The settings an interrupted run recorded (its config.yaml) as a ``RunConfig``."""
    import yaml

    from .config import FIELDS, RunConfig
    from .rundir import stage_path

    path = os.path.join(stage_path(run_dir), "config.yaml")
    if not os.path.exists(path):
        from .rundir import open_stage

        open_stage(run_dir, overwrite=False, resume=True)  # says why there is nothing to resume
        raise PeftkitError(f"interrupted run {run_dir!r} has no config.yaml; it cannot be resumed")
    with open(path, encoding="utf-8") as fh:
        recorded = yaml.safe_load(fh)
    cfg = RunConfig(**{k: v for k, v in recorded.items() if k in FIELDS})
    cfg.validate()
    return cfg


def _run_staged(run: Any, out: str, resume: bool, execute: Any) -> dict[str, Any] | None:
    """Run into the staging directory and move it to ``out`` when done. With several processes
    only the main one touches directories; the others wait for it. A failed run keeps its staging
    directory only if it holds a checkpoint (and says how to resume)."""
    from accelerate import PartialState

    from .rundir import abandon_stage, finish_stage, open_stage, stage_path

    import torch

    # joins the process group under accelerate launch / torchrun; on a machine without a GPU (or
    # when accelerate was told to use the CPU) it must be told, or each process trains alone
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=cpu)
    stage = stage_path(out)
    problem: BaseException | None = None
    if state.is_main_process:
        try:
            open_stage(out, run.config.overwrite, resume)
        except BaseException as exc:  # the other processes must not wait forever for us
            problem = exc
    if state.num_processes > 1:
        flag = [problem is None]
        import torch.distributed as dist

        dist.broadcast_object_list(flag, src=0)
        if not flag[0]:
            if problem is not None:
                raise problem
            raise SystemExit(2)  # the main process reports the error
    elif problem is not None:
        raise problem
    try:
        metrics = execute(run, stage, _echo, resume=resume)
    except BaseException:
        if state.is_main_process and abandon_stage(stage):
            global _INTERRUPTED
            _INTERRUPTED = f"the last checkpoint is kept: continue with peftkit run --resume {out}"
            _echo(f"the run stopped; {_INTERRUPTED}")
        raise
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    finish_stage(stage, out, run.config.overwrite)
    return metrics


def _print_summary(m: dict[str, Any], out: str) -> None:
    from .memory import format_size
    from .tasks import get_task

    task = get_task(m.get("task", "sequence-classification"))
    shown = ", ".join(f"{k.replace('_', ' ')} {m['test_' + k]:.4f}" for k in task.headline_metrics
                      if m.get("test_" + k) is not None)
    chosen = m.get(f"validation_{task.selection_metric}")
    click.echo(
        f"{m['strategy']}: test {shown} (validation {task.selection_metric} "
        f"{chosen:.4f}, best epoch {m['best_epoch']})\n"
        f"  trainable {m['trainable_params']:,} of {m['total_params']:,} parameters "
        f"({m['trainable_percent']:.2f}%), adapter {m['adapter_bytes'] / 2**20:.2f} MiB\n"
        f"  train {m['train_seconds']:.1f} s ({m['samples_per_second']:.1f} examples/s), "
        f"wall {m['wall_seconds']:.1f} s on {m['device']}\n"
        f"  peak memory training {format_size(m['peak_memory_bytes'])} "
        f"(+{format_size(m['peak_memory_increase_bytes'])} over the loaded model), "
        f"evaluation {format_size(m['peak_memory_eval_bytes'])}\n"
        f"  run directory: {out}"
    )


@cli.command("bench")
@click.option("--strategies", default="all", show_default=True,
              help="'all' (every registered strategy, plugins included) or names: lora,full,head_only.")
@click.option("--task", type=click.Choice(TASK_NAMES),
              default=None, help="What to learn (default: what the model is made for).")
@click.option("--model", default=None, help="Short name, hub id or local model directory (default: the task's; minilm).")
@click.option("--dataset", default=None,
              help="Short name, hub id, data file or datasets save_to_disk directory (default: the task's).")
@click.option("--text-column", default=None, help="Column holding the text, prompt or image (default: guessed).")
@click.option("--label-column", default=None, help="Column holding the label (default: guessed).")
@click.option("--response-column", default=None, help="causal-lm: column holding the answer (default: guessed).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs for every strategy (default: each strategy's own).")
@click.option("--max-train-samples", type=click.IntRange(min=1), default=None, help="Use at most N training examples (seeded).")
@click.option("--max-eval-samples", type=click.IntRange(min=1), default=None,
              help="Use at most N validation and N test examples (seeded).")
@click.option("--seeds", default="0", show_default=True,
              help="Comma-separated seeds; each seed is its own split and run, summarised as mean and spread.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Effective batch for every strategy; under a memory budget it is kept with gradient "
                   "accumulation when the micro-batch must shrink.")
@click.option("--max-length", type=click.IntRange(min=1), default=None, help="Tokens per example (default: the task's: 64, causal-lm 128).")
@click.option("--eval-batch-size", type=click.IntRange(min=1), default=128, show_default=True, help="Evaluation batch size.")
@click.option("--early-stopping-patience", type=click.IntRange(min=1), default=None,
              help="Stop a run after N epochs without better validation accuracy.")
@lever_options
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Memory each run may use, e.g. 4GiB (CUDA: allocator cap; CPU: peak resident memory). "
                   "The largest micro-batch that fits is found by halving.")
@click.option("--auto-fit", is_flag=True,
              help="With --memory-budget: before reporting a strategy as not fitting, add levers in turn "
                   "(bf16, gradient checkpointing, 8-bit AdamW, 4-bit base), skipping what the planner "
                   "predicts will not fit.")
@click.option("--output-dir", default=None, help="Where results go. Default: runs/bench-<timestamp>.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def bench_cmd(strategies: str, seeds: str, output_dir: str | None, overwrite: bool, **opts: Any) -> None:
    """Run every strategy on the same model and data and compare memory, speed and accuracy.

    \b
    Each strategy and seed runs in its own process. The output directory holds
    results.json   every run, a summary per strategy, versions, plugins, machine
    results.md     the table, best values in bold
    *.png          accuracy vs peak memory (Pareto front), accuracy vs time, validation curves
    runs/          each run's directory (config, metrics, log, adapter)
    """
    import datetime as _dt

    from .bench import BenchConfig, parse_seeds, parse_strategies, run_suite
    from .rundir import check_output_dir, staged_dir

    from .tasks import get_task, infer_task

    defaults = {"optimizer": "adamw", "precision": "fp32", "gradient_checkpointing": False}
    opts.update({k: v for k, v in defaults.items() if opts.get(k) is None})
    task = get_task(opts["task"] or infer_task(opts["model"]))
    opts.update(task=task.name, model=opts["model"] or task.default_model, dataset=opts["dataset"] or task.default_dataset,
                max_length=opts["max_length"] or task.default_max_length)
    bench = BenchConfig(strategies=parse_strategies(strategies), seeds=parse_seeds(seeds), **opts)
    if bench.auto_fit and not bench.memory_budget:
        raise PeftkitError("--auto-fit needs --memory-budget SIZE: it fits each strategy into that budget")
    for name in bench.strategies:  # every setting a run could refuse is checked now, before any worker
        bench.run_config(name, bench.seeds[0], bench.batch_size, "unused")
    out = output_dir or os.path.join("runs", f"bench-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    check_output_dir(out, overwrite)
    bench.output_dir = out
    bench.command = _command_line("bench")
    set_context(strategy=",".join(bench.strategies), model=bench.model)
    _quiet_libraries()
    num_labels, loss_positions = _preflight(bench)
    _echo(f"bench: {len(bench.strategies)} strategies x {len(bench.seeds)} seed(s) on {bench.model!r} / "
          f"{bench.dataset!r}, each run in its own process; results in {out}")
    import torch

    from .plan import bench_predictor

    predict = bench_predictor(bench.model, bench.batch_size, bench.max_length, num_labels,
                              "cuda" if torch.cuda.is_available() else "cpu", task=bench.task,
                              loss_positions=loss_positions)
    with staged_dir(out, overwrite) as stage:
        run_suite(bench, stage, _echo, predict=predict)
        with open(os.path.join(stage, "results.md"), encoding="utf-8") as fh:
            table = [line for line in fh if line.startswith("|")]
    click.echo("".join(table).rstrip())
    click.echo(f"results: {os.path.join(out, 'results.md')} (and results.json, plots, runs/)")


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


def _preflight(bench: Any) -> tuple[int, int | None]:
    """Fail in seconds, before any worker starts, on data or a model that no run could load.
    Returns the number of labels and, for the planner, the positions per example the loss is on."""
    from .tasks import get_task

    cfg = bench.run_config(bench.strategies[0], bench.seeds[0], bench.batch_size, "unused")
    task = get_task(bench.task)
    data = task.load_data(cfg)
    processor = task.load_processor(bench.model)
    return max(2, len(data.label_names or ())), task.loss_positions(data, processor, cfg)


@cli.command("plan")
@click.option("--task", type=click.Choice(TASK_NAMES),
              default=None, help="What to learn (default: what the model is made for).")
@click.option("--model", default=None, help="Short name, hub id or local model directory (default: the task's; minilm).")
@click.option("--strategies", default="all", show_default=True, help="'all' or names: lora,full,head_only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Micro-batch size.")
@click.option("--max-length", type=click.IntRange(min=1), default=None, help="Tokens per example (default: the task's: 64, causal-lm 128).")
@click.option("--num-labels", type=click.IntRange(min=2), default=2, show_default=True, help="Classes of the task.")
@click.option("--loss-tokens", "loss_positions", type=click.IntRange(min=1), default=None,
              help="causal-lm: tokens per example the loss is on, whose vocabulary-wide logits are kept "
                   "(default: a short answer, 4; plain text: give --max-length). peftkit bench measures it.")
@lever_options
@click.option("--memory-budget", default=None, metavar="SIZE", help="Say what fits in SIZE (e.g. 8GiB), "
                                                                     "and the largest batch that does.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="What to plan for (default: cuda if this machine has a GPU, else cpu). On cpu the "
                   "process's runtime memory is included, as a CPU run's measured peak includes it.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimates as JSON.")
def plan_cmd(strategies: str, device: str | None, as_json: bool, **opts: Any) -> None:
    """Predict each strategy's peak training memory without training.

    \b
    The peak is split into weights, gradients and optimizer state (arithmetic), activations
    (measured: a dozen training steps of a random-weight copy, whole if small, else at depth
    2 and 3 and extrapolated) and, on CPU, the runtime. Unlike `accelerate estimate-memory`
    it knows each strategy, activations, batch size, quantized bases and 8-bit optimizers.
    """
    from .bench import parse_strategies
    from .plan import PlanSettings, make_plan

    defaults = {"optimizer": "adamw", "precision": "fp32", "gradient_checkpointing": False}
    opts.update({k: v for k, v in defaults.items() if opts.get(k) is None})
    if opts["memory_budget"]:
        from .memory import parse_size

        parse_size(opts["memory_budget"])
    names = parse_strategies(strategies)
    from .tasks import get_task, infer_task

    task = get_task(opts["task"] or infer_task(opts["model"]))
    opts.update(task=task.name, model=opts["model"] or task.default_model,
                max_length=opts["max_length"] or task.default_max_length)
    _quiet_libraries()
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    set_context(strategy=",".join(names), model=opts["model"])
    settings = PlanSettings(strategies=names, device=device, **opts)
    estimates = make_plan(settings)
    if as_json:
        click.echo(json.dumps({"settings": vars(settings), "estimates": [e.as_dict() for e in estimates]}, indent=2))
        return
    _print_plan(settings, estimates)


def _print_plan(settings: Any, estimates: list[Any]) -> None:
    from .bench import describe_levers
    from .memory import format_size, parse_size

    budget = parse_size(settings.memory_budget) if settings.memory_budget else None
    length = f" x {settings.max_length} tokens" if settings.max_length else ""
    if settings.loss_positions:
        length += f" (loss on {settings.loss_positions} per example)"
    click.echo(f"{settings.model} ({settings.task}): batch {settings.batch_size}{length}, "
               f"levers: {describe_levers(vars(settings))}, on {settings.device}"
               + (f", budget {format_size(budget)}" if budget else ""))
    header = ["strategy", "trainable", "weights", "gradients", "optimizer", "activations", "workspace"]
    header += ["runtime"] if settings.device == "cpu" else []
    header += ["peak"] + (["fits?", "largest batch"] if budget else [])
    rows = []
    for e in estimates:
        if e.status != "ok":
            rows.append([e.strategy, f"{e.status}: {e.error}"])
            continue
        row = [e.strategy, f"{e.trainable_params:,}", format_size(e.weights), format_size(e.gradients),
               format_size(e.optimizer), format_size(e.activations), format_size(e.workspace)]
        row += [format_size(e.runtime)] if settings.device == "cpu" else []
        row += [format_size(e.total)]
        if budget:
            row += ["yes" if e.total <= budget else "no", str(e.max_batch_size)]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + [r for r in rows if len(r) > i]) for i in range(len(header))]
    for r in [header] + rows:
        if len(r) == 2 and len(header) > 2:
            click.echo(f"{r[0]:<{widths[0]}}  {r[1]}")
        else:
            click.echo("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths))))
    notes: dict[str, list[str]] = {}
    for e in estimates:
        for note in e.notes:
            notes.setdefault(note, []).append(e.strategy)
    for note, names in notes.items():
        who = "" if len(names) == len(estimates) else f" ({', '.join(names)})"
        click.echo(f"note{who}: {note}")


@cli.command("predict")
@click.option("--adapter", "adapter_dir", required=True,
              help="Adapter directory: a run's adapter/ folder, one in adapters/, or a plain peft adapter.")
@click.option("--model", default=None, help="Base model (default: the one named in the adapter's metadata).")
@click.option("--force", is_flag=True, help="Apply the adapter even if the base model's weights differ from "
                                            "those it was trained on.")
@click.argument("texts", nargs=-1, required=True)
def predict_cmd(adapter_dir: str, model: str | None, force: bool, texts: tuple[str, ...]) -> None:
    """Answer TEXTS with a trained adapter; prints one JSON object per input.

    
    sequence-classification: the label of each text
    causal-lm: the generated completion of each prompt (an adapter trained on labelled data
               phrases each text as it learned, and gives the label it answered)
    image-classification: TEXTS are image files; the label of each
    """
    _quiet_libraries()
    from .predict import load_adapter, predict_texts

    loaded = load_adapter(adapter_dir, model, force=force)
    for row in predict_texts(loaded, list(texts)):
        click.echo(json.dumps(row, ensure_ascii=False))


@cli.command("merge")
@click.option("--adapter", "adapter_dir", required=True, help="Adapter directory to merge into its base model.")
@click.option("--output", required=True, help="Directory for the merged model (must not exist unless --overwrite).")
@click.option("--model", default=None, help="Base model (default: the one named in the adapter's metadata).")
@click.option("--force", is_flag=True, help="Merge even if the base model's weights differ from the adapter's.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def merge_cmd(adapter_dir: str, output: str, model: str | None, force: bool, overwrite: bool) -> None:
    """Merge an adapter into its base and write a standard transformers model directory.

    The result (safetensors + tokenizer or image processor) loads with the task's AutoModelFor...
    class (sequence or image classification, causal LM) and predicts like base + adapter. Works for lora (weights folded in), full and gradual_unfreeze;
    strategies that add modules of their own (head_only, adapter, prefix) cannot be merged.
    """
    from .rundir import check_output_dir, staged_dir

    check_output_dir(output, overwrite)
    _quiet_libraries()
    from .predict import load_adapter, merge_to_directory

    loaded = load_adapter(adapter_dir, model, force=force)
    with staged_dir(output, overwrite) as stage:
        merge_to_directory(loaded, stage)
    click.echo(f"merged {loaded.metadata['strategy']} adapter into {loaded.metadata['base_model']!r}: {output}")


@cli.command("inspect")
@click.argument("adapter_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def inspect_cmd(adapter_dir: str, as_json: bool) -> None:
    """Show what an adapter is: strategy, base model and fingerprint, labels, size, metrics."""
    from .adapter_io import adapter_bytes, check_adapter_dir, read_metadata, read_peft_config

    check_adapter_dir(adapter_dir)
    meta = read_metadata(adapter_dir)
    if meta is None:
        peft_config = read_peft_config(adapter_dir)
        if peft_config is None:
            raise PeftkitError(f"{adapter_dir!r} is not an adapter directory (no peftkit_adapter.json or adapter_config.json)")
        meta = {"format": "peft (no peftkit metadata)", "peft_type": peft_config.get("peft_type"),
                "base_model": peft_config.get("base_model_name_or_path")}
    meta["adapter_bytes"] = adapter_bytes(adapter_dir)
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
        ("size", f"{meta['adapter_bytes']:,} bytes ({meta['adapter_bytes'] / 2**20:.2f} MiB)"),
        ("task", meta.get("task", "sequence-classification")),
        ("test accuracy", f"{m['test_accuracy']:.4f}" + (f" (macro-F1 {m['test_f1_macro']:.4f})" if "test_f1_macro" in m else "")
         if "test_accuracy" in m else "-"),
        *([("test perplexity", f"{m['test_perplexity']:.4f}" + (f" (exact match {m['test_exact_match']:.4f})"
                                                             if "test_exact_match" in m else ""))]
          if "test_perplexity" in m else []),
        ("trained on", f"{meta.get('dataset', '?')}, seed {m.get('seed', '?')}, {m.get('epochs', '?')} epoch(s)"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")


# what an interrupted command leaves behind (a run with checkpoints keeps them)
_INTERRUPTED = "nothing was written"
# --debug given (PEFTKIT_DEBUG=1 is read when an error happens)
_DEBUG = False


def _terminate(signum: int, frame: Any) -> None:
    # `kill` (SIGTERM) gets the same clean-up as Ctrl-C: staged output removed, workers stopped
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turns user errors into one line on stderr and a non-zero exit."""
    import signal

    global _DEBUG
    _DEBUG = False
    clear_context()
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): keep the default
        pass
    try:
        code = cli.main(args=argv, prog_name="peftkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:  # click's form of Ctrl-C (and of our SIGTERM handler)
        click.echo(f"error: interrupted; {_INTERRUPTED}", err=True)
        code = 130
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        code = exc.exit_code
    except PeftkitError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 2
    except KeyboardInterrupt:
        click.echo(f"error: interrupted; {_INTERRUPTED}", err=True)
        code = 130
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
