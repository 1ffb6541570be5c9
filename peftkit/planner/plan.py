"""The plan: each strategy's arithmetic, then its activations measured once per structure, with a
line of progress per strategy (``make_plan``); one strategy at a time (``plan_strategy``), a
strategy's applicability (``check_applicable``) and the bench's predictor (``bench_predictor``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Levers
from ..durations import format_rough, time_left
from ..errors import PeftkitError, first_line, raising_library, set_context
from ..levers import check_levers
from ..memory import format_size, parse_size
from ..models import resolve_model_source
from ..registry import get_strategy
from ..strategies.base import Strategy, options_from_dict
from ..structure import head_module_names
from ..tasks import get_task
from .arithmetic import parameter_memory, per_process_memory
from .estimate import Estimate, PlanSettings, activation_line, resolve_settings
from .measure import (
    MAX_STEPS,
    measure_activations,
    measurement_method,
    model_depth,
    runtime_bytes,
    step_lengths,
    with_depth,
)


@dataclass
class _Job:
    """One strategy between its arithmetic (weights, gradients, optimizer state) and its measurement."""

    est: Estimate
    strategy: Any
    task: Any = None
    key: Any = None
    """What the activations depend on (``structure_key``): equal keys, equal activations."""


@contextlib.contextmanager
def _row_errors(est: Estimate) -> Any:
    """A strategy that cannot be planned is a row, not a crash: refused (``PeftkitError``: it
    cannot be used so) or failed (anything else, naming the library that raised)."""
    try:
        yield
    except PeftkitError as exc:
        est.status, est.error = "refused", str(exc)
    except Exception as exc:  # noqa: BLE001
        library = raising_library(exc)  # the row names where it failed: "peft raised ValueError: ..."
        est.status, est.error = (
            "failed",
            f"{library + ' raised ' if library else ''}{type(exc).__name__}: {first_line(exc)}",
        )


def structure_key(strategy: Any, prepared: Any, trainable: dict[str, Any]) -> tuple[Any, ...]:
    """What a strategy's activations depend on, read from its prepared (meta) model: every
    parameter's name, shape, dtype and whether it trains, every module's type and hooks, and the
    strategy's forward (with its options, where it overrides the shared one). Two strategies with
    equal keys run the same computation (``full`` and ``gradual_unfreeze`` at its end): measured once."""
    forward = type(strategy).forward
    options = None if forward is Strategy.forward else repr(strategy.options)
    trains = {id(p) for p in trainable.values()}
    params = tuple((n, tuple(p.shape), str(p.dtype), id(p) in trains) for n, p in prepared.named_parameters())
    modules = tuple(
        (
            type(m).__qualname__,
            tuple(
                getattr(h, "__qualname__", type(h).__qualname__)
                for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
            ),
        )
        for m in prepared.modules()
    )
    return forward, options, params, modules


def options_for(strategy_name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Of the plan's ``--set`` options, those ``strategy_name`` has (``--set r=64`` plans LoRA at rank
    64 and leaves a full fine-tune's row as it was)."""
    fields = {f.name for f in dataclasses.fields(get_strategy(strategy_name).Options)}
    return {k: v for k, v in options.items() if k.replace("-", "_") in fields}


def check_options(strategy_names: list[str], options: dict[str, Any]) -> None:
    """Raise ``PeftkitError`` for a ``--set`` option that none of the planned strategies has, or a
    value one of those that have it cannot take (both before anything is measured)."""
    for key in options:
        if not any(key in options_for(name, {key: None}) for name in strategy_names):
            accepted = sorted(
                {f.name for name in strategy_names for f in dataclasses.fields(get_strategy(name).Options)}
            )
            raise PeftkitError(
                f"unknown option {key!r} for the planned strategies ({', '.join(strategy_names)}); "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
    for name in strategy_names:
        cls = get_strategy(name)
        options_from_dict(cls, options_for(name, options))  # (raises for a value it cannot take)


def _arithmetic(
    config: Any, strategy_name: str, settings: PlanSettings, strategy_options: dict[str, Any] | None = None
) -> _Job:
    """Weights, gradients and optimizer state of one strategy, from the model built on the meta
    device (no memory, no measuring), and what its activations will need. ``strategy_options``:
    the strategy's options (default: those of ``settings.strategy_options`` it has).

    A strategy built from the weights (SHiRA's mask by ``torch.nonzero``) cannot be built on the meta
    device: it is counted on one- and two-layer copies with real weights instead, and every count
    (a sum over parameters, so linear in the number of layers) extrapolated to the model's depth."""
    cls = get_strategy(strategy_name)
    if strategy_options is None:
        strategy_options = options_for(strategy_name, settings.strategy_options)
    job = _Job(Estimate(strategy=cls.name), cls(options_from_dict(cls, strategy_options)))
    est, task_type = job.est, get_task(settings.task)
    with _row_errors(est):
        check_levers(settings.levers, job.strategy, on_cuda=settings.device == "cuda", task=task_type)
        try:
            _count(job, config, settings, weightless=True)
        except PeftkitError:
            depth = model_depth(config)
            one, two = (copy.deepcopy(job) for _ in range(2))
            _count(one, with_depth(config, 1), settings, weightless=False)
            _count(two, with_depth(config, 2), settings, weightless=False)
            for name in _LINEAR_IN_DEPTH:
                a, b = getattr(one.est, name), getattr(two.est, name)
                setattr(est, name, a + (depth - 1) * (b - a))
            est.notes = [
                *two.est.notes,
                f"built from the weights: counted on 1- and 2-layer copies with random weights, "
                f"extrapolated to {depth} layers",
            ]
            job.task, job.key = two.task, two.key
    return job


# The arithmetic's figures: sums over parameters, so each is a + (layers - 1) * per-layer
_LINEAR_IN_DEPTH = ("trainable_params", "total_params", "weights", "gradients", "optimizer", "communication")


def _count(job: _Job, config: Any, settings: PlanSettings, weightless: bool) -> None:
    """Build ``job``'s strategy on a model of ``config`` (on the meta device if ``weightless``) and
    fill in its parameter counts and bytes, its task and its structure key."""
    from accelerate import init_empty_weights

    est, task_type = job.est, get_task(settings.task)

    def empty() -> Any:  # (a generator's context: a new one for each ``with``)
        return init_empty_weights(include_buffers=False) if weightless else contextlib.nullcontext()

    with empty():
        full = task_type.model_from_config(config)
    job.task = task_type.plan_spec(full, settings.num_labels)
    skip = head_module_names(full)
    with empty():
        prepared = job.strategy.prepare(full, job.task)
    trainable = job.strategy.trainable_parameters(prepared)
    if not trainable:  # (BitFit on a model without biases) as a run would refuse it
        raise PeftkitError(f"strategy {est.strategy!r} left no parameter to train on this model")
    est.trainable_params = sum(p.numel() for p in trainable.values())
    est.total_params = sum(p.numel() for p in prepared.parameters())
    est.weights, est.gradients, est.optimizer, est.notes = parameter_memory(prepared, trainable, settings, skip)
    per_process_memory(est, prepared, trainable, settings, skip)
    job.key = structure_key(job.strategy, prepared, trainable)


def _measure(config: Any, job: _Job, settings: PlanSettings, measured: dict[Any, tuple[Estimate, str]]) -> None:
    """Fill in ``job``'s activations: measured, or copied from an earlier strategy in ``measured``
    with the same structure key (which this adds to). Under a memory budget, measured again at a
    batch of 1 (``_fit_budget``: what does not grow with the batch)."""
    est = job.est
    if est.status != "ok":
        return
    with _row_errors(est):
        if job.key in measured:
            source, note = measured[job.key]
            est.activations, est.workspace = source.activations, source.workspace
            est.activations_fixed = source.activations_fixed
            est.notes += [
                note,
                f"activations as measured for {source.strategy} (the same parameters, trainable ones and forward pass)",
            ]
        else:
            note = measure_activations(config, job.strategy, job.task, settings, est)
            est.notes.append(note)
            if settings.memory_budget and settings.batch_size > 1:
                one = dataclasses.replace(est, notes=[])
                measure_activations(config, job.strategy, job.task, dataclasses.replace(settings, batch_size=1), one)
                est.activations_fixed = activation_line(est, settings.batch_size, one)[0]
            measured[job.key] = (est, note)
    if est.status == "ok":
        _fit_budget(est, settings)


def plan_strategy(
    config: Any, strategy_name: str, settings: PlanSettings, strategy_options: dict[str, Any] | None = None
) -> Estimate:
    """Predict one strategy's peak training memory for ``config`` (a transformers config), with
    ``strategy_options`` (default: those of ``settings.strategy_options`` it has)."""
    if settings.device == "cpu":
        runtime_bytes()  # before any model exists in this process
    job = _arithmetic(config, strategy_name, settings, strategy_options)
    _measure(config, job, settings, {})
    return job.est


def _fit_budget(est: Estimate, settings: PlanSettings) -> None:
    """Per-example activations, the CPU runtime and, under a budget, the largest batch that fits:
    on the line through the activations at a batch of 1 and at the batch planned
    (``activation_line``; the part that does not grow with the batch, about 100 MiB on CPU for
    MiniLM's full fine-tune, is not divided among the examples)."""
    fixed, per_example = activation_line(est, settings.batch_size)
    est.activations_per_example = per_example
    if settings.device == "cpu":
        est.runtime = runtime_bytes()
    if settings.memory_budget:
        budget = parse_size(settings.memory_budget)
        weights_and_state = est.total - est.activations - est.workspace
        room = budget - weights_and_state - fixed
        est.max_batch_size = max(0, int(room // per_example)) if per_example else None
        if est.max_batch_size == 0:
            what = "the weights, gradients and optimizer state" + (" and the runtime" if est.runtime else "")
            fixed_part = f", with the activations' fixed part ({format_size(fixed)})," if fixed >= 1 else ""
            est.notes.append(
                f"{what} alone ({format_size(weights_and_state)}){fixed_part} leave no room for one example "
                f"in {format_size(budget)}"
            )


def load_config(model: str) -> Any:
    """The model's transformers config (hub id, local directory or short name), nothing else."""
    from transformers import AutoConfig

    source = resolve_model_source(model)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        raise PeftkitError(f"cannot read the config of model {model!r}: {first_line(exc)}") from None
    set_context(model_type=getattr(config, "model_type", None))
    return config


def check_applicable(model: str, task: str, strategy_name: str, strategy_options: dict[str, Any] | None = None) -> None:
    """Raise ``PeftkitError`` if the strategy cannot train this model for this task (prefix tuning
    on a ViT, BitFit on a model without biases), found in a second on a weightless copy.

    A strategy that computes from the weights while it is built (SHiRA draws its sparse mask with
    ``torch.nonzero``, which a weightless tensor cannot answer) fails on that copy whatever the
    model; so a refusal there is checked again on a one-layer copy with real weights (small, and the
    same kinds of layer), and only a refusal from that one stands."""
    config = load_config(model)
    settings = PlanSettings(model=model, strategies=[strategy_name], task=task)
    cls = get_strategy(strategy_name)

    def job() -> _Job:
        return _Job(Estimate(strategy=cls.name), cls(options_from_dict(cls, strategy_options or {})))

    try:
        _count(job(), config, settings, weightless=True)
    except PeftkitError:
        _count(job(), with_depth(config, 1), settings, weightless=False)


def make_plan(settings: PlanSettings, echo: Callable[[str], None] | None = None) -> list[Estimate]:
    """An ``Estimate`` per strategy in ``settings`` (task defaults and device filled in first).
    ``echo`` gets one line saying what will be measured and roughly how long it takes, then one
    line per strategy as it is done."""
    settings = resolve_settings(settings)
    check_options(settings.strategies, settings.strategy_options)
    config = load_config(settings.model)
    say = echo or (lambda _line: None)
    if settings.device == "cpu":
        runtime_bytes()  # before any model exists in this process
    jobs = [_arithmetic(config, name, settings) for name in settings.strategies]
    say(_announce(config, settings, jobs))
    measured: dict[Any, tuple[Estimate, str]] = {}
    started, done = time.monotonic(), 0
    for i, job in enumerate(jobs, 1):
        fresh = job.est.status == "ok" and job.key not in measured
        t = time.monotonic()
        _measure(config, job, settings, measured)
        done += fresh
        left = _distinct(jobs[i:], measured)
        say(
            _progress(
                i,
                len(jobs),
                job.est,
                time.monotonic() - t if fresh else None,
                time_left(time.monotonic() - started, done, left) if done and left else None,
            )
        )
    return [job.est for job in jobs]


def _distinct(jobs: list[_Job], measured: dict[Any, Any] | None = None) -> int:
    """How many measurements ``jobs`` still need (one per structure key not in ``measured``)."""
    return len({job.key for job in jobs if job.est.status == "ok"} - set(measured or ()))


def _announce(config: Any, settings: PlanSettings, jobs: list[_Job]) -> str:
    """The line said before measuring: what, for how many strategies, roughly how long."""
    ok = [job for job in jobs if job.est.status == "ok"]
    what = (
        f"planning {len(jobs)} strateg{'y' if len(jobs) == 1 else 'ies'} for {settings.model} on "
        f"{settings.device}: weights, gradients and optimizer state by arithmetic"
    )
    count = _distinct(ok)
    if not count:
        return what + "; nothing to measure"
    how = measurement_method(config, settings, max(job.est.total_params for job in ok))
    length = f" x {settings.max_length} tokens" if settings.max_length else ""
    shared = [
        f"{job.est.strategy} shares {first.est.strategy}'s"
        for n, job in enumerate(ok)
        for first in ok[:n]
        if first.key == job.key
    ][:3]
    if how == "saved":
        method = f"the tensors autograd saves in one forward pass at depth 1 and 2, batch {settings.batch_size}{length}"
    else:
        where = (
            "the whole model"
            if how == "whole"
            else "depth 2, a block's saved tensors"
            if settings.device == "cpu"
            else "depth 2 and 3"
        )
        method = (
            f"up to {MAX_STEPS} training steps of a random-weight copy ({where}, batch "
            f"{settings.batch_size}{length}) on {settings.device}"
        )
    seconds = _rough_seconds(config, settings, how) * count
    if settings.memory_budget and settings.batch_size > 1:
        # _measure measures each again at a batch of 1 for the budget's largest batch
        method += ", and again at batch 1 (what does not grow with the batch)"
        seconds += _rough_seconds(config, dataclasses.replace(settings, batch_size=1), how) * count
    return (
        f"{what}; activations by {method}, {count} measurement{'s' if count > 1 else ''}"
        f"{' (' + ', '.join(shared) + ')' if shared else ''}; "
        f"roughly {format_rough(seconds)}"
    )


def _progress(i: int, n: int, est: Estimate, seconds: float | None, left: float | None) -> str:
    """One strategy's progress line: its status, how long it took, about how long is left."""
    if est.status != "ok":
        state = est.status
    elif seconds is None:
        state = "done (activations shared)"
    else:
        state = f"measured in {format_rough(seconds)}"
    return f"[{i}/{n}] {est.strategy}: {state}" + (f", about {format_rough(left)} left" if left else "")


# A measurement's time over the time the matmuls of all MAX_STEPS steps take at the calibrated rate:
# attention, dropout, norms and the optimizer add to it, stopping once settled (usually after 7 steps)
# takes from it. Fitted on MiniLM, all strategies, an idle 2-core Xeon (AVX-512): 6 measurements in
# 36 s, where a factor of 0.6 (fitted while the machine was busy, so its matmul rate was low) said 13 s.
_TIME_FACTOR = 1.6


def _rough_seconds(config: Any, settings: PlanSettings, how: str) -> float:
    """A rough time for one measurement: 6 FLOPs per linear weight per position (forward and
    backward) over every measured step's positions, at this machine's matmul rate now."""
    from accelerate import init_empty_weights
    from torch import nn

    if how == "saved":
        return 2.0
    with init_empty_weights(include_buffers=False):
        model = get_task(settings.task).model_from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if how == "extrapolated":  # depth 2 and 3 instead of all of it
        linear = linear * 5 / model_depth(config)
    positions = sum(step_lengths(settings.max_length)) or MAX_STEPS * 197  # (images: ViT-base's patches)
    flops = 6 * linear * settings.batch_size * positions
    return _TIME_FACTOR * flops / _matmul_rate(settings.device)


def rough_run_seconds(
    model: str, task: str, trained: int, evaluated: int, max_length: int | None, device: str
) -> float:
    """A rough time for the matmuls of a run that trains ``trained`` examples (over all its epochs)
    and evaluates ``evaluated``: 6 FLOPs per linear weight per position trained (forward and
    backward), 2 per position evaluated, every example ``max_length`` long (an upper bound: batches
    are padded to their longest), at this machine's matmul rate now, times ``_TIME_FACTOR``. What
    ``peftkit recommend`` refuses a budget by before anything trains; measured runs replace it."""
    from accelerate import init_empty_weights
    from torch import nn

    with init_empty_weights(include_buffers=False):
        built = get_task(task).model_from_config(load_config(model))
    linear = sum(m.weight.numel() for m in built.modules() if isinstance(m, nn.Linear))
    flops = linear * (max_length or 197) * (6 * trained + 2 * evaluated)  # (images: ViT-base's patches)
    return _TIME_FACTOR * flops / _matmul_rate(device)


def _matmul_rate(device: str) -> float:
    """FLOP/s of a mid-sized fp32 matmul on ``device``: the best of five bursts of 20 ms (the
    machine's own speed; on a busy machine the per-strategy lines correct the estimate)."""
    import torch

    a, b = torch.randn(1024, 384, device=device), torch.randn(384, 1536, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 0.02:
            a @ b
            runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * 1024 * 384 * 1536 * runs / (time.perf_counter() - start))
    return best


def bench_predictor(
    model: str,
    batch_size: int,
    max_length: int | None,
    num_labels: int,
    device: str,
    task: str = "sequence-classification",
    loss_positions: int | None = None,
) -> Any:
    """For ``peftkit bench``: predicted peak bytes of (strategy, levers, micro-batch).

    Activations are a part that does not grow with the batch (the optimizer step's temporaries,
    workspace: about 100 MiB for MiniLM's full fine-tune on CPU) plus a part per example. So each
    (strategy, levers) is planned at the effective batch and, where a smaller micro-batch is asked,
    also at a micro-batch of 1, and the activations taken on the line through the two. (Scaling the
    effective batch's figure alone down to 1 lost that fixed part: on CPU the bench then ran full
    fine-tunes at micro-batches the plan put under a budget they went over.) A micro-batch of 1
    needs only its own plan; a larger one than the effective batch scales the per-example part.
    """
    config = load_config(model)
    cache: dict[Any, Estimate | None] = {}

    def planned(strategy: str, levers: Levers, batch: int) -> Estimate | None:
        key = (strategy, levers, batch)
        if key not in cache:
            settings = PlanSettings(
                model=model,
                strategies=[strategy],
                task=task,
                batch_size=batch,
                max_length=max_length,
                num_labels=num_labels,
                device=device,
                loss_positions=loss_positions,
                levers=levers,
            )
            est = plan_strategy(config, strategy, settings)
            if device == "cuda":
                # the workers need the card: give back what planning cached (the context stays)
                import torch

                torch.cuda.empty_cache()
            cache[key] = est if est.status == "ok" else None
        return cache[key]

    def predict(strategy: str, levers: Levers, micro_batch: int) -> int | None:
        one = planned(strategy, levers, 1) if micro_batch < batch_size else None
        if micro_batch == 1 and one is not None:
            return one.total
        whole = planned(strategy, levers, batch_size)
        if whole is None:
            return None
        fixed, per_example = activation_line(whole, batch_size, one)
        return int(whole.total - whole.activations - whole.workspace + fixed + per_example * micro_batch)

    return predict
