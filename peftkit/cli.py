"""The ``peftkit`` command line.

Heavy libraries (torch, transformers, peft) are imported inside the commands that need them, so
``peftkit --help`` and ``peftkit list`` answer at once. Every error a user can cause is printed as
one line starting with ``error:`` and exits with status 2; no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .errors import PeftkitError


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


def _echo(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit")
def cli() -> None:
    """Fine-tune pretrained models with interchangeable strategies.

    \b
    peftkit list                      strategies and what they do
    peftkit run --strategy lora       fine-tune and evaluate (embedded default: MiniLM on Rotten Tomatoes)
    peftkit predict --adapter DIR T   classify texts with a trained adapter
    peftkit inspect DIR               what an adapter is, what it was trained on, how well it did
    peftkit merge --adapter DIR --output OUT   base + adapter as one plain transformers model
    """


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


@cli.command("run")
@click.option("--strategy", "-s", default=None, help="Strategy name (see `peftkit list`). Default: lora.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file with the same settings as these flags plus a strategy_options block; flags override it.")
@click.option("--model", default=None, help="Short name (minilm), hub id or local model directory. Default: minilm.")
@click.option("--dataset", default=None,
              help="Short name (rotten_tomatoes), hub id, data file (.csv/.json/.jsonl/.parquet, compressed too) "
                   "or a datasets save_to_disk directory. Default: rotten_tomatoes.")
@click.option("--text-column", default=None, help="Column holding the text (default: guessed: text, sentence, ...).")
@click.option("--label-column", default=None, help="Column holding the label (default: guessed: label, labels, ...).")
@click.option("--epochs", type=int, default=None, help="Epochs (default: the strategy's own).")
@click.option("--batch-size", type=int, default=None, help="Training batch size (default: the strategy's own).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: the strategy's own).")
@click.option("--max-length", type=int, default=None, help="Tokens per example, longer texts truncated. Default: 64.")
@click.option("--max-train-samples", type=int, default=None, help="Use at most N training examples (seeded).")
@click.option("--seed", type=int, default=None, help="Random seed for split, sampling and initialisation. Default: 0.")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay on weight matrices.")
@click.option("--warmup-ratio", type=float, default=None, help="Fraction of steps with linear warmup.")
@click.option("--grad-accumulation", type=int, default=None, help="Micro-batches per optimizer step. Default: 1.")
@click.option("--early-stopping-patience", type=int, default=None,
              help="Stop after N epochs without better validation accuracy.")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Strategy option, repeatable (e.g. --set r=16 --set alpha=32); see `peftkit list -v`.")
@click.option("--output-dir", default=None, help="Run directory. Default: runs/<strategy>-<timestamp>.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
def run_cmd(strategy: str | None, config_file: str | None, set_items: tuple[str, ...], overwrite: bool,
            output_dir: str | None, **flags: Any) -> None:
    """Fine-tune a model with a strategy, evaluate it, and save the run.

    The run directory holds config.yaml (every setting, resolved), metrics.json, train.log and
    adapter/ (what the strategy trained, as safetensors, with its metadata).
    """
    from .config import build_run_config, default_output_dir, parse_set_options
    from .rundir import check_output_dir

    flags = dict(flags, strategy=strategy, output_dir=output_dir)
    cfg = build_run_config(config_file, flags, parse_set_options(set_items))
    cfg.overwrite = overwrite
    from .rundir import staged_dir
    from .train import execute_run, resolve

    run = resolve(cfg)  # unknown strategy or bad options fail here, before anything heavy loads
    out = cfg.output_dir or default_output_dir(run.strategy.name)
    check_output_dir(out, cfg.overwrite)
    _quiet_libraries()
    run.config.output_dir = out
    with staged_dir(out, cfg.overwrite) as stage:
        metrics = execute_run(run, stage, _echo)
    _print_summary(metrics, out)


def _print_summary(m: dict[str, Any], out: str) -> None:
    mib = m["peak_memory_bytes"] / 2**20
    click.echo(
        f"{m['strategy']}: test accuracy {m['test_accuracy']:.4f}, macro-F1 {m['test_f1_macro']:.4f} "
        f"(validation {m['validation_accuracy']:.4f}, best epoch {m['best_epoch']})\n"
        f"  trainable {m['trainable_params']:,} of {m['total_params']:,} parameters "
        f"({m['trainable_percent']:.2f}%), adapter {m['adapter_bytes'] / 2**20:.2f} MiB\n"
        f"  train {m['train_seconds']:.1f} s ({m['samples_per_second']:.1f} examples/s), "
        f"wall {m['wall_seconds']:.1f} s, peak memory {mib:.0f} MiB on {m['device']}\n"
        f"  run directory: {out}"
    )


@cli.command("predict")
@click.option("--adapter", "adapter_dir", required=True,
              help="Adapter directory: a run's adapter/ folder, one in adapters/, or a plain peft adapter.")
@click.option("--model", default=None, help="Base model (default: the one named in the adapter's metadata).")
@click.option("--force", is_flag=True, help="Apply the adapter even if the base model's weights differ from "
                                            "those it was trained on.")
@click.argument("texts", nargs=-1, required=True)
def predict_cmd(adapter_dir: str, model: str | None, force: bool, texts: tuple[str, ...]) -> None:
    """Classify TEXTS with a trained adapter; prints one JSON object per text."""
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

    The result (safetensors + tokenizer) loads with AutoModelForSequenceClassification.from_pretrained
    and predicts like base + adapter. Works for lora (weights folded in), full and gradual_unfreeze;
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
        ("test accuracy", f"{m['test_accuracy']:.4f} (macro-F1 {m['test_f1_macro']:.4f})" if "test_accuracy" in m else "?"),
        ("trained on", f"{meta.get('dataset', '?')}, seed {m.get('seed', '?')}, {m.get('epochs', '?')} epoch(s)"),
        ("versions", ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())),
    ]
    for key, value in rows:
        click.echo(f"{key:<17} {value}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turns user errors into one line on stderr and a non-zero exit."""
    try:
        code = cli.main(args=argv, prog_name="peftkit", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
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
        click.echo("error: interrupted; nothing was written", err=True)
        code = 130
    except OSError as exc:  # disk full, permission denied: the user's environment, not our bug
        click.echo(f"error: {exc}", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
