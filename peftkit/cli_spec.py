"""What each ``peftkit`` command takes and says: its options, as keys of ``peftkit.settings`` in the
order ``--help`` lists them, and its ``--help`` text (whose first paragraph docs/cli.md's generated
tables open with). ``peftkit.cli`` holds what the commands do with them.

Each option is declared once in ``peftkit.settings`` (flags, type, default, help, closed set), which
the config classes' fields are declared from too; a command lists the ones it takes by key
(``bench:batch_size`` for a command's own wording; ``LEVERS`` stands for every memory lever).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from .settings import LEVERS, SETTINGS, Setting


def _keys(*lines: str) -> tuple[str, ...]:
    """Setting keys, space-separated (over as many strings as fit); ``LEVERS`` stands for every lever."""
    words = " ".join(lines).split()
    return tuple(key for word in words for key in (LEVERS if word == "LEVERS" else (word,)))


OPTIONS: dict[str, tuple[str, ...]] = {
    "env": _keys("env:json env:lock"),
    "list": _keys("list:verbose list:peft"),
    "run": _keys(
        "strategy task config model dataset text_column label_column response_column epochs batch_size lr",
        "max_length max_train_samples max_eval_samples seed weight_decay warmup_ratio grad_accumulation",
        "early_stopping_patience LEVERS memory_budget checkpoint_every resume run:fsdp report_to set",
        "output_dir overwrite",
    ),
    "bench": _keys(
        "strategies task model dataset text_column label_column response_column epochs max_train_samples",
        "max_eval_samples seeds bench:batch_size max_length eval_batch_size early_stopping_patience LEVERS",
        "bench:memory_budget auto_fit tune tune_timeout tune_storage train_sizes bench:output_dir overwrite",
    ),
    "tune": _keys(
        "tune:strategy task config model dataset text_column label_column response_column tune:epochs",
        "batch_size tune:lr max_length max_train_samples max_eval_samples seed weight_decay warmup_ratio",
        "grad_accumulation LEVERS memory_budget tune:set trials timeout storage study_name metric pruner",
        "space tune:output_dir tune:overwrite",
    ),
    "recommend": _keys(
        "recommend:strategies task model dataset text_column label_column response_column max_train_samples",
        "max_eval_samples time_budget recommend:memory_budget seeds bench:batch_size max_length eval_batch_size",
        "LEVERS eta finalists recommend:output_dir recommend:overwrite",
    ),
    "plan": _keys(
        "task model plan:strategies plan:set plan:batch_size max_length num_labels loss_tokens LEVERS processes fsdp",
        "plan:memory_budget device plan:json",
    ),
    "predict": _keys(
        "predict:adapter onnx openvino base_model force input predict:text_column predict:output predict:overwrite",
        "predict:batch_size max_new_tokens do_sample temperature top_p predict:seed chat",
    ),
    "eval": _keys(
        "eval:adapter eval:dataset text_column label_column response_column base_model force",
        "eval:max_eval_samples eval:batch_size eval:output overwrite eval:json",
    ),
    "merge": _keys("merge:adapter output base_model force overwrite"),
    "export": _keys(
        "export:adapter base_model force export:format export:output export:quantize export:max_accuracy_drop",
        "export:min_agreement export:opset export:dataset text_column label_column overwrite",
        "export:gguf_pre export:lora_only",
    ),
    "inspect": _keys("inspect:json"),
}

# each command's --help (``peftkit`` the group's), as its docstring was
HELP: dict[str, str] = {}
HELP["peftkit"] = """Fine-tune pretrained models with interchangeable strategies.

\b
peftkit list                      strategies and what they do
peftkit run --strategy lora       fine-tune and evaluate (embedded default: MiniLM on Rotten Tomatoes)
peftkit bench                     every strategy side by side: memory, speed, accuracy
peftkit tune --strategy lora      search its hyper-parameters (Optuna), selected on validation
peftkit recommend --time-budget 20m   which strategy to use, measured within a time (and memory) budget
peftkit plan --memory-budget 8GiB predicted peak memory of each strategy, without training
peftkit predict --adapter DIR T   answer texts (or --input FILE) with a trained adapter
peftkit eval --adapter DIR --dataset FILE   how well it does on a labelled file, beside a baseline
peftkit inspect DIR               what an adapter is, what it was trained on, how well it did
peftkit merge --adapter DIR --output OUT   base + adapter as one plain transformers model
peftkit export --adapter DIR --output F    one file to serve without PyTorch: ONNX (int8) or GGUF
peftkit env                       versions, device and lock status, for bug reports
"""

HELP["env"] = """Print what a bug report needs: versions of peftkit, Python and the libraries, whether each
matches requirements.lock, the machine, and the device (CUDA, cuDNN, GPUs and their memory).

Paste its output into a bug report. The same version table is in every run's metrics.json.
"""

HELP["list"] = """List the registered strategies (built-in, plugins and peft's methods as peft:NAME)."""

HELP["run"] = """Fine-tune a model with a strategy, evaluate it, and save the run.

The run directory holds config.yaml (every setting, resolved), metrics.json, train.log and
adapter/ (what the strategy trained, as safetensors, with its metadata). It appears only when
the run has finished; until then the run is written into .NAME.partial beside it.

A run that learned nothing (test accuracy not clearly above the majority class, or a language
model's validation perplexity no better than before training) ends with a warning giving the
likely cause and the flag to try; metrics.json records `learned` and the `baseline`.

Runs unchanged under `accelerate launch` or `torchrun` (data parallel; only the main process
writes). See docs/scale-out.md on multi-GPU and multi-node runs.
"""

HELP["bench"] = """Run every strategy on the same model and data and compare memory, speed and accuracy.

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

HELP["recommend"] = """Recommend a strategy for this model and data within a time (and memory) budget, by measuring.

\b
1. Plan: a strategy the planner finds over --memory-budget even with every lever
   (bf16, checkpointing, 8-bit AdamW, 4-bit base) and micro-batch 1 is dropped.
2. Search: successive halving over strategy x configuration. Rung 0 trains each
   strategy's defaults, then configurations from its search space (as peftkit tune's),
   on a 1/eta^k subset; each rung keeps the best 1/eta on validation and trains them on
   eta times the examples, up to the whole training set. Runs start only while the
   measured times say they fit the budget.
3. Decide: the best configuration of each of the --finalists best strategies runs over
   the seeds and is compared on the test split; the cheaper (memory, time per epoch) of
   two that a paired test cannot tell apart is recommended if its interval also rules out
   a loss of more than 2 points, and the answer says why.

\b
The output directory holds
recommend.md   the answer in a paragraph, the finalists' table, the search's history
results.json   everything measured; search.png, accuracy_vs_memory.png, accuracy_vs_time.png
best/          the recommended adapter and config.yaml (peftkit run --config best/config.yaml)
runs/          every run; recommend.db: the search (the same command continues it)

\b
peftkit recommend --time-budget 20m --max-train-samples 2000 --memory-budget 1.5GiB
"""

HELP["tune"] = """Search a strategy's hyper-parameters with Optuna, selecting on validation only.

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

HELP["plan"] = """Predict each strategy's peak training memory without training.

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

HELP["predict"] = """Answer TEXTS (or the inputs of --input FILE) with a trained adapter (or an export: --onnx
DIR, --openvino DIR); prints one JSON object per input (or writes them to --output FILE).

\b
sequence-classification: the label of each text
causal-lm: the generated completion of each prompt (an adapter trained on labelled data
           phrases each text as it learned, and gives the label it answered; other prompts are
           given as they are, or in the model's chat template with --chat)
image-classification: the inputs are image files; the label of each
"""

HELP["eval"] = """Evaluate an adapter on a labelled file it has not seen, beside a majority-class baseline.

\b
sequence- and image-classification: accuracy, macro-F1, per-class precision / recall / F1 /
    support, the confusion matrix (a table; with --output also confusion_matrix.png)
causal-lm: perplexity and the exact match of generated answers (= accuracy for labelled data)
Baseline: always answering the file's most frequent label (or answer); a warning says when
the adapter does no better.
"""

HELP["merge"] = """Merge an adapter into its base and write a standard transformers model directory.

The result (safetensors + tokenizer or image processor) loads with the task's AutoModelFor...
class (sequence or image classification, causal LM) and predicts like base + adapter. Works for
lora (weights folded in), full and
gradual_unfreeze, and peft:NAME methods peft merges (ia3, loha, oft, ...); strategies that add modules
of their own (head_only, adapter, prefix) and prompt methods (peft:prompt_tuning) cannot be merged.
"""

HELP["export"] = """Export an adapter on its base as a model that serves without PyTorch: ONNX or OpenVINO IR
(classifiers) or GGUF (language models), checked against PyTorch before anything is written.

\b
Merged into the base where the strategy merges (lora, full, gradual_unfreeze, most peft:NAME); the adapter's
own modules in the graph otherwise (adapter, prefix, head_only). The graph takes the
tokenizer's outputs (input_ids, attention_mask, ...; images: pixel_values), batch and sequence
dynamic, and gives the label probabilities. Beside model.onnx: the tokenizer (or image
processor), config.json and peftkit_export.json (labels, max length, base fingerprint, what
was checked, versions).
Checked before anything is written: ONNX Runtime's probabilities within 1e-4 of PyTorch's on
64 examples; with --quantize int8, an accuracy on the check examples at most 0.5 points below
PyTorch's (--max-accuracy-drop; the agreement with PyTorch's labels printed beside it, and
required only with --min-agreement). A failed check writes nothing.
Serve it with `peftkit predict --onnx OUTPUT TEXT...`.

\b
--format openvino: the same graph as OpenVINO IR (OUTPUT/model.xml and model.bin, weights in
float32), checked by OpenVINO computing in f32 (within 1e-4) and served so; --quantize int8 is
NNCF's post-training int8, calibrated on the adapter's validation split, gated as above and
served at OpenVINO's default precision (bf16 where the CPU has AVX512-BF16 or AMX). The output
line says which precision OpenVINO computes in. Serve it with `peftkit predict --openvino OUTPUT`.

\b
--format gguf (causal-lm adapters of lora, full, gradual_unfreeze on a Llama-architecture base,
such as the embedded SmolLM2): merged, written as OUTPUT/model.gguf in float32 as llama.cpp's
converter writes it (tensor names, tokenizer with its pre-tokenizer name, chat template); a
tokenizer llama.cpp would not recognise is refused unless --gguf-pre names it. Checked by
llama.cpp itself (xllamacpp; else transformers' GGUF reader): the prompts' token ids and 16
greedy tokens the same as PyTorch's on a few prompts, and no llama.cpp warning.
--lora-only (lora adapters): the adapter alone as llama.cpp's LoRA file OUTPUT/lora.gguf beside
OUTPUT/base.gguf, checked by llama.cpp loading both (llama-cli -m base.gguf --lora lora.gguf).
"""

HELP["inspect"] = """Show what an adapter is: strategy, base model and fingerprint, labels, size, metrics."""


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


def options(command: str) -> Callable[[Any], Any]:
    """Decorate ``peftkit COMMAND``'s function with the options of the settings it takes, in order."""

    def decorate(func: Any) -> Any:
        for key in reversed(OPTIONS[command]):
            func = _click_option(SETTINGS[key])(func)
        return func

    return decorate
