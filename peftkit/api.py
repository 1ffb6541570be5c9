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

Bad input raises ``PeftkitError`` with a one-line message; progress goes to ``echo`` (stderr by
default). Importing this module is cheap: torch loads when a function needs it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .bench import BenchConfig, parse_strategies
from .config import RunConfig, default_output_dir
from .env import quiet_libraries
from .errors import PeftkitError, RunInterrupted, set_context
from .metrics import RunMetrics
from .plan import Estimate, PlanSettings

if TYPE_CHECKING:  # pragma: no cover
    from .train import ResolvedRun

Echo = Callable[[str], None]
"""Where progress messages go (one line each)."""


def to_stderr(message: str) -> None:
    """The default ``echo``: progress on stderr, so stdout stays for results."""
    print(message, file=sys.stderr, flush=True)


# -- run --------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """A finished run: where it is and what it measured."""

    run_dir: str
    """The run directory (config.yaml, metrics.json, train.log, adapter/)."""
    metrics: RunMetrics | None
    """What metrics.json holds (``metrics.to_dict()`` is the file); None in the other processes of
    a data-parallel run (only the main process writes and reports)."""


def run(config: RunConfig, echo: Echo = to_stderr) -> RunResult:
    """Fine-tune and evaluate as ``config`` says, into ``config.output_dir`` (default
    ``runs/<strategy>-<timestamp>``), which appears only when the run succeeded.

    Unset values take the strategy's and the task's defaults (``config`` is completed in place).
    Runs unchanged under ``accelerate launch`` / ``torchrun``. Raises ``PeftkitError`` for bad input,
    ``RunInterrupted`` on Ctrl-C (saying whether a checkpoint was kept).
    """
    config.validate()
    if config.task is not None:
        from .tasks import get_task

        get_task(config.task)  # an unknown task is refused with the accepted ones, before anything loads
    return _run(config, resume=False, echo=echo)


def resume(run_dir: str, echo: Echo = to_stderr) -> RunResult:
    """Continue the interrupted run that was going to ``run_dir`` from its last checkpoint, with the
    settings it recorded; it ends as the uninterrupted run would have."""
    config = resumed_config(run_dir)
    config.output_dir = run_dir  # as given now: the recorded one may be relative to another directory
    return _run(config, resume=True, echo=echo)


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
    from .train import resolve

    resolved = resolve(config)  # unknown strategy or bad options fail here, before anything heavy loads
    set_context(strategy=resolved.strategy.name, model=config.model)
    out = config.output_dir or default_output_dir(resolved.strategy.name)
    resolved.config.output_dir = out
    quiet_libraries()
    metrics = _run_staged(resolved, out, resume, echo)
    return RunResult(out, None if metrics is None else RunMetrics.from_dict(metrics))


def _process_state() -> Any:
    """accelerate's process state: joins the process group under ``accelerate launch`` /
    ``torchrun``. On a machine without a GPU (or when accelerate was told to use the CPU) it must
    be told, or each process trains alone."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def _open_stage_everywhere(state: Any, out: str, overwrite: bool, resume: bool) -> str:
    """The main process creates (or finds) the staging directory; the others wait for its answer,
    so that a refusal stops every process instead of leaving some waiting forever."""
    from .rundir import open_stage, stage_path

    problem: BaseException | None = None
    if state.is_main_process:
        try:
            open_stage(out, overwrite, resume)
        except BaseException as exc:  # the other processes must not wait forever for us
            problem = exc
    if state.num_processes > 1:
        import torch.distributed as dist

        flag = [problem is None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0] and problem is None:
            raise SystemExit(2)  # the main process reports the error
    if problem is not None:
        raise problem
    return stage_path(out)


def _run_staged(run: ResolvedRun, out: str, resume: bool, echo: Echo) -> dict[str, Any] | None:
    """Run into the staging directory and move it to ``out`` when done. A failed run keeps its
    staging directory only if it holds a checkpoint, and says how to resume; an interrupted one
    raises ``RunInterrupted`` saying the same."""
    from .rundir import abandon_stage, finish_stage
    from .train import execute_run

    state = _process_state()
    stage = _open_stage_everywhere(state, out, run.config.overwrite, resume)
    try:
        metrics = execute_run(run, stage, echo, resume=resume)
    except BaseException as exc:
        if state.is_main_process and abandon_stage(stage):
            kept = f"the last checkpoint is kept: continue with peftkit run --resume {out}"
            echo(f"the run stopped; {kept}")
            if isinstance(exc, KeyboardInterrupt):
                raise RunInterrupted(kept) from exc
        raise
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    finish_stage(stage, out, run.config.overwrite)
    return metrics


# -- bench ------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    """A finished suite: where its results are, what they hold, and the table a person reads."""

    output_dir: str
    results: dict[str, Any]
    """What results.json holds: every row, a summary per strategy, settings, versions, machine."""
    table: str
    """The table of results.md (markdown), best values in bold."""


def bench(config: BenchConfig, overwrite: bool = False, echo: Echo = to_stderr) -> BenchResult:
    """Run every strategy of ``config`` (empty: all) for each seed in a process of its own, on the
    same data, and write results.json, results.md, plots and runs/ into ``config.output_dir``
    (default ``runs/bench-<timestamp>``), which appears only when the suite is done.

    Every setting any run could refuse is checked first, and the data and model are loaded once
    (``preflight``), so bad input fails in seconds, before any worker starts.
    """
    from .bench import run_suite
    from .rundir import check_output_dir, staged_dir

    config = preflight_bench(config)
    out = config.output_dir or default_output_dir("bench")
    check_output_dir(out, overwrite)
    config.output_dir = out
    set_context(strategy=",".join(config.strategies), model=config.model)
    quiet_libraries()
    predict_peak = _bench_predictor(config)
    echo(f"bench: {len(config.strategies)} strategies x {len(config.seeds)} seed(s) on {config.model!r} / "
         f"{config.dataset!r}, each run in its own process; results in {out}")
    with staged_dir(out, overwrite) as stage:
        results = run_suite(config, stage, echo, predict=predict_peak)
        with open(os.path.join(stage, "results.md"), encoding="utf-8") as fh:
            table = "".join(line for line in fh if line.startswith("|")).rstrip()
    return BenchResult(out, results, table)


def preflight_bench(config: BenchConfig) -> BenchConfig:
    """``config`` with its strategies checked (names and aliases), the task's defaults filled in,
    and every setting a run could refuse checked now, before any worker."""
    from .train import with_task_defaults

    names = parse_strategies(",".join(config.strategies) or "all")
    _, filled = with_task_defaults(config)
    config = dataclasses.replace(config, strategies=names, **filled)
    config.validate()
    for name in config.strategies:
        config.run_config(name, config.seeds[0], config.batch_size, "unused")
    return config


def _bench_predictor(config: BenchConfig) -> Any:
    """The planner's prediction of each run's peak, for skipping what will not fit. Loads the data
    and the model's processor once first: data or a model no run could load fails here, in seconds,
    and the data says how many labels and loss positions to plan for."""
    import torch

    from .plan import bench_predictor
    from .tasks import get_task

    cfg = config.run_config(config.strategies[0], config.seeds[0], config.batch_size, "unused")
    task = get_task(config.task)
    data = task.load_data(cfg)
    processor = task.load_processor(config.model)
    num_labels = max(2, len(data.label_names or ()))
    return bench_predictor(config.model, config.batch_size, config.max_length, num_labels,
                           "cuda" if torch.cuda.is_available() else "cpu", task=config.task,
                           loss_positions=task.loss_positions(data, processor, cfg))


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
        return {"settings": self.settings.to_dict(), "estimates": [e.as_dict() for e in self.estimates],
                "failed": self.failed}


def plan(settings: PlanSettings, echo: Echo = to_stderr) -> Plan:
    """Predict each strategy's (empty: every one's) peak training memory without training: weights,
    gradients and optimizer state by arithmetic, activations measured on a random-weight copy.
    ``echo`` gets what will be measured and roughly how long, then a line per strategy. A strategy
    that cannot be planned is an estimate whose ``status`` is "refused" or "failed" (see
    ``Plan.failed``), not an exception."""
    from .plan import make_plan, resolve_settings

    names = parse_strategies(",".join(settings.strategies) or "all")
    settings = dataclasses.replace(settings, strategies=names)
    settings.validate()
    quiet_libraries()
    settings = resolve_settings(settings)
    set_context(strategy=",".join(names), model=settings.model)
    return Plan(settings, make_plan(settings, echo))


# -- predict, merge, inspect ------------------------------------------------------------------

def predict(adapter_dir: str, inputs: list[str], model: str | None = None,
            force: bool = False) -> list[dict[str, Any]]:
    """Answer ``inputs`` (texts; image files for an image classifier) with a trained adapter: one
    dict per input (label and probabilities, or the generated completion). ``model`` overrides the
    base named in the adapter's metadata; ``force`` applies it even if the base's weights differ."""
    quiet_libraries()
    from .predict import load_adapter, predict_texts

    loaded = load_adapter(adapter_dir, model, force=force)
    return predict_texts(loaded, list(inputs))


@dataclass
class MergeResult:
    """A merged model directory and what went into it."""

    output_dir: str
    strategy: str
    base_model: str


def merge(adapter_dir: str, output: str, model: str | None = None, force: bool = False,
          overwrite: bool = False) -> MergeResult:
    """Merge an adapter into its base and write a plain transformers model directory to ``output``
    (written into a staging directory, renamed into place when complete)."""
    from .rundir import check_output_dir, staged_dir

    check_output_dir(output, overwrite)
    quiet_libraries()
    from .predict import load_adapter, merge_to_directory

    loaded = load_adapter(adapter_dir, model, force=force)
    with staged_dir(output, overwrite) as stage:
        merge_to_directory(loaded, stage)
    return MergeResult(output, loaded.metadata["strategy"], loaded.metadata["base_model"])


def inspect(adapter_dir: str) -> dict[str, Any]:
    """An adapter's metadata (strategy, base model and fingerprint, labels, metrics, versions) with
    its size; for a plain peft adapter, what its config says."""
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
    return meta


__all__ = ["BenchConfig", "BenchResult", "MergeResult", "Plan", "PlanSettings", "RunConfig", "RunResult",
           "bench", "inspect", "merge", "plan", "predict", "resume", "resumed_config", "run"]
