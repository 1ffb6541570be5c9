"""The settings of one command or a few (bench, tune, plan, predict, eval, merge, export, env,
list), and each command's own wording of a shared setting (``bench:batch_size``)."""

from __future__ import annotations

from . import run  # noqa: F401 - the shared settings vary() rewords are declared there, first
from .base import EXPORT_FORMATS, EXPORT_QUANTIZATIONS, REQUIRED, declare, vary

declare(
    "processes",
    "--processes",
    default=1,
    type=int,
    metavar="N",
    help="Plan for N devices (processes), each taking a micro-batch of --batch-size (a run's global "
    "--batch-size is N times that): the peak on each. Default: 1.",
)
declare(
    "fsdp",
    "--fsdp",
    default=False,
    type=bool,
    help="With --processes N: fully sharded (FSDP2), weights, gradients and optimizer state split N ways "
    "(default: data parallel, each process holding all of them).",
)
declare(
    "seeds",
    "--seeds",
    default=[0],
    cli_default="0",
    show_default=True,
    help="Comma-separated seeds; each seed is its own split and run, summarised as mean and spread.",
)
declare(
    "auto_fit",
    "--auto-fit",
    default=False,
    type=bool,
    cli_default=False,
    help="With --memory-budget: before reporting a strategy as not fitting, add levers in turn "
    "(bf16, gradient checkpointing, 8-bit AdamW, 4-bit base), skipping what the planner "
    "predicts will not fit.",
)
declare("num_labels", "--num-labels", default=2, type=int, help="Classes of the task. Default: 2.")
declare(
    "loss_tokens",
    "--loss-tokens",
    field="loss_positions",
    dest="loss_positions",
    type=int,
    help="causal-lm: tokens per example the loss is on, whose vocabulary-wide logits are kept "
    "(default: a short answer, 4; plain text: give --max-length). peftkit bench measures it.",
)
declare(
    "device",
    "--device",
    choices=(
        "cpu",
        "cuda",
    ),
    help="What to plan for (default: cuda if this machine has a GPU, else cpu). On cpu the "
    "process's runtime memory is included, as a CPU run's measured peak includes it.",
)
declare("json", "--json", field=None, dest="as_json", type=bool, cli_default=False, help="Print it as JSON.")
declare(
    "adapter",
    "--adapter",
    default=REQUIRED,
    dest="adapter_dir",
    required=True,
    help="Adapter directory: a run's adapter/ folder, one in adapters/, or a plain peft adapter.",
)
declare(
    "predict:adapter",
    "--adapter",
    dest="adapter_dir",
    help="Adapter directory: a run directory or its adapter/ folder, one in adapters/, or a plain peft "
    "adapter (or give --onnx or --openvino).",
)
declare(
    "onnx",
    "--onnx",
    metavar="DIR",
    help="Answer with an ONNX export (what peftkit export --output wrote), run by ONNX Runtime, instead of "
    "an --adapter.",
)
declare(
    "openvino",
    "--openvino",
    metavar="DIR",
    help="Answer with an OpenVINO export (what peftkit export --format openvino --output wrote), run "
    "by OpenVINO on the CPU, instead of an --adapter.",
)
declare(
    "output",
    "--output",
    default=REQUIRED,
    required=True,
    help="Directory for the merged model (must not exist unless --overwrite).",
)
declare(
    "eval:dataset",
    "--dataset",
    default=REQUIRED,
    required=True,
    help="Labelled data to evaluate on, every example of it (no split): a data file (.csv/.json/.jsonl/"
    ".parquet, compressed too), a datasets save_to_disk directory, a short name or a hub id. Labels "
    "are matched to the adapter's by name.",
)
declare(
    "eval:output",
    "--output",
    help="Directory for metrics.json and confusion_matrix.png (must not exist unless --overwrite). "
    "Default: print only.",
)
declare(
    "input",
    "--input",
    dest="input_file",
    metavar="FILE",
    help="Read the inputs from FILE instead of TEXTS: .txt (one per line; - for stdin), .csv, .tsv or "
    ".jsonl (one per row, in --text-column).",
)
declare(
    "predict:output",
    "--output",
    dest="output",
    metavar="FILE",
    help="Write the answers to FILE, .csv or .jsonl by its extension (must not exist unless --overwrite). "
    "Default: JSON lines on stdout.",
)
declare(
    "max_new_tokens",
    "--max-new-tokens",
    type=int,
    metavar="N",
    help="causal-lm: generate at most N tokens (default: a label's length for an adapter trained on "
    "labelled data, else 64).",
)
declare(
    "do_sample",
    "--do-sample",
    default=False,
    type=bool,
    cli_default=False,
    help="causal-lm: sample instead of greedy decoding (seeded by --seed).",
)
declare("temperature", "--temperature", type=float, help="causal-lm, with --do-sample: sampling temperature.")
declare(
    "top_p",
    "--top-p",
    type=float,
    help="causal-lm, with --do-sample: nucleus sampling, keep the tokens of the top P probability.",
)
declare(
    "chat",
    "--chat",
    default=False,
    type=bool,
    cli_default=False,
    help="causal-lm: put each prompt in the model's chat template (an error if its tokenizer has none).",
)
declare(
    "force",
    "--force",
    default=False,
    type=bool,
    cli_default=False,
    help="Use the adapter even if the base model's weights differ from those it was trained on.",
)

declare(
    "trials",
    "--trials",
    default=20,
    type=int,
    cli_default=20,
    show_default=True,
    help="Trials the study should hold at the end; those already in it (an earlier tune, another process) count.",
)
declare(
    "timeout",
    "--timeout",
    metavar="DURATION",
    help="Start no new trial after this long (90s, 30m, 2h, 1h30m); the running one finishes.",
)
declare(
    "tune",
    "--tune",
    type=int,
    metavar="N",
    help="Tune every strategy first (peftkit tune: N trials each, trial 0 its defaults, on validation of the "
    "first seed), then run its defaults and its best configuration over the seeds; the table shows "
    "the tuned ones, a second table default vs tuned. Trials and studies: OUTPUT_DIR/tuning/.",
)
declare(
    "train_sizes",
    "--train-sizes",
    metavar="SIZES",
    help="Accuracy against training-set size: run every strategy and seed at each size (comma-separated "
    "example counts or 'all', e.g. 250,500,1000,2000,all; nested seeded subsets). Adds a table per size "
    "and learning_curve.png; the main table shows the largest. Not with --max-train-samples or --tune.",
)
declare(
    "tune_timeout",
    "--tune-timeout",
    metavar="DURATION",
    help="With --tune: start no trial of a strategy's study after this long (90s, 30m, 2h); the same "
    "for every strategy.",
)
declare(
    "tune_storage",
    "--tune-storage",
    metavar="URL",
    help="With --tune: keep the studies in this database (sqlite:///studies.db, postgresql://...) instead "
    "of OUTPUT_DIR/tuning/, so that the same bench run again after an interruption continues them.",
)
declare(
    "storage",
    "--storage",
    metavar="URL",
    help="Where the study lives: an SQLAlchemy database URL (sqlite:///study.db, postgresql://...). "
    "Default: sqlite:///OUTPUT_DIR/study.db.",
)
declare("study_name", "--study-name", metavar="NAME", help="The study's name. Default: tune-<strategy>.")
declare(
    "metric",
    "--metric",
    metavar="M",
    help="Validation metric to optimise (accuracy, f1_macro, loss, ...). Default: the task's selection "
    "metric (accuracy; causal-lm: loss).",
)
declare(
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
declare(
    "space",
    "--space",
    default={},
    dest="space_items",
    multiple=True,
    metavar="NAME=V1,V2,...",
    help="Search only these values of a searched setting (e.g. --space r=4,8,16); repeatable.",
)

# -- a command's own wording, where a setting means something else there ----------------------
vary(
    "run:fsdp",
    help="Under several processes (torchrun, accelerate launch): shard parameters, gradients and optimizer "
    "state over them (FSDP2) instead of data parallel; see docs/scale-out.md.",
)
vary(
    "bench:batch_size",
    default=32,
    help="Effective batch for every strategy (default: 32); under a memory budget it is kept with "
    "gradient accumulation when the micro-batch must shrink.",
)
vary(
    "bench:memory_budget",
    help="Memory each run may use, e.g. 4GiB (CUDA: allocator cap; CPU: peak resident memory, free "
    "memory returned to the system, as `run --memory-budget`). The largest micro-batch that fits is found by halving.",
)
vary("bench:output_dir", help="Where results go. Default: runs/bench-<timestamp>.")
vary("tune:strategy", help="Strategy to tune (see `peftkit list`); required.")
vary("tune:epochs", help="Epochs of every trial (default: searched around those a plain run trains on this data).")
vary("tune:lr", help="Fix the learning rate (default: searched, log-uniform over 1/10..10x the strategy's own).")
vary("tune:set", help="Fix a strategy option (not searched), repeatable: --set r=16.")
vary(
    "tune:output_dir",
    help="Where the study and reports go; give the same one again to continue the study. "
    "Default: runs/tune-<strategy>-<timestamp>.",
)
vary(
    "tune:overwrite",
    help="Start afresh: replace the output directory, and a study of that name made for "
    "another strategy, model, dataset or metric.",
)
vary("plan:strategies", help="'all' or names: lora,full,head_only,peft:ia3 (peft's methods by name).")
vary("plan:batch_size", default=32, help="Micro-batch size. Default: 32.")
vary(
    "plan:set",
    help="Strategy option, repeatable, as `run` takes it (--set r=64 --set dropout=0): each planned "
    "strategy that has the option is planned with it; an option none of them has is refused.",
)
vary(
    "plan:memory_budget",
    help="Say what fits in SIZE (e.g. 8GiB), and the largest batch that does (on CPU, as a run with "
    "that --memory-budget runs: free memory returned to the system).",
)
vary("plan:json", help="Print the estimates as JSON.")
vary(
    "predict:text_column",
    help="Column of an --input .csv/.tsv/.jsonl file holding the inputs (default: guessed: text, "
    "sentence, prompt, ...; images: image, path, file).",
)
vary("predict:overwrite", help="Replace an existing --output file.")
vary("predict:batch_size", help="Inputs per forward pass (default: 64; causal-lm 16).")
vary("predict:seed", help="Seed for --do-sample (default 0: the same command samples the same answers).")
vary(
    "eval:adapter",
    help="Adapter directory (a run's adapter/ folder, one in adapters/, a plain peft adapter) or a run directory.",
)
vary(
    "eval:max_eval_samples",
    help="Evaluate a seeded sample of N examples instead of all (a language model's generation on a CPU is slow).",
)
vary("eval:batch_size", default=32, help="Evaluation batch size. Default: 32.")
vary("eval:json", help="Print the results as JSON.")
vary("merge:adapter", help="Adapter directory to merge into its base model.")
vary("export:adapter", help="Adapter directory to export (a run directory means its adapter/).")
declare(
    "export:format",
    "--format",
    dest="fmt",
    default="onnx",
    cli_default="onnx",
    show_default=True,
    choices=EXPORT_FORMATS,
    help="What to write: onnx (sequence and image classification: ONNX Runtime), openvino (the same "
    "classifiers as OpenVINO IR) or gguf (causal-lm on a Llama-architecture base: llama.cpp, Ollama).",
)
declare(
    "export:output",
    "--output",
    default=REQUIRED,
    required=True,
    help="Directory to write (must not exist unless --overwrite).",
)
declare(
    "export:quantize",
    "--quantize",
    choices=EXPORT_QUANTIZATIONS,
    help="int8: ONNX Runtime's dynamic quantization (weights per channel), or for openvino NNCF's "
    "(calibrated on the adapter's validation split): ~4x smaller, faster on CPU; kept only if its "
    "accuracy on the check examples is at most 0.5 points below PyTorch's (--max-accuracy-drop).",
)
declare(
    "export:max_accuracy_drop",
    "--max-accuracy-drop",
    type=float,
    metavar="POINTS",
    help="With --quantize int8: how many points of accuracy on the check examples int8 may lose "
    "against PyTorch's fp32 (default 0.5; 0: none). Without labels: PyTorch's label on at least "
    "1 - POINTS/100 of them, which bounds the loss. Recorded in peftkit_export.json.",
)
declare(
    "export:min_agreement",
    "--min-agreement",
    type=float,
    metavar="FRACTION",
    help="With --quantize int8: also require PyTorch's label on this share of the check examples "
    "(default: not required; the agreement is reported either way), e.g. 0.99.",
)
declare("export:opset", "--opset", type=int, help="ONNX opset, 18 to 23. Default: 18.")
declare(
    "export:dataset",
    "--dataset",
    help="Labelled data to check the export on, every example (default: the test split the adapter "
    "was evaluated on, from its recorded dataset and seed).",
)
declare(
    "export:gguf_pre",
    "--gguf-pre",
    metavar="NAME",
    help="With --format gguf: the tokenizer.ggml.pre to write (llama.cpp's name of the tokenizer's "
    "pre-tokenizer, e.g. gpt-2, llama-bpe, smollm) where llama.cpp's converter would not recognise the "
    "tokenizer; llama.cpp's check then still has to tokenize as transformers does.",
)
declare(
    "export:lora_only",
    "--lora-only",
    default=False,
    type=bool,
    cli_default=False,
    help="With --format gguf, for a lora adapter: the adapter alone as a llama.cpp LoRA file (lora.gguf) "
    "beside its base (base.gguf), for llama-cli -m base.gguf --lora lora.gguf, instead of one merged model.",
)
vary("env:json", help="Print the report as JSON.")
declare(
    "env:lock",
    "--lock",
    field=None,
    dest="lock_file",
    metavar="FILE",
    help="Compare with this lock file (default: the repository's requirements.lock; $PEFTKIT_LOCK).",
)
vary("inspect:json", help="Print the metadata as JSON.")
declare(
    "list:verbose",
    "--verbose",
    "-v",
    field=None,
    type=bool,
    cli_default=False,
    help="Also show each strategy's options, defaults and the models it covers.",
)
declare(
    "list:peft",
    "--peft",
    field=None,
    type=bool,
    cli_default=False,
    help="Also show where each peft:NAME method runs (architectures and tasks, and why not), found by "
    "building each on tiny models: about 20 s the first time for a peft and transformers version, then cached.",
)
# -- peftkit recommend ------------------------------------------------------------------------
declare(
    "time_budget",
    "--time-budget",
    default=REQUIRED,
    required=True,
    metavar="DURATION",
    help="Wall time the whole command may take (20m, 1h30m, 900s): the search stops sampling, "
    "promoting and seeding where the measured times say the rest would not fit. Required.",
)
vary(
    "recommend:strategies",
    help="Candidates: 'all' (every registered strategy, plugins included) or names: lora,full,peft:ia3.",
)
vary(
    "recommend:memory_budget",
    help="Memory each run may use, e.g. 1.5GiB (CUDA: allocator cap; CPU: peak resident memory): a strategy "
    "the planner finds over it even with every lever is dropped before the search, the others are fitted "
    "with levers and micro-batches as bench --auto-fit does. Default: no budget.",
)
declare(
    "eta",
    "--eta",
    default=3,
    type=int,
    show_default=True,
    metavar="N",
    help="Successive halving's factor: each rung keeps the best 1/N of the configurations and trains "
    "them on N times the examples.",
)
declare(
    "finalists",
    "--finalists",
    default=3,
    type=int,
    show_default=True,
    metavar="K",
    help="Strategies (each at its best configuration) that reach the whole training set and are "
    "compared on the test split over the seeds.",
)
vary(
    "recommend:output_dir",
    help="Where the search, runs and report go; give the same one again to continue an interrupted "
    "recommend. Default: runs/recommend-<timestamp>.",
)
vary(
    "recommend:overwrite",
    help="Start afresh: replace the output directory (its study and runs) instead of continuing it.",
)
