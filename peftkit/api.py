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

import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .adapter_io import recorded_base_model
from .benchmark.config import BenchConfig, parse_strategies
from .benchmark.preflight import preflight_bench
from .benchmark.suite import run_bench
from .config import RunConfig, default_output_dir
from .env import LOGGER, quiet_libraries_in_own_process
from .errors import LearnedNothingWarning, PeftkitError, RunInterrupted, error_context, resumed_context, set_context
from .evaluation import EvalConfig, EvalResult
from .exporter import ExportResult
from .inputs import check_inputs  # the bench and tune functions' too
from .metrics import RunMetrics
from .planner import Estimate, PlanSettings
from .predict_io import PredictConfig
from .tuning.config import TuneConfig, check_tune, plan_tune
from .tuning.output import finish_tune
from .tuning.report import defaults_won, versus_defaults
from .tuning.search import run_study
from .tuning.storage import masked
from .tuning.trial import TrialCounts

if TYPE_CHECKING:  # pragma: no cover
    from .train import ResolvedRun

Echo = Callable[[str], None]
"""Where progress messages go (one line each)."""
_progress = logging.getLogger(LOGGER)


def to_log(message: str) -> None:
    """The default ``echo``: the ``peftkit`` logger at INFO, where the training loop's lines go too;
    your logging configuration decides what shows (``logging.basicConfig(level=logging.INFO)``)."""
    _progress.info(message)


# -- run --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """A finished run: where it is and what it measured."""

    run_dir: str
    """The run directory (config.yaml, metrics.json, train.log, adapter/)."""
    metrics: RunMetrics | None
    """What metrics.json holds (``metrics.to_dict()`` is the file); None in the other processes of
    a data-parallel run (only the main process writes and reports)."""
    config: RunConfig | None = None
    """The settings the run trained with, every default filled in (what its config.yaml records:
    ``run(result.config)`` trains the same run again). The config given to ``run`` is left as it was."""

    @property
    def adapter_dir(self) -> str:
        """The trained adapter (``run_dir/adapter``): what ``predict`` and ``load_adapter`` take."""
        return os.path.join(self.run_dir, "adapter")


def run(config: RunConfig, echo: Echo = to_log) -> RunResult:
    """Fine-tune and evaluate as ``config`` says, into ``config.output_dir`` (default
    ``runs/<strategy>-<timestamp>``), which appears only when the run succeeded.

    Unset values take the strategy's and the task's defaults, on a copy: ``config`` is left as given
    (one config can run twice), and the completed settings come back as ``RunResult.config``.
    ``config.dataset`` may be data in memory (a ``datasets.Dataset`` / ``DatasetDict``, a pandas
    ``DataFrame``), read as a file would be. Runs unchanged under ``accelerate launch`` / ``torchrun``.
    Raises ``PeftkitError`` for bad input, ``RunInterrupted`` on Ctrl-C (saying whether a checkpoint
    was kept).
    """
    from .data.sources import in_memory_data
    from .tasks import get_task

    # in-memory data is read by a name standing for it, for this call (a copy of config names it)
    with error_context(), in_memory_data(config.dataset) as dataset:
        config = dataclasses.replace(config, dataset=dataset)
        config.validate()
        if config.task is not None:
            get_task(config.task)  # an unknown task is refused with the accepted ones, before anything loads
        check_inputs(config.model, dataset)
        result = _run(config, resume=False, echo=echo)
    return _warn_if_learned_nothing(result)


def resume(run_dir: str, echo: Echo = to_log) -> RunResult:
    """Continue the interrupted run that was going to ``run_dir`` from its last checkpoint, with the
    settings it recorded; it ends as the uninterrupted run would have."""
    with error_context():
        config = resumed_config(run_dir)
        config.output_dir = run_dir  # as given now: the recorded one may be relative to another directory
        result = _run(config, resume=True, echo=echo)
    return _warn_if_learned_nothing(result)


def resumed_config(run_dir: str) -> RunConfig:
    """The settings an interrupted run recorded (its config.yaml) as a ``RunConfig``."""
    import yaml

    from .config import FIELDS
    from .rundir import open_stage, stage_path

    path = os.path.join(stage_path(run_dir), "config.yaml")
    if not os.path.exists(path):
        open_stage(run_dir, overwrite=False, resume=True)  # says why there is nothing to resume
        raise PeftkitError(f"interrupted run {run_dir!r} has no config.yaml; it cannot be resumed")
    with open(path, encoding="utf-8") as fh:
        recorded = yaml.safe_load(fh)
    config = RunConfig.from_dict({k: v for k, v in recorded.items() if k in FIELDS})
    config.validate()
    return config


def _run(config: RunConfig, resume: bool, echo: Echo) -> RunResult:
    from .rundir import staged_run
    from .train import execute_run, load_data_early, resolve

    # resolving fills defaults into the config it is given: a copy, so the caller's stays as given
    resolved = resolve(_copy_config(config))  # unknown strategy or bad options fail here, before anything heavy loads
    set_context(strategy=resolved.strategy.name, model=resolved.config.model)
    out = config.output_dir or default_output_dir(resolved.strategy.name)
    resolved.config.output_dir = out
    quiet_libraries_in_own_process()
    early = load_data_early(resolved, echo)  # bad data refused before torch and the model load
    with staged_run(out, resolved.config.overwrite, resume, echo) as stage:
        metrics = execute_run(resolved, stage.path, echo, resume=resume, early=early)
    # only the main process writes and reports
    return RunResult(out, RunMetrics.from_dict(metrics) if stage.main else None, _recorded_config(resolved))


def _copy_config(config: RunConfig) -> RunConfig:
    """``config`` with its own copies of the mutable fields (the levers are frozen), so that nothing
    a run fills in reaches the caller's object."""
    return dataclasses.replace(
        config, report_to=list(config.report_to), strategy_options=copy.deepcopy(config.strategy_options)
    )


def _recorded_config(resolved: ResolvedRun) -> RunConfig:
    """The run's settings as its config.yaml records them (the strategy's epochs, batch size and
    learning rate, the schedule the data gave), as a ``RunConfig``."""
    from .config import FIELDS

    recorded = {k: v for k, v in resolved.as_dict().items() if k in FIELDS}
    return RunConfig.from_dict({**recorded, "overwrite": resolved.config.overwrite})


def _warn_if_learned_nothing(result: RunResult) -> RunResult:
    """``LearnedNothingWarning`` for a run that learned nothing, pointing at the caller of ``run`` or
    ``resume``: a library user reads no log line (the CLI prints its own line instead; tune's best
    run is reported by tune)."""
    if result.metrics is not None and result.metrics.learned is False:
        warnings.warn(
            f"run {result.run_dir} learned nothing: {result.metrics.learned_note}", LearnedNothingWarning, stacklevel=3
        )
    return result


# -- bench ------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    """A finished suite: where its results are, what they hold, and the table a person reads."""

    output_dir: str
    results: dict[str, Any]
    """What results.json holds: every row, a summary per strategy, settings, versions, machine."""
    table: str
    """The table of results.md (markdown), best values in bold."""


def bench(config: BenchConfig, overwrite: bool = False, echo: Echo = to_log) -> BenchResult:
    """Run every strategy of ``config`` (empty: all) for each seed in a process of its own, on the
    same data, and write results.json, results.md, plots and runs/ into ``config.output_dir``
    (default ``runs/bench-<timestamp>``), which appears only when the suite is done.

    Every setting any run could refuse is checked first, and the data and model are loaded once
    (``peftkit.benchmark.preflight``), so bad input fails in seconds, before any worker starts.
    """
    from .rundir import check_output_dir

    with error_context():
        check_inputs(config.model, config.dataset)
        config = preflight_bench(config)  # a copy, completed: the caller's config is left as it was
        out = config.output_dir or default_output_dir("bench")
        check_output_dir(out, overwrite)
        config = dataclasses.replace(config, output_dir=out)
        set_context(strategy=",".join(config.strategies), model=config.model)
        quiet_libraries_in_own_process()
        results, table = run_bench(config, overwrite, echo)
    return BenchResult(out, results, table)


# -- tune -------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """A finished tune: the study, its best trial, and the best configuration's run (the only one
    whose test split was evaluated)."""

    output_dir: str
    """Holds study.db (by default), best.yaml, trials.csv, trials.json, plots, best-run/ and trials/."""
    study_name: str
    storage: str
    """The study's storage URL, its password hidden."""
    metric: str
    trials: int
    """Trials the study has started (this call's and earlier ones', every process's): ``counts.total``."""
    ran: int
    """Trials this call ran."""
    best_trial: int
    best_value: float
    """The best trial's validation ``metric`` (its best epoch's)."""
    best_params: dict[str, Any]
    best_config: RunConfig
    """What best.yaml holds: ``peftkit run --config best.yaml`` trains it again."""
    best_run: RunResult
    """The best configuration trained once more as a normal run (DIR/best-run): its test metrics."""
    plots: list[str]
    versus_defaults: dict[str, Any] | None = None
    """The best trial against the defaults on the same validation examples
    (``peftkit.tuning.report.versus_defaults``: difference, 95% interval, p-value,
    ``distinguishable``); None where it cannot be said."""
    counts: TrialCounts = field(default_factory=TrialCounts)
    """How the study's trials stand (complete, pruned, failed, interrupted, running), the figures
    every line of the tune gives."""
    defaults_best: bool = False
    """The defaults won the study: no tuned setting beat them on validation."""


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
        check_tune(config)
        if not isinstance(config.run.dataset, str | None):
            raise PeftkitError(
                "tune runs each trial in a process of its own, which cannot see data held in memory: "
                "save it to a file (DataFrame.to_csv, Dataset.save_to_disk) and give its path"
            )
        check_inputs(config.run.model, config.run.dataset)
        plan = plan_tune(config, echo)
        set_context(strategy=plan.strategy.name, model=plan.base.model)
        study, ran = run_study(plan, echo)
        done = finish_tune(plan, study, echo, train=lambda cfg: _run(cfg, resume=False, echo=echo).metrics)
    counts = TrialCounts.of(study)
    return TuneResult(
        plan.output_dir,
        plan.study_name,
        masked(plan.storage),
        plan.metric,
        counts.total,
        ran,
        study.best_trial.number,
        study.best_value,
        dict(study.best_trial.params),
        done.best,
        RunResult(done.run_dir, done.metrics),
        done.plots,
        versus_defaults(study),
        counts,
        defaults_won(study),
    )


# -- plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Predicted peak training memory of each strategy, for the settings it was made for."""

    settings: PlanSettings
    """The settings with the task's defaults and the device filled in."""
    estimates: list[Estimate]

    @property
    def failed(self) -> list[str]:
        """The strategies whose planning failed (an error, not a refusal): ``peftkit plan`` exits 1."""
        return [e.strategy for e in self.estimates if e.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """What ``peftkit plan --json`` prints."""
        return {
            "settings": self.settings.to_dict(),
            "estimates": [e.as_dict() for e in self.estimates],
            "failed": self.failed,
        }


def plan(settings: PlanSettings, echo: Echo = to_log) -> Plan:
    """Predict each strategy's (empty: every one's) peak training memory without training: weights,
    gradients and optimizer state by arithmetic, activations measured on a random-weight copy.
    ``echo`` gets what will be measured and roughly how long, then a line per strategy. A strategy
    that cannot be planned is an estimate whose ``status`` is "refused" or "failed" (see
    ``Plan.failed``), not an exception."""
    from .planner import make_plan, resolve_settings

    with error_context():
        names = parse_strategies(",".join(settings.strategies) or "all")
        settings = dataclasses.replace(settings, strategies=names)
        settings.validate()
        check_inputs(settings.model)
        quiet_libraries_in_own_process()
        settings = resolve_settings(settings)
        set_context(strategy=",".join(names), model=settings.model)
        return Plan(settings, make_plan(settings, echo))


# -- predict, merge, inspect ------------------------------------------------------------------


def predict(config: PredictConfig) -> list[dict[str, Any]]:
    """Answer ``config.inputs`` (texts; image files for an image classifier), or the inputs of
    ``config.input_file``, with a trained adapter (``config.adapter``) or an ONNX export
    (``config.onnx``): one dict per input (label and probabilities, or the generated completion).
    With ``config.output`` the answers are also written to that file (atomically). Every setting,
    the inputs and the output are checked before the model loads (see ``PredictConfig``)."""
    from .predict_io import write_rows

    with error_context():
        rows = list(predict_iter(config))
        if config.output is not None:
            write_rows(config.output, rows, config.overwrite)
    return rows


def predict_iter(config: PredictConfig) -> Iterator[dict[str, Any]]:
    """``predict``'s answers one at a time as they are computed (``config.output`` is only checked
    here: the caller writes it)."""
    from .inference import check_model_task, check_prediction_settings, iter_predictions, load_adapter
    from .predict_io import check_output_file, read_inputs

    with error_context() as facts:
        config.validate()
        if config.adapter is not None:
            check_inputs(config.model, adapter_dir=config.adapter)  # a missing path is said before torch loads
        task = _prediction_task(config)
        if config.model is not None and config.adapter is not None:  # a model made for another task: said now
            check_model_task(task, config.model, config.adapter, recorded_base_model(config.adapter) or "?")
        check_prediction_settings(task, config.batch_size, config.generation)
        if config.output is not None:
            check_output_file(config.output, config.overwrite)
        texts = (  # validate(): the texts, or else an input file
            list(config.inputs)
            if config.inputs
            else read_inputs(config.input_file or "", config.text_column, task.input_columns)
        )
        show = config.progress if config.progress is not None else (config.input_file is not None or len(texts) > 64)
        quiet_libraries_in_own_process()  # imports transformers: after every check that can do without it
        if config.adapter is not None:
            predictor: Any = load_adapter(config.adapter, config.model, force=config.force)
        else:  # validate(): an adapter, or else an export
            from .exporter import load_onnx

            predictor = load_onnx(config.onnx or "")
        answers = iter_predictions(predictor, texts, config.batch_size, config.generation, show)
    return _within(facts, answers)


def _prediction_task(config: PredictConfig) -> Any:
    """The task of the adapter or export ``config`` names, read from its metadata (no model loads)."""
    from .inference import adapter_task

    if config.adapter is not None:
        return adapter_task(config.adapter)
    from .exporter import read_export_metadata, require_onnx
    from .tasks import get_task

    require_onnx()
    return get_task(read_export_metadata(config.onnx or "").get("task") or "sequence-classification")


def _within(facts: dict[str, str], answers: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``answers`` computed inside the error context of the ``predict_iter`` call that made them: a
    generator runs after that call returned, and a library failing in it is named as in the call."""
    with resumed_context(facts):
        yield from answers


def evaluate(config: EvalConfig, echo: Echo = to_log) -> EvalResult:
    """Evaluate an adapter on every example of a labelled file (``config.dataset``), with the task's
    own metrics, per-class figures and confusion matrix where it has them, and an input-blind
    baseline (the majority class) beside them. With ``config.output``, metrics.json and
    confusion_matrix.png are written there (staged, renamed into place when complete)."""
    from .evaluation import evaluate_adapter, write_evaluation
    from .rundir import check_output_dir, staged_dir

    with error_context():
        config.validate()
        check_inputs(config.model, config.dataset, config.adapter)
        if config.output:
            check_output_dir(config.output, config.overwrite)  # before minutes of evaluation, not after
        quiet_libraries_in_own_process()
        result = evaluate_adapter(config, echo)
        if config.output:
            with staged_dir(config.output, config.overwrite) as stage:
                write_evaluation(result, stage)
            result.output_dir = config.output
        return result


@dataclass
class MergeResult:
    """A merged model directory and what went into it."""

    output_dir: str
    strategy: str
    base_model: str


def merge(
    adapter_dir: str, output: str, model: str | None = None, force: bool = False, overwrite: bool = False
) -> MergeResult:
    """Merge an adapter (``adapter_dir``: an adapter directory, or a run directory: its
    ``adapter/``) into its base and write a plain transformers model directory to ``output``
    (written into a staging directory, renamed into place when complete)."""
    from .rundir import check_output_dir, staged_dir

    with error_context():
        check_inputs(model, adapter_dir=adapter_dir)
        check_output_dir(output, overwrite, flag="--output")
        quiet_libraries_in_own_process()
        from .inference import load_adapter, merge_to_directory

        loaded = load_adapter(adapter_dir, model, force=force)
        with staged_dir(output, overwrite, flag="--output") as stage:
            merge_to_directory(loaded, stage)
        return MergeResult(output, loaded.metadata["strategy"], loaded.metadata["base_model"])


def export(
    adapter_dir: str,
    output: str,
    format: str = "onnx",
    model: str | None = None,
    *,
    quantize: str | None = None,
    opset: int | None = None,
    dataset: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    min_agreement: float | None = None,
    echo: Echo = to_log,
) -> ExportResult:
    """Export an adapter on its base (``model`` overrides the base) as a model that serves without
    PyTorch, into the directory ``output`` (``format`` "onnx": ``model.onnx``, the tokenizer or
    image processor, ``peftkit_export.json``; "gguf", for a causal-lm adapter on a Llama-architecture
    base: ``model.gguf``, merged, float32, checked by reading it back with transformers and comparing
    greedy generations; see ``peftkit.gguf_export``). Merged where the strategy merges (lora, full,
    gradual_unfreeze), its own modules in the graph otherwise. ``quantize`` "int8": ONNX Runtime's
    dynamic quantization. ``opset``: the ONNX opset (default 18).

    Checked before anything is written, on the adapter's own test split (or every example of
    ``dataset``, read with ``text_column`` / ``label_column``): fp32 probabilities within 1e-4 of
    PyTorch's, int8 PyTorch's label on at least 99% of the examples (``min_agreement`` to accept
    less); an export that fails the check raises ``PeftkitError`` and leaves nothing.
    ``predict(PredictConfig(onnx=output, inputs=...))`` serves it."""
    from .exporter import DEFAULT_OPSET, check_export_settings, export_onnx

    with error_context():
        check_export_settings(format, quantize, opset, min_agreement)
        check_inputs(model, dataset, adapter_dir)
        quiet_libraries_in_own_process()
        if format == "gguf":
            if dataset is not None or text_column is not None or label_column is not None:
                raise PeftkitError(
                    "--dataset, --text-column, --label-column: for --format onnx only (a GGUF export is "
                    "checked on greedy generations of fixed prompts)"
                )
            from .gguf_export import export_gguf

            return export_gguf(adapter_dir, output, model, force=force, overwrite=overwrite, echo=echo)
        return export_onnx(
            adapter_dir,
            output,
            model,
            quantize,
            DEFAULT_OPSET if opset is None else opset,
            dataset,
            text_column,
            label_column,
            force=force,
            overwrite=overwrite,
            min_agreement=min_agreement,
            echo=echo,
        )


def inspect(adapter_dir: str) -> dict[str, Any]:
    """An adapter's metadata (strategy, base model and fingerprint, labels, metrics, versions) with
    its size; for a plain peft adapter, what its config says. ``adapter_dir`` may be a run
    directory (its ``adapter/`` is read)."""
    from .adapter_io import describe_adapter

    with error_context():
        return describe_adapter(adapter_dir)


# the public surface: the commands' functions, their configs and results, the errors a caller
# catches (helpers such as check_inputs stay importable, but are not promised)
__all__ = [
    "BenchConfig",
    "BenchResult",
    "EvalConfig",
    "EvalResult",
    "ExportResult",
    "LearnedNothingWarning",
    "MergeResult",
    "PeftkitError",
    "Plan",
    "PlanSettings",
    "PredictConfig",
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
    "resume",
    "run",
    "tune",
]
