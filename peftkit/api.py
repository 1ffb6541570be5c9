"""peftkit as a library: what the ``peftkit`` commands do, callable from Python.

    from peftkit.api import run, bench, plan, predict
    from peftkit.config import Levers, RunConfig

    result = run(RunConfig(strategy="lora", epochs=1, output_dir="runs/lora"))
    result.metrics.test["accuracy"], result.run_dir      # a RunMetrics; .to_dict() is metrics.json

Each function owns what its command needs around the work itself: filling the task's defaults,
checking every setting before anything heavy loads (``preflight``), writing into a staging
directory that is renamed into place only when the work succeeded (``peftkit.rundir``), joining the
process group of a data-parallel launch, and saying what an interruption left behind
(``errors.RunInterrupted``). The command line (``peftkit.cli``) only parses, calls these and prints.

Bad input raises ``PeftkitError`` with a one-line message; progress goes to ``echo`` (by default the
``peftkit`` logger, as the training loop's lines do). A function changes nothing process-wide: not
the config it is given, not the libraries' logging (the command line quiets those in its own
process). Importing this module is cheap: torch loads when a function needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from .adapter_io import describe_adapter, recorded_base_model
from .benchmark.config import BenchConfig, parse_strategies
from .benchmark.preflight import preflight_bench
from .benchmark.results import BenchResult
from .benchmark.suite import run_bench
from .config import RunConfig, default_output_dir
from .data.sources import in_memory_data
from .env import quiet_libraries_in_own_process, to_log
from .errors import LearnedNothingWarning, PeftkitError, RunInterrupted, error_context, set_context, within_context
from .evaluation import EvalConfig, EvalResult, evaluate_adapter, write_evaluation
from .export_config import ExportConfig, MergeConfig
from .exporter import (
    DEFAULT_OPSET,
    ExportResult,
    check_export_settings,
    export_onnx,
    load_onnx,
    read_export_metadata,
    require_onnx,
)
from .gguf_export import export_gguf
from .gguf_lora import export_lora_gguf
from .inference import (
    MergeResult,
    adapter_task,
    check_model_task,
    check_prediction_settings,
    iter_predictions,
    load_adapter,
    merge_to_directory,
    strategy_of_peft_type,
)
from .inputs import check_inputs, check_resumable, names_only
from .metrics import RunMetrics
from .models import in_memory_model
from .openvino_export import export_openvino, load_openvino, require_openvino
from .planner import Plan, PlanSettings, make_plan, resolve_settings
from .predict_io import PredictConfig, check_output_file, read_inputs, write_rows
from .recommendation.config import RecommendConfig
from .recommendation.run import RecommendResult, check_recommend, output_dir_for, run_recommend
from .rundir import check_output_dir, staged_dir
from .runs import RunResult, resumed_config, run_config, warn_if_learned_nothing
from .tasks import get_task
from .tuning.config import TuneConfig, check_tune, plan_tune
from .tuning.output import TuneResult, finish_tune, tune_result
from .tuning.search import run_study

Echo = Callable[[str], None]
"""Where progress messages go (one line each)."""


def run(config: RunConfig, echo: Echo = to_log) -> RunResult:
    """Fine-tune and evaluate as ``config`` says, into ``config.output_dir`` (default
    ``runs/<strategy>-<timestamp>``), which appears only when the run succeeded.

    Unset values take the strategy's and the task's defaults, on a copy: ``config`` is left as given
    (one config can run twice), and the completed settings come back as ``RunResult.config``.
    ``config.dataset`` may be data in memory (a ``datasets.Dataset`` / ``DatasetDict``, a pandas
    ``DataFrame``), read as a file would be; ``config.model`` a loaded ``transformers`` model, alone
    or as ``(model, tokenizer or processor)``, saved for the call and loaded from there as a
    directory would be (the caller's model is left as it was). Runs unchanged under
    ``accelerate launch`` / ``torchrun``. Raises ``PeftkitError`` for bad input, ``RunInterrupted``
    on Ctrl-C (saying whether a checkpoint was kept).
    """
    # in-memory data is read by a name standing for it, for this call (a copy of config names it)
    with error_context(), in_memory_data(config.dataset) as dataset:
        config = dataclasses.replace(config, dataset=dataset)
        config.validate()
        if config.task is not None:
            get_task(config.task)  # an unknown task is refused with the accepted ones, before anything loads
        check_inputs(dataset=dataset)
        check_resumable(config.checkpoint_every, config.model, dataset)
        # a loaded model too (saved for the call), once the settings passed: saving is what takes time
        with in_memory_model(config.model) as model:
            config = dataclasses.replace(config, model=model)
            check_inputs(model)
            result = run_config(config, resume=False, echo=echo)
    return warn_if_learned_nothing(result)


def resume(run_dir: str, echo: Echo = to_log) -> RunResult:
    """Continue the interrupted run that was going to ``run_dir`` from its last checkpoint, with the
    settings it recorded; it ends as the uninterrupted run would have."""
    with error_context():
        config = resumed_config(run_dir)
        config.output_dir = run_dir  # as given now: the recorded one may be relative to another directory
        result = run_config(config, resume=True, echo=echo)
    return warn_if_learned_nothing(result)


def bench(config: BenchConfig, overwrite: bool = False, echo: Echo = to_log) -> BenchResult:
    """Run every strategy of ``config`` (empty: all) for each seed in a process of its own, on the
    same data, and write results.json, results.md, plots and runs/ into ``config.output_dir``
    (default ``runs/bench-<timestamp>``), which appears only when the suite is done.

    Every setting any run could refuse is checked first, and the data and model are loaded once
    (``peftkit.benchmark.preflight``), so bad input fails in seconds, before any worker starts.
    """
    with error_context():
        check_inputs(*names_only("bench", "strategy", config.model, config.dataset))
        config = preflight_bench(config)  # a copy, completed: the caller's config is left as it was
        out = config.output_dir or default_output_dir("bench")
        check_output_dir(out, overwrite)
        config = dataclasses.replace(config, output_dir=out)
        set_context(strategy=",".join(config.strategies), model=str(config.model))  # filled in: a name
        quiet_libraries_in_own_process()
        results, table = run_bench(config, overwrite, echo)
    return BenchResult(out, results, table)


def recommend(config: RecommendConfig, echo: Echo = to_log) -> RecommendResult:
    """Which strategy to use on ``config``'s model and data within its time and memory budgets,
    answered by measuring: candidates the planner finds over the memory budget are dropped;
    successive halving over strategy x configuration (training-set sizes as rungs, each run in a
    process of its own, fitted into the budget) selects on validation; the finalists run over the
    seeds and are compared on the test split, and the cheaper of two that a paired test cannot tell
    apart is recommended. Writes recommend.md (a paragraph first), results.json, plots and
    ``best/`` (the adapter and a config.yaml for ``peftkit run --config``) into
    ``config.output_dir``; an interrupted recommend continues when called again with the same
    settings and output directory. Raises ``PeftkitError`` for bad input (a time budget too small
    for one run included, before anything trains), ``RunInterrupted`` on Ctrl-C (the runs kept)."""
    with error_context():
        check_inputs(*names_only("recommend", "strategy", config.model, config.dataset))
        config = check_recommend(config)  # a copy, completed
        config = dataclasses.replace(config, output_dir=output_dir_for(config))
        set_context(strategy=",".join(config.strategies), model=str(config.model))
        quiet_libraries_in_own_process()
        return run_recommend(config, echo)


def tune(config: TuneConfig, echo: Echo = to_log) -> TuneResult:
    """Search ``config.run.strategy``'s hyper-parameters with Optuna (TPE, seeded; pruning from each
    epoch's validation), each trial in a process of its own, selecting on validation only; then
    train the best configuration once more as a normal run, the only one evaluated on test, and
    write best.yaml, trials.csv, trials.json and plots into ``config.output_dir``.

    The study is stored as trials finish (``study.db`` in the output directory unless
    ``config.storage`` names a database), so running ``tune`` again into the same directory, or
    from several processes at once, continues it; ``config.trials`` counts the trials already
    there. Raises ``PeftkitError`` for bad input, ``RunInterrupted`` on Ctrl-C (the study kept).
    """
    with error_context():
        names = names_only("tune", "trial", config.run.model, config.run.dataset)
        check_tune(config)
        check_inputs(*names)
        plan = plan_tune(config, echo)
        set_context(strategy=plan.strategy.name, model=str(plan.base.model))  # resolved: a name
        study, ran = run_study(plan, echo)
        done = finish_tune(plan, study, echo, train=lambda cfg: run_config(cfg, resume=False, echo=echo).metrics)
    return tune_result(plan, study, ran, done)


def plan(settings: PlanSettings, echo: Echo = to_log) -> Plan:
    """Predict each strategy's (empty: every one's) peak training memory without training: weights,
    gradients and optimizer state by arithmetic, activations measured on a random-weight copy.
    ``echo`` gets what will be measured and roughly how long, then a line per strategy. A strategy
    that cannot be planned is an estimate whose ``status`` is "refused" or "failed" (see
    ``Plan.failed``), not an exception."""
    with error_context():
        names = parse_strategies(",".join(settings.strategies) or "all")
        settings = dataclasses.replace(settings, strategies=names)
        settings.validate()
        with in_memory_model(settings.model) as model:  # a loaded model: saved for the call
            check_inputs(model)
            quiet_libraries_in_own_process()
            settings = resolve_settings(dataclasses.replace(settings, model=model))
            set_context(strategy=",".join(names), model=str(settings.model))  # resolved: a name
            return Plan(settings, make_plan(settings, echo))


def predict(config: PredictConfig) -> list[dict[str, Any]]:
    """Answer ``config.inputs`` (texts; image files for an image classifier), or the inputs of
    ``config.input_file``, with a trained adapter (``config.adapter``) or an export
    (``config.onnx``, ``config.openvino``): one dict per input (label and probabilities, or the
    generated completion). With ``config.output`` the answers are also written to that file
    (atomically). Every setting, the inputs and the output are checked before the model loads
    (see ``PredictConfig``)."""
    with error_context():
        rows = list(predict_iter(config))
        if config.output is not None:
            write_rows(config.output, rows, config.overwrite)
    return rows


def predict_iter(config: PredictConfig) -> Iterator[dict[str, Any]]:
    """``predict``'s answers one at a time as they are computed (``config.output`` is only checked
    here: the caller writes it)."""
    with error_context() as facts:
        config.validate()
        if config.output is not None:  # before a loaded base is saved for the call: a refusal is instant
            check_output_file(config.output, config.overwrite)
        with in_memory_model(config.model) as model:  # a loaded base: saved for the call
            if config.adapter is not None:
                check_inputs(model, adapter_dir=config.adapter)  # a missing path is said before torch loads
            task = _prediction_task(config)
            if model is not None and config.adapter is not None:  # a model made for another task: said now
                check_model_task(task, model, config.adapter, recorded_base_model(config.adapter) or "?")
            check_prediction_settings(task, config.batch_size, config.generation)
            texts = (  # validate(): the texts, or else an input file
                list(config.inputs)
                if config.inputs
                else read_inputs(config.input_file or "", config.text_column, task.input_columns)
            )
            show = (
                config.progress if config.progress is not None else (config.input_file is not None or len(texts) > 64)
            )
            quiet_libraries_in_own_process()  # imports transformers: after every check that can do without it
            if config.adapter is not None:
                predictor: Any = load_adapter(config.adapter, model, force=config.force)
            elif config.openvino is not None:
                predictor = load_openvino(config.openvino)
            else:  # validate(): an adapter, or else an export
                predictor = load_onnx(config.onnx or "")
            answers = iter_predictions(predictor, texts, config.batch_size, config.generation, show)
    return within_context(facts, answers)


def _prediction_task(config: PredictConfig) -> Any:
    """The task of the adapter or export ``config`` names, read from its metadata (no model loads)."""
    if config.adapter is not None:
        return adapter_task(config.adapter)
    if config.openvino is not None:
        require_openvino(None, serving=True)
        meta = read_export_metadata(config.openvino, "openvino")
    else:
        require_onnx()
        meta = read_export_metadata(config.onnx or "")
    return get_task(meta.get("task") or "sequence-classification")


def evaluate(config: EvalConfig, echo: Echo = to_log) -> EvalResult:
    """Evaluate an adapter on every example of a labelled file (``config.dataset``), with the task's
    own metrics, per-class figures and confusion matrix where it has them, and an input-blind
    baseline (the majority class) beside them. With ``config.output``, metrics.json and
    confusion_matrix.png are written there (staged, renamed into place when complete)."""
    with error_context():
        config.validate()
        if config.output:  # before a loaded base is saved for the call, and minutes of evaluation
            check_output_dir(config.output, config.overwrite)
        with in_memory_model(config.model) as model:  # a loaded base: saved for the call
            config = dataclasses.replace(config, model=model)
            check_inputs(model, config.dataset, config.adapter)
            quiet_libraries_in_own_process()
            result = evaluate_adapter(config, echo)
            if config.output:
                with staged_dir(config.output, config.overwrite) as stage:
                    write_evaluation(result, stage)
                result.output_dir = config.output
            return result


def merge(config: MergeConfig) -> MergeResult:
    """Merge an adapter into its base and write a plain transformers model directory to
    ``config.output`` (written into a staging directory, renamed into place when complete)."""
    with error_context():
        with in_memory_model(config.model) as model:  # a loaded base: saved for the call
            check_inputs(model, adapter_dir=config.adapter)
            check_output_dir(config.output, config.overwrite, flag="--output")
            quiet_libraries_in_own_process()
            loaded = load_adapter(config.adapter, model, force=config.force)
            with staged_dir(config.output, config.overwrite, flag="--output") as stage:
                merge_to_directory(loaded, stage)
            return MergeResult(config.output, loaded.metadata["strategy"], loaded.metadata["base_model"])


def export(config: ExportConfig, echo: Echo = to_log) -> ExportResult:
    """Export an adapter on its base as a model that serves without PyTorch (``ExportConfig`` says
    what is written and checked); an export that fails its check raises ``PeftkitError`` and leaves
    nothing. ``predict(PredictConfig(onnx=config.output, inputs=...))`` serves an ONNX export,
    ``PredictConfig(openvino=...)`` an OpenVINO one."""
    c = config
    with error_context():
        check_export_settings(c.format, c.quantize, c.opset, c.min_agreement, c.max_accuracy_drop)
        c.validate()
        with in_memory_model(c.model) as model:  # a loaded base: saved for the call
            check_inputs(model, c.dataset, c.adapter)
            quiet_libraries_in_own_process()
            if c.format == "gguf":
                write = export_lora_gguf if c.lora_only else export_gguf
                return write(
                    c.adapter, c.output, model, force=c.force, overwrite=c.overwrite, pre=c.gguf_pre, echo=echo
                )
            if c.format == "openvino":
                return export_openvino(
                    *(c.adapter, c.output, model, c.quantize, c.dataset, (c.text_column, c.label_column)),
                    force=c.force,
                    overwrite=c.overwrite,
                    gate=(c.max_accuracy_drop, c.min_agreement),
                    echo=echo,
                )
            opset = DEFAULT_OPSET if c.opset is None else c.opset
            return export_onnx(
                *(c.adapter, c.output, model, c.quantize, opset, c.dataset, c.text_column, c.label_column),
                force=c.force,
                overwrite=c.overwrite,
                min_agreement=c.min_agreement,
                max_accuracy_drop=c.max_accuracy_drop,
                echo=echo,
            )


def inspect(adapter_dir: str) -> dict[str, Any]:
    """An adapter's metadata (strategy, base model and fingerprint, labels, metrics, versions) with
    its size; for a plain peft adapter, what its config says. ``adapter_dir`` may be a run
    directory (its ``adapter/`` is read). A plain peft adapter's ``strategy`` is the one peftkit
    loads it as (``peft:ia3`` for an IA3 adapter), where one does."""
    with error_context():
        meta = describe_adapter(adapter_dir)
        if "strategy" not in meta and meta.get("peft_type"):
            cls = strategy_of_peft_type(str(meta["peft_type"]))
            if cls is not None:
                meta["strategy"] = cls.name
        return meta


# the public surface: the commands' functions, their configs and results, the errors a caller
# catches (helpers such as check_inputs stay importable, but are not promised)
__all__ = [
    "BenchConfig",
    "BenchResult",
    "EvalConfig",
    "EvalResult",
    "ExportConfig",
    "ExportResult",
    "LearnedNothingWarning",
    "MergeConfig",
    "MergeResult",
    "PeftkitError",
    "Plan",
    "PlanSettings",
    "PredictConfig",
    "RecommendConfig",
    "RecommendResult",
    "RunConfig",
    "RunInterrupted",
    "RunMetrics",
    "RunResult",
    "TuneConfig",
    "TuneResult",
    "bench",
    "evaluate",
    "export",
    "inspect",
    "merge",
    "plan",
    "predict",
    "predict_iter",
    "recommend",
    "resume",
    "run",
    "tune",
]
