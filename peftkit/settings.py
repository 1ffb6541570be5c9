"""Every setting of every command, declared once: its flag(s), type, default, help and closed set.

The command line (``peftkit.cli``: a command lists its settings by key, ``@options("task", ...)``),
the config classes' fields (``RunConfig``, ``Levers``, ``BenchConfig``, ``TuneConfig``,
``PlanSettings``, ``EvalConfig``: ``field: int | None = setting("epochs")``), the YAML check (its
keys are ``RunConfig``'s fields) and ``docs/cli.md`` (``scripts/cli_docs.py``) are all read from
``SETTINGS``; ``tests/test_settings.py`` fails when a flag and a field disagree.

A key is a setting's name (the config field and YAML key), or ``COMMAND:NAME`` where a setting
means something else in one command and is worded (or defaulted) for it there: ``bench:batch_size``
is the effective batch of every strategy, 32 unless given.

Two defaults are kept apart on purpose: ``default`` is the config field's (what Python and YAML get
when they leave it out), ``cli_default`` what click fills in for a flag not given, almost always
None ("not given": the config, the strategy or the task decides, and ``--resume`` can tell a flag
given from one left out).

Values are checked where every front door (flags, YAML, Python) meets, not here: counts by the
config classes' ``validate``, the task by ``peftkit.tasks.get_task`` (so plugin tasks are
accepted). Imports nothing of peftkit's and no heavy library: the lowest layer.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

# -- the closed sets, each defined here once -------------------------------------------------
# The memory levers' accepted values: the command line's choices, the YAML check and ``Levers``'
# own check (through these Literal types) are all read from these.
Quantization = Literal["4bit", "8bit"]
OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
Precision = Literal["fp32", "bf16", "fp16"]
LossName = Literal["plain", "chunked"]
KernelsName = Literal["torch", "liger", "none"]
QUANTIZATIONS: tuple[str, ...] = typing.get_args(Quantization)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
LOSSES: tuple[str, ...] = typing.get_args(LossName)
KERNELS: tuple[str, ...] = typing.get_args(KernelsName)
REPORTERS = ("tensorboard", "wandb")
PRUNERS = ("median", "hyperband", "none")
DEVICES = ("cpu", "cuda")
EXPORT_FORMATS = ("onnx", "gguf")  # gguf: peftkit.gguf_export
EXPORT_QUANTIZATIONS = ("int8",)


class _Required:
    """The default of a field that must be given (a dataclass cannot hold ``dataclasses.MISSING``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Setting:
    """One setting: how it is given on the command line and what its config field holds."""

    key: str
    """``NAME``, or ``COMMAND:NAME`` for a command's own wording of ``NAME``."""
    flags: tuple[str, ...]
    """The option's declarations: ``("--strategy", "-s")``."""
    help: str
    field: str | None
    """The config field (and YAML key) it sets; None for a setting of the invocation only (``--json``)."""
    type: type = str
    """str, int, float, or bool for a flag that takes no value."""
    default: Any = REQUIRED
    """The config field's default; ``REQUIRED``: the field must be given."""
    cli_default: Any = None
    """What click gives for the flag not given (None: not given; the config's default applies)."""
    show_default: bool = False
    choices: tuple[str, ...] = ()
    """The closed set of accepted values (empty: open)."""
    metavar: str | None = None
    dest: str | None = None
    """The command function's parameter name where it is not the field's (``config_file``)."""
    multiple: bool = False
    required: bool = False
    file: bool = False
    """The value is a path to an existing file (``--config``)."""

    @property
    def flag(self) -> str:
        """The long flag, as messages and docs name it."""
        return self.flags[0]


SETTINGS: dict[str, Setting] = {}


def _add(key: str, *flags: str, field: str | None = "", default: Any = None, **attrs: Any) -> None:
    """Declare ``key`` (``field`` defaults to the key's NAME part; None: no config field)."""
    name = key.rpartition(":")[2] if field == "" else field
    SETTINGS[key] = Setting(key=key, flags=flags, field=name, default=default, **attrs)


def _vary(key: str, **changes: Any) -> None:
    """Declare ``COMMAND:NAME`` as ``NAME`` with ``changes`` (its help, its default) for that command."""
    SETTINGS[key] = dataclasses.replace(SETTINGS[key.rpartition(":")[2]], key=key, **changes)


# -- the table -------------------------------------------------------------------------------
_add("strategy", "--strategy", "-s", default="lora", help="Strategy name (see `peftkit list`). Default: lora.")
_add(
    "strategies",
    "--strategies",
    default=REQUIRED,
    cli_default="all",
    show_default=True,
    help="'all' (every registered strategy, plugins included) or names: lora,full,head_only.",
)
_add(
    "task",
    "--task",
    metavar="TASK",
    help="What to learn: sequence-classification, causal-lm, image-classification or a plugin's task "
    "(`peftkit list -v`). Default: what the model is made for (read from its config), else "
    "sequence-classification.",
)
_add(
    "config",
    "--config",
    field=None,
    dest="config_file",
    file=True,
    help="YAML file with the same settings as these flags plus a strategy_options block; flags override it.",
)
_add(
    "model",
    "--model",
    help="Short name (minilm, smollm2, vit-tiny), hub id or local model directory. Default: the task's "
    "(minilm; smollm2 for causal-lm; vit-tiny for image-classification).",
)
_add("base_model", "--model", field="model", help="Base model (default: the one named in the adapter's metadata).")
_add(
    "dataset",
    "--dataset",
    help="Short name (rotten_tomatoes, digits, mnist), hub id, data file (.csv/.json/.jsonl/.parquet, "
    "compressed too) or a datasets save_to_disk directory. Default: the task's.",
)
_add(
    "text_column",
    "--text-column",
    help="Column holding the text (causal-lm: the prompt; images: the image) (default: guessed: text, "
    "sentence, prompt, ...).",
)
_add(
    "label_column",
    "--label-column",
    help="Column holding the label (default: guessed: label, labels, ...).",
)
_add(
    "response_column",
    "--response-column",
    help="causal-lm: column holding the answer to learn (default: guessed: response, output, completion, "
    "answer); without one, a labelled dataset is phrased as a completion task.",
)
_add(
    "epochs",
    "--epochs",
    type=int,
    help="Epochs, obeyed as given (default: each strategy's own, raised on a small training set to reach "
    "its minimum optimizer steps, with early stopping; the run says so).",
)
_add(
    "batch_size",
    "--batch-size",
    type=int,
    help="Training batch size (default: the strategy's own); with several processes, the global batch.",
)
_add("lr", "--lr", type=float, help="Peak learning rate (default: the strategy's own).")
_add(
    "max_length",
    "--max-length",
    type=int,
    help="Tokens per example, longer texts truncated. Default: the task's (64; causal-lm 128).",
)
_add("max_train_samples", "--max-train-samples", type=int, help="Use at most N training examples (seeded).")
_add(
    "max_eval_samples",
    "--max-eval-samples",
    type=int,
    help="Use at most N validation and N test examples (seeded); evaluating a language model on a CPU is slow.",
)
_add("seed", "--seed", default=0, type=int, help="Random seed for split, sampling and initialisation. Default: 0.")
_add("weight_decay", "--weight-decay", type=float, help="AdamW weight decay on weight matrices.")
_add(
    "warmup_ratio",
    "--warmup-ratio",
    type=float,
    help="Fraction of the run's optimizer steps with linear warmup (at most the strategy's max_warmup_steps, 1000).",
)
_add(
    "grad_accumulation",
    "--grad-accumulation",
    default=1,
    type=int,
    help="Micro-batches per optimizer step. Default: 1.",
)
_add("eval_batch_size", "--eval-batch-size", default=128, type=int, help="Evaluation batch size. Default: 128.")
_add(
    "early_stopping_patience",
    "--early-stopping-patience",
    type=int,
    help="Stop after N epochs without better validation accuracy (default: never, unless the "
    "epochs were raised for a small training set).",
)
_add(
    "quantize",
    "--quantize",
    choices=QUANTIZATIONS,
    help="Load the frozen base quantized (bitsandbytes; 4bit = NF4 + double quantization, QLoRA). "
    "For lora, adapter, prefix, head_only.",
)
_add(
    "optimizer",
    "--optimizer",
    default="adamw",
    choices=OPTIMIZERS,
    help="adamw (torch, default), adamw8bit or paged_adamw8bit (bitsandbytes; paged: CUDA only).",
)
_add(
    "gradient_checkpointing",
    "--gradient-checkpointing",
    default=False,
    type=bool,
    help="Recompute activations in the backward pass: less memory, slower.",
)
_add(
    "precision",
    "--precision",
    default="fp32",
    choices=PRECISIONS,
    help="Mixed precision via accelerate (default fp32; fp16 needs CUDA). Frozen weights are then stored in 16 bits.",
)
_add(
    "loss",
    "--loss",
    choices=LOSSES,
    help="causal-lm: chunked computes the loss from the output layer's input a chunk of tokens at a "
    "time (batch x length x vocabulary logits never exist at once); plain from the model's "
    "logits. Default: chunked where the model allows it.",
)
_add(
    "packing",
    "--packing",
    default=False,
    type=bool,
    help="causal-lm: several whole training examples share each row of --max-length tokens (attention "
    "and loss kept inside each example): far less padding when lengths vary.",
)
_add(
    "compile",
    "--compile",
    default=False,
    type=bool,
    help="torch.compile each transformer block for training (evaluation stays eager); the first step "
    "pays for compiling, reported apart.",
)
_add(
    "kernels",
    "--kernels",
    choices=KERNELS,
    help="torch: gated (SwiGLU) MLPs keep only their inputs for the backward pass (less memory, same "
    "results); liger: Liger's Triton kernels (CUDA, pip install 'peftkit[liger]'); none: the model's "
    "own modules. Default: torch where the model has gated MLPs.",
)
_add(
    "memory_budget",
    "--memory-budget",
    metavar="SIZE",
    help="Cap on memory, e.g. 4GiB: on CUDA the allocator's limit, on CPU the process's peak resident "
    "memory; a run over it stops with an error.",
)
_add(
    "checkpoint_every",
    "--checkpoint-every",
    type=int,
    metavar="N",
    help="Write the whole training state every N optimizer steps; a run that stops (even killed) "
    "continues with --resume.",
)
_add(
    "resume",
    "--resume",
    field=None,
    dest="resume_dir",
    metavar="RUN_DIR",
    help="Continue the interrupted run that was going to RUN_DIR (its --output-dir) from its last "
    "checkpoint, with its own settings and as many processes as wrote it; give no other option.",
)
_add(
    "report_to",
    "--report-to",
    default=[],
    dest="report_to",
    multiple=True,
    choices=REPORTERS,
    help="Send losses and metrics to TensorBoard (event files in RUN_DIR/tensorboard) or W&B "
    "(if installed); repeatable.",
)
_add(
    "set",
    "--set",
    field="strategy_options",
    default={},
    dest="set_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Strategy option, repeatable (e.g. --set r=16 --set alpha=32); see `peftkit list -v`.",
)
_add("output_dir", "--output-dir", help="Run directory. Default: runs/<strategy>-<timestamp>.")
_add(
    "overwrite",
    "--overwrite",
    default=False,
    type=bool,
    cli_default=False,
    help="Replace an existing output directory.",
)
_add(
    "processes",
    "--processes",
    default=1,
    type=int,
    metavar="N",
    help="Plan for N devices (processes), each taking a micro-batch of --batch-size (a run's global "
    "--batch-size is N times that): the peak on each. Default: 1.",
)
_add(
    "fsdp",
    "--fsdp",
    default=False,
    type=bool,
    help="With --processes N: fully sharded (FSDP2), weights, gradients and optimizer state split N ways "
    "(default: data parallel, each process holding all of them).",
)
_add(
    "seeds",
    "--seeds",
    default=[0],
    cli_default="0",
    show_default=True,
    help="Comma-separated seeds; each seed is its own split and run, summarised as mean and spread.",
)
_add(
    "auto_fit",
    "--auto-fit",
    default=False,
    type=bool,
    cli_default=False,
    help="With --memory-budget: before reporting a strategy as not fitting, add levers in turn "
    "(bf16, gradient checkpointing, 8-bit AdamW, 4-bit base), skipping what the planner "
    "predicts will not fit.",
)
_add("num_labels", "--num-labels", default=2, type=int, help="Classes of the task. Default: 2.")
_add(
    "loss_tokens",
    "--loss-tokens",
    field="loss_positions",
    dest="loss_positions",
    type=int,
    help="causal-lm: tokens per example the loss is on, whose vocabulary-wide logits are kept "
    "(default: a short answer, 4; plain text: give --max-length). peftkit bench measures it.",
)
_add(
    "device",
    "--device",
    choices=(
        "cpu",
        "cuda",
    ),
    help="What to plan for (default: cuda if this machine has a GPU, else cpu). On cpu the "
    "process's runtime memory is included, as a CPU run's measured peak includes it.",
)
_add("json", "--json", field=None, dest="as_json", type=bool, cli_default=False, help="Print it as JSON.")
_add(
    "adapter",
    "--adapter",
    default=REQUIRED,
    dest="adapter_dir",
    required=True,
    help="Adapter directory: a run's adapter/ folder, one in adapters/, or a plain peft adapter.",
)
_add(
    "predict:adapter",
    "--adapter",
    dest="adapter_dir",
    help="Adapter directory: a run directory or its adapter/ folder, one in adapters/, or a plain peft "
    "adapter (or give --onnx).",
)
_add(
    "onnx",
    "--onnx",
    metavar="DIR",
    help="Answer with an ONNX export (what peftkit export --output wrote), run by ONNX Runtime, instead of "
    "an --adapter.",
)
_add("output", "--output", required=True, help="Directory for the merged model (must not exist unless --overwrite).")
_add(
    "eval:dataset",
    "--dataset",
    default=REQUIRED,
    required=True,
    help="Labelled data to evaluate on, every example of it (no split): a data file (.csv/.json/.jsonl/"
    ".parquet, compressed too), a datasets save_to_disk directory, a short name or a hub id. Labels "
    "are matched to the adapter's by name.",
)
_add(
    "eval:output",
    "--output",
    help="Directory for metrics.json and confusion_matrix.png (must not exist unless --overwrite). "
    "Default: print only.",
)
_add(
    "input",
    "--input",
    dest="input_file",
    metavar="FILE",
    help="Read the inputs from FILE instead of TEXTS: .txt (one per line; - for stdin), .csv, .tsv or "
    ".jsonl (one per row, in --text-column).",
)
_add(
    "predict:output",
    "--output",
    dest="output",
    metavar="FILE",
    help="Write the answers to FILE, .csv or .jsonl by its extension (must not exist unless --overwrite). "
    "Default: JSON lines on stdout.",
)
_add(
    "max_new_tokens",
    "--max-new-tokens",
    type=int,
    metavar="N",
    help="causal-lm: generate at most N tokens (default: a label's length for an adapter trained on "
    "labelled data, else 64).",
)
_add(
    "do_sample",
    "--do-sample",
    default=False,
    type=bool,
    cli_default=False,
    help="causal-lm: sample instead of greedy decoding (seeded by --seed).",
)
_add("temperature", "--temperature", type=float, help="causal-lm, with --do-sample: sampling temperature.")
_add(
    "top_p",
    "--top-p",
    type=float,
    help="causal-lm, with --do-sample: nucleus sampling, keep the tokens of the top P probability.",
)
_add(
    "chat",
    "--chat",
    default=False,
    type=bool,
    cli_default=False,
    help="causal-lm: put each prompt in the model's chat template (an error if its tokenizer has none).",
)
_add(
    "force",
    "--force",
    default=False,
    type=bool,
    cli_default=False,
    help="Use the adapter even if the base model's weights differ from those it was trained on.",
)

_add(
    "trials",
    "--trials",
    default=20,
    type=int,
    cli_default=20,
    show_default=True,
    help="Trials the study should hold at the end; those already in it (an earlier tune, another process) count.",
)
_add(
    "timeout",
    "--timeout",
    metavar="DURATION",
    help="Start no new trial after this long (90s, 30m, 2h, 1h30m); the running one finishes.",
)
_add(
    "tune",
    "--tune",
    type=int,
    metavar="N",
    help="Tune every strategy first (peftkit tune: N trials each, trial 0 its defaults, on validation of the "
    "first seed), then run its defaults and its best configuration over the seeds; the table shows "
    "the tuned ones, a second table default vs tuned. Trials and studies: OUTPUT_DIR/tuning/.",
)
_add(
    "train_sizes",
    "--train-sizes",
    metavar="SIZES",
    help="Accuracy against training-set size: run every strategy and seed at each size (comma-separated "
    "example counts or 'all', e.g. 250,500,1000,2000,all; nested seeded subsets). Adds a table per size "
    "and learning_curve.png; the main table shows the largest. Not with --max-train-samples or --tune.",
)
_add(
    "tune_timeout",
    "--tune-timeout",
    metavar="DURATION",
    help="With --tune: start no trial of a strategy's study after this long (90s, 30m, 2h); the same "
    "for every strategy.",
)
_add(
    "tune_storage",
    "--tune-storage",
    metavar="URL",
    help="With --tune: keep the studies in this database (sqlite:///studies.db, postgresql://...) instead "
    "of OUTPUT_DIR/tuning/, so that the same bench run again after an interruption continues them.",
)
_add(
    "storage",
    "--storage",
    metavar="URL",
    help="Where the study lives: an SQLAlchemy database URL (sqlite:///study.db, postgresql://...). "
    "Default: sqlite:///OUTPUT_DIR/study.db.",
)
_add("study_name", "--study-name", metavar="NAME", help="The study's name. Default: tune-<strategy>.")
_add(
    "metric",
    "--metric",
    metavar="M",
    help="Validation metric to optimise (accuracy, f1_macro, loss, ...). Default: the task's selection "
    "metric (accuracy; causal-lm: loss).",
)
_add(
    "pruner",
    "--pruner",
    default="median",
    choices=(
        "median",
        "hyperband",
        "none",
    ),
    cli_default="median",
    show_default=True,
    help="Stop unpromising trials after an epoch's validation (never trial 0, the defaults).",
)
_add(
    "space",
    "--space",
    default={},
    dest="space_items",
    multiple=True,
    metavar="NAME=V1,V2,...",
    help="Search only these values of a searched setting (e.g. --space r=4,8,16); repeatable.",
)

# -- a command's own wording, where a setting means something else there ----------------------
_vary(
    "run:fsdp",
    help="Under several processes (torchrun, accelerate launch): shard parameters, gradients and optimizer "
    "state over them (FSDP2) instead of data parallel; see docs/scale-out.md.",
)
_vary(
    "bench:batch_size",
    default=32,
    help="Effective batch for every strategy (default: 32); under a memory budget it is kept with "
    "gradient accumulation when the micro-batch must shrink.",
)
_vary(
    "bench:memory_budget",
    help="Memory each run may use, e.g. 4GiB (CUDA: allocator cap; CPU: peak resident memory). "
    "The largest micro-batch that fits is found by halving.",
)
_vary("bench:output_dir", help="Where results go. Default: runs/bench-<timestamp>.")
_vary("tune:strategy", help="Strategy to tune (see `peftkit list`); required.")
_vary("tune:epochs", help="Epochs of every trial (default: searched around those a plain run trains on this data).")
_vary("tune:lr", help="Fix the learning rate (default: searched, log-uniform over 1/10..10x the strategy's own).")
_vary("tune:set", help="Fix a strategy option (not searched), repeatable: --set r=16.")
_vary(
    "tune:output_dir",
    help="Where the study and reports go; give the same one again to continue the study. "
    "Default: runs/tune-<strategy>-<timestamp>.",
)
_vary(
    "tune:overwrite",
    help="Start afresh: replace the output directory, and a study of that name made for "
    "another strategy, model, dataset or metric.",
)
_vary("plan:strategies", help="'all' or names: lora,full,head_only.")
_vary("plan:batch_size", default=32, help="Micro-batch size. Default: 32.")
_vary("plan:memory_budget", help="Say what fits in SIZE (e.g. 8GiB), and the largest batch that does.")
_vary("plan:json", help="Print the estimates as JSON.")
_vary(
    "predict:text_column",
    help="Column of an --input .csv/.tsv/.jsonl file holding the inputs (default: guessed: text, "
    "sentence, prompt, ...; images: image, path, file).",
)
_vary("predict:overwrite", help="Replace an existing --output file.")
_vary("predict:batch_size", help="Inputs per forward pass (default: 64; causal-lm 16).")
_vary("predict:seed", help="Seed for --do-sample (default 0: the same command samples the same answers).")
_vary(
    "eval:adapter",
    help="Adapter directory (a run's adapter/ folder, one in adapters/, a plain peft adapter) or a run directory.",
)
_vary(
    "eval:max_eval_samples",
    help="Evaluate a seeded sample of N examples instead of all (a language model's generation on a CPU is slow).",
)
_vary("eval:batch_size", default=32, help="Evaluation batch size. Default: 32.")
_vary("eval:json", help="Print the results as JSON.")
_vary("merge:adapter", help="Adapter directory to merge into its base model.")
_vary("export:adapter", help="Adapter directory to export (a run directory means its adapter/).")
_add(
    "export:format",
    "--format",
    dest="fmt",
    default="onnx",
    cli_default="onnx",
    show_default=True,
    choices=EXPORT_FORMATS,
    help="What to write: onnx (sequence and image classification) or gguf (causal-lm on a Llama-"
    "architecture base: llama.cpp, Ollama).",
)
_add("export:output", "--output", required=True, help="Directory to write (must not exist unless --overwrite).")
_add(
    "export:quantize",
    "--quantize",
    choices=EXPORT_QUANTIZATIONS,
    help="ONNX Runtime dynamic int8 quantization (weights per channel): ~4x smaller, faster on CPU; "
    "kept only if it gives PyTorch's label on at least 99% of the check examples.",
)
_add(
    "export:min_agreement",
    "--min-agreement",
    type=float,
    metavar="FRACTION",
    help="With --quantize int8: the share of check examples on which it must give PyTorch's label "
    "(default 0.99); recorded in peftkit_export.json.",
)
_add("export:opset", "--opset", type=int, help="ONNX opset, 18 to 23. Default: 18.")
_add(
    "export:dataset",
    "--dataset",
    help="Labelled data to check the export on, every example (default: the test split the adapter "
    "was evaluated on, from its recorded dataset and seed).",
)
_vary("env:json", help="Print the report as JSON.")
_add(
    "env:lock",
    "--lock",
    field=None,
    dest="lock_file",
    metavar="FILE",
    help="Compare with this lock file (default: the repository's requirements.lock; $PEFTKIT_LOCK).",
)
_vary("inspect:json", help="Print the metadata as JSON.")
_add(
    "list:verbose",
    "--verbose",
    "-v",
    field=None,
    type=bool,
    cli_default=False,
    help="Also show each strategy's options, defaults and the models it covers.",
)

LEVERS = ("quantize", "optimizer", "gradient_checkpointing", "precision", "loss", "packing", "kernels", "compile")
"""The keys of the memory levers (``Levers``' fields), in the order commands list them."""


def setting(key: str) -> Any:
    """A config dataclass field declared by ``SETTINGS[key]``: its default (a fresh copy of a list or
    dict for each instance) and, in its metadata, its help and key (``tests/test_settings.py``
    reads them back)."""
    s = SETTINGS[key]
    metadata = {"help": s.help, "setting": key}
    if s.default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(s.default, (list, dict)):
        default = s.default
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=s.default, metadata=metadata)
