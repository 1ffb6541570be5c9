"""The settings of a run: model and data, training, the memory levers, the run directory (shared
by run, bench, tune, plan and eval where they take them)."""

from __future__ import annotations

from .base import KERNELS, LOSSES, OPTIMIZERS, PRECISIONS, QUANTIZATIONS, REPORTERS, REQUIRED, declare

declare("strategy", "--strategy", "-s", default="lora", help="Strategy name (see `peftkit list`). Default: lora.")
declare(
    "strategies",
    "--strategies",
    default=REQUIRED,
    cli_default="all",
    show_default=True,
    help="'all' (every registered strategy, plugins included) or names: lora,full,head_only. "
    "peft's methods are named one by one: lora,peft:ia3,peft:loha (`peftkit list --peft`).",
)
declare(
    "task",
    "--task",
    metavar="TASK",
    help="What to learn: sequence-classification, causal-lm, image-classification or a plugin's task "
    "(`peftkit list -v`). Default: what the model is made for (read from its config), else "
    "sequence-classification.",
)
declare(
    "config",
    "--config",
    field=None,
    dest="config_file",
    file=True,
    help="YAML file with the same settings as these flags plus a strategy_options block; flags override it.",
)
declare(
    "model",
    "--model",
    help="Short name (minilm, smollm2, vit-tiny), hub id or local model directory. Default: the task's "
    "(minilm; smollm2 for causal-lm; vit-tiny for image-classification).",
)
declare("base_model", "--model", field="model", help="Base model (default: the one named in the adapter's metadata).")
declare(
    "dataset",
    "--dataset",
    help="Short name (rotten_tomatoes, digits, mnist), hub id, data file (.csv/.json/.jsonl/.parquet, "
    "compressed too) or a datasets save_to_disk directory. Default: the task's.",
)
declare(
    "text_column",
    "--text-column",
    help="Column holding the text (causal-lm: the prompt; images: the image) (default: guessed: text, "
    "sentence, prompt, ...).",
)
declare(
    "label_column",
    "--label-column",
    help="Column holding the label (default: guessed: label, labels, ...).",
)
declare(
    "response_column",
    "--response-column",
    help="causal-lm: column holding the answer to learn (default: guessed: response, output, completion, "
    "answer); without one, a labelled dataset is phrased as a completion task.",
)
declare(
    "epochs",
    "--epochs",
    type=int,
    help="Epochs, obeyed as given (default: each strategy's own, raised on a small training set to reach "
    "its minimum optimizer steps, with early stopping; the run says so).",
)
declare(
    "batch_size",
    "--batch-size",
    type=int,
    help="Training batch size (default: the strategy's own); with several processes, the global batch.",
)
declare("lr", "--lr", type=float, help="Peak learning rate (default: the strategy's own).")
declare(
    "max_length",
    "--max-length",
    type=int,
    help="Tokens per example, longer texts truncated. Default: the task's (64; causal-lm 128).",
)
declare("max_train_samples", "--max-train-samples", type=int, help="Use at most N training examples (seeded).")
declare(
    "max_eval_samples",
    "--max-eval-samples",
    type=int,
    help="Use at most N validation and N test examples (seeded); evaluating a language model on a CPU is slow.",
)
declare("seed", "--seed", default=0, type=int, help="Random seed for split, sampling and initialisation. Default: 0.")
declare("weight_decay", "--weight-decay", type=float, help="AdamW weight decay on weight matrices.")
declare(
    "warmup_ratio",
    "--warmup-ratio",
    type=float,
    help="Fraction of the run's optimizer steps with linear warmup (at most the strategy's max_warmup_steps, 1000).",
)
declare(
    "grad_accumulation",
    "--grad-accumulation",
    default=1,
    type=int,
    help="Micro-batches per optimizer step. Default: 1.",
)
declare("eval_batch_size", "--eval-batch-size", default=128, type=int, help="Evaluation batch size. Default: 128.")
declare(
    "early_stopping_patience",
    "--early-stopping-patience",
    type=int,
    help="Stop after N epochs without better validation accuracy (default: never, unless the "
    "epochs were raised for a small training set).",
)
declare(
    "quantize",
    "--quantize",
    choices=QUANTIZATIONS,
    help="Load the frozen base quantized (bitsandbytes; 4bit = NF4 + double quantization, QLoRA). "
    "For lora, adapter, prefix, head_only.",
)
declare(
    "optimizer",
    "--optimizer",
    default="adamw",
    choices=OPTIMIZERS,
    help="adamw (torch, default), adamw8bit or paged_adamw8bit (bitsandbytes; paged: CUDA only).",
)
declare(
    "gradient_checkpointing",
    "--gradient-checkpointing",
    default=False,
    type=bool,
    help="Recompute activations in the backward pass: less memory, slower.",
)
declare(
    "precision",
    "--precision",
    default="fp32",
    choices=PRECISIONS,
    help="Mixed precision via accelerate (default fp32; fp16 needs CUDA). Frozen weights are then stored in 16 bits.",
)
declare(
    "loss",
    "--loss",
    choices=LOSSES,
    help="causal-lm: chunked computes the loss from the output layer's input a chunk of tokens at a "
    "time (batch x length x vocabulary logits never exist at once); plain from the model's "
    "logits. Default: chunked where the model allows it.",
)
declare(
    "packing",
    "--packing",
    default=False,
    type=bool,
    help="causal-lm: several whole training examples share each row of --max-length tokens (attention "
    "and loss kept inside each example): far less padding when lengths vary.",
)
declare(
    "compile",
    "--compile",
    default=False,
    type=bool,
    help="torch.compile each transformer block for training (evaluation stays eager); the first step "
    "pays for compiling, reported apart.",
)
declare(
    "kernels",
    "--kernels",
    choices=KERNELS,
    help="torch: gated (SwiGLU) MLPs keep only their inputs for the backward pass (less memory, same "
    "results); liger: Liger's Triton kernels (CUDA, pip install 'peftkit[liger]'); none: the model's "
    "own modules. Default: torch where the model has gated MLPs.",
)
declare(
    "memory_budget",
    "--memory-budget",
    metavar="SIZE",
    help="Cap on memory, e.g. 4GiB: on CUDA the allocator's limit, on CPU the process's peak resident "
    "memory; a run over it stops with an error. On CPU a run with a budget also returns free memory "
    "to the system between transformer blocks: the peak `peftkit plan` predicts (SmolLM2 LoRA at 8 x "
    "512 tokens: 0.72x), in steps up to 1.4x slower where pages come back slowly (benchmarks/README.md).",
)
declare(
    "checkpoint_every",
    "--checkpoint-every",
    type=int,
    metavar="N",
    help="Write the whole training state every N optimizer steps; a run that stops (even killed) "
    "continues with --resume.",
)
declare(
    "resume",
    "--resume",
    field=None,
    dest="resume_dir",
    metavar="RUN_DIR",
    help="Continue the interrupted run that was going to RUN_DIR (its --output-dir) from its last "
    "checkpoint, with its own settings and as many processes as wrote it; give no other option.",
)
declare(
    "report_to",
    "--report-to",
    default=[],
    dest="report_to",
    multiple=True,
    choices=REPORTERS,
    help="Send losses and metrics to TensorBoard (event files in RUN_DIR/tensorboard) or W&B "
    "(if installed); repeatable.",
)
declare(
    "set",
    "--set",
    field="strategy_options",
    default={},
    dest="set_items",
    multiple=True,
    metavar="KEY=VALUE",
    help="Strategy option, repeatable (e.g. --set r=16 --set alpha=32); see `peftkit list -v`.",
)
declare("output_dir", "--output-dir", help="Run directory. Default: runs/<strategy>-<timestamp>.")
declare(
    "overwrite",
    "--overwrite",
    default=False,
    type=bool,
    cli_default=False,
    help="Replace an existing output directory.",
)
