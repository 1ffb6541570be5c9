"""The one training loop every strategy runs through.

Built on accelerate (device placement, gradient accumulation, mixed precision, multi-process), it
branches only on what a strategy returns: its parameter groups, its event hooks, its forward and
its adapter state. A difference between two strategies in a benchmark is therefore a difference
between the strategies, not between two copies of a loop.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import RunConfig
from .errors import PeftkitError, set_context
from .files import write_json  # noqa: F401 - re-exported for older callers (to be removed)
from .levers import make_optimizer, store_frozen_in_half
from .memory import MemoryMeter, apply_budget, check_budget, parse_size
from .strategies.base import ParamGroup, Strategy, TaskSpec, TrainingDefaults, options_from_dict, options_to_dict
from .tasks.base import Task, gathered_sum


@dataclass
class ResolvedRun:
    """A ``RunConfig`` with every default filled in, plus the strategy and task objects it names."""

    config: RunConfig
    strategy: Strategy
    hparams: TrainingDefaults
    task: Task

    def as_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.update(strategy=self.strategy.name, epochs=self.hparams.epochs, batch_size=self.hparams.batch_size,
                 lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                 warmup_ratio=self.hparams.warmup_ratio,
                 strategy_options=options_to_dict(self.strategy.options))
        d.pop("overwrite", None)
        return d


def with_task_defaults(settings: Any) -> tuple[Task, dict[str, Any]]:
    """The task ``settings`` name (read from the model when not given) and the values its unset
    ``task``, ``model``, ``dataset`` and ``max_length`` take: the task's defaults. The one place
    where a run's, a bench's and a plan's settings are completed from their task; only the fields
    ``settings`` has are returned."""
    from .tasks import get_task, infer_task

    task = get_task(settings.task or infer_task(settings.model))
    filled = {"task": task.name, "model": settings.model or task.default_model,
              "dataset": getattr(settings, "dataset", None) or task.default_dataset,
              "max_length": task.default_max_length if settings.max_length is None else settings.max_length}
    return task, {k: v for k, v in filled.items() if hasattr(settings, k)}


def resolve(cfg: RunConfig) -> ResolvedRun:
    """Look up the strategy and the task, check the options, fill unset values from their defaults
    (the task: from the model when not given; model, data and length: the task's own)."""
    from .levers import check_levers
    from .registry import get_strategy

    cls = get_strategy(cfg.strategy)
    strategy = cls(options_from_dict(cls, cfg.strategy_options))
    check_levers(cfg.levers, strategy)
    task, filled = with_task_defaults(cfg)
    for key, value in filled.items():
        setattr(cfg, key, value)
    check_trackers(cfg.report_to)
    d = cls.defaults
    hp = TrainingDefaults(
        lr=cfg.lr if cfg.lr is not None else d.lr,
        epochs=cfg.epochs if cfg.epochs is not None else d.epochs,
        batch_size=cfg.batch_size if cfg.batch_size is not None else d.batch_size,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else d.weight_decay,
        warmup_ratio=cfg.warmup_ratio if cfg.warmup_ratio is not None else d.warmup_ratio,
    )
    return ResolvedRun(cfg, strategy, hp, task)


def check_trackers(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing now, not after an hour of training."""
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
    for tracker in report_to:
        module, hint = packages[tracker]
        if importlib.util.find_spec(module) is None:
            raise PeftkitError(f"--report-to {tracker} needs the {module} package, which is not installed: {hint}")


# -- data -------------------------------------------------------------------------------------

def make_loader(ds: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], batch_size: int,
                shuffle_seed: int | None) -> tuple[Any, Any]:
    """A DataLoader and the generator that shuffles it (None for evaluation).

    Training batches group examples of similar length (with randomness, seeded) so little time goes
    into padding; evaluation runs in length order for the same reason (order does not change
    metrics). The shuffling generator is the loader's own, so a checkpoint can record where it was.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = list(ds["length"]) if "length" in ds.column_names else None
    gen = None
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(shuffle_seed)
        sampler: Any = (LengthGroupedSampler(batch_size, lengths=lengths, generator=gen) if lengths
                        else RandomSampler(ds, generator=gen))
    else:
        sampler = sorted(range(len(ds)), key=lengths.__getitem__) if lengths else list(range(len(ds)))
    loader = DataLoader(ds.with_format("torch"), batch_size=batch_size, sampler=sampler, collate_fn=collate)
    return loader, gen


# -- the loop ---------------------------------------------------------------------------------

@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model, unwrapped from accelerate


def torch_param_groups(groups: list[ParamGroup], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Split each strategy group into decayed (matrices) and undecayed (biases, norms) halves:
    decided by tensor shape, so no parameter names are matched."""
    out = []
    for group in groups:
        decay = [p for p in group.params.values() if p.ndim >= 2]
        no_decay = [p for p in group.params.values() if p.ndim < 2]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                base = lr * group.lr_scale
                out.append({"params": params, "weight_decay": wd, "lr": base, "base_lr": base})
    return out


def _scalar_config(run: ResolvedRun) -> dict[str, Any]:
    """The run's settings as flat scalars (what TensorBoard's hyper-parameter view accepts)."""
    out: dict[str, Any] = {}
    for key, value in run.as_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            out[key] = value
        elif isinstance(value, list):
            out[key] = ",".join(map(str, value))
    return out


def _check_distributed(accelerator: Any, cfg: RunConfig) -> None:
    """Refuse the distributed set-ups peftkit cannot run correctly (yet), before any step."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and stage >= 3):
        # the best-epoch snapshot, the test evaluation after restoring it and the adapter are all
        # taken from the main process's model, which under sharding holds only its shard
        raise PeftkitError("sharded parameters (FSDP, DeepSpeed ZeRO-3) are not supported yet: peftkit saves "
                           "the adapter from the main process's copy of the model; use data parallel "
                           "(configs/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2")
    if kind == DistributedType.DEEPSPEED and cfg.checkpoint_every:
        raise PeftkitError("--checkpoint-every is not supported under DeepSpeed: its optimizer state is split "
                           "over the processes, and a checkpoint holds the main process's; use data parallel")


def fit(run: ResolvedRun, model: Any, processor: Any, data: Any, spec: TaskSpec,
        log: Callable[[str], None], workdir: str | None = None, resume_from: str | None = None) -> TrainOutcome:
    """Train ``model`` (already prepared by the strategy), validate each epoch, restore the best
    epoch, evaluate on test. Returns the metrics and the per-epoch history.

    With ``workdir`` and ``checkpoint_every`` the whole training state is written every N optimizer
    steps into ``workdir/checkpoints``; ``resume_from`` (a checkpoint directory) continues from one,
    ending with what an uninterrupted run would have ended with. Under ``accelerate launch`` or
    ``torchrun`` this runs data parallel; ``batch_size`` stays the global batch (split over the
    processes), so results match a one-process run.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt

    cfg, strategy, hp, task = run.config, run.strategy, run.hparams, run.task

    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision;
    # every fit is a run of its own (tests, Python use and benchmarks/overhead.py run several in one
    # process), so its precision state starts afresh. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trackers = list(cfg.report_to) if workdir else []
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accumulation,
        mixed_precision={"fp32": "no"}.get(cfg.levers.precision, cfg.levers.precision),
        # each batch is split over the processes: --batch-size means the same in 1 or N processes.
        # (Through DataLoaderConfiguration: accelerate 1.15 silently ignores split_batches=True.)
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=workdir, logging_dir=os.path.join(workdir, "tensorboard"))
        if trackers else None)
    procs = accelerator.num_processes
    _check_distributed(accelerator, cfg)
    if hp.batch_size % procs:
        raise PeftkitError(f"batch size {hp.batch_size} cannot be split evenly over {procs} processes; "
                           f"choose a multiple of {procs}")
    main = accelerator.is_main_process
    budget = parse_size(cfg.memory_budget) if cfg.memory_budget else None
    apply_budget(accelerator.device, budget)  # before the model moves to the card
    splits = task.encode(data, processor, cfg)
    collate = task.collate(processor)
    eval_batch = -(-cfg.eval_batch_size // procs) * procs  # evaluation batches split evenly too
    train_dl, sampler_gen = make_loader(splits["train"], collate, hp.batch_size, shuffle_seed=cfg.seed)
    val_dl, _ = make_loader(splits["validation"], collate, eval_batch, None)
    test_dl, _ = make_loader(splits["test"], collate, eval_batch, None)

    # frozen weights need no fp32 master copy under mixed precision (levers.store_frozen_in_half)
    store_frozen_in_half(model, strategy.trainable_parameters(model), cfg.levers.precision)
    groups = strategy.param_groups(model)
    if not any(g.params for g in groups):
        raise PeftkitError(f"strategy {strategy.name!r} left no parameter to train on this model")
    if procs > 1:
        trained_now = {n for n, p in model.named_parameters() if p.requires_grad}
        later = set(strategy.trainable_parameters(model)) - trained_now
        if later:
            # DistributedDataParallel fixes the parameters it synchronises when it wraps the model;
            # one unfrozen later would train apart in each process, silently
            raise PeftkitError(f"strategy {strategy.name!r} makes parameters trainable as it trains, which data "
                               f"parallel training cannot follow; run it in one process")
    optimizer = make_optimizer(cfg.levers.optimizer, torch_param_groups(groups, hp.lr, hp.weight_decay), hp.lr)
    # the training loader goes with the model: DeepSpeed takes its micro-batch from the loaders
    # prepared with it, and an evaluation batch must not become it
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    val_dl, test_dl = accelerator.prepare(val_dl, test_dl)
    inner = accelerator.unwrap_model(model)  # what strategies see (no DDP wrapper)
    if trackers:
        accelerator.init_trackers("peftkit", config=_scalar_config(run))
    # Memory is measured per phase from here: "loaded" is the model (and data) in place, before any
    # step; training and evaluation peaks are kept apart because they answer different questions
    # (what training needs vs what serving needs).
    meter = MemoryMeter(accelerator.device)
    meter.release_free()  # loading's temporary buffers are gone; "loaded" is what stays
    memory_loaded = meter.current()
    peaks = {"train": 0, "eval": 0, "train_reserved": 0, "eval_reserved": 0}

    def close_phase(phase: str) -> None:
        peaks[phase] = max(peaks[phase], meter.peak())
        peaks[phase + "_reserved"] = max(peaks[phase + "_reserved"], meter.peak_reserved() or 0)

    def run_eval(loader: Any, final: bool = False) -> dict[str, float]:
        meter.release_free()
        meter.reset_peak()
        out = task.evaluate(strategy, model, loader, accelerator,
                            after_batch=lambda: check_budget(meter, budget, "evaluation", memory_loaded),
                            final=final, context=processor)
        close_phase("eval")
        return out

    steps_per_epoch = math.ceil(len(train_dl) / cfg.grad_accumulation)
    total_steps = steps_per_epoch * hp.epochs
    warmup_steps = int(hp.warmup_ratio * total_steps)

    def count_trainable() -> int:
        return sum(p.numel() for p in inner.parameters() if p.requires_grad)

    def add_groups(new: list[ParamGroup], quiet: bool = False) -> None:
        for g in torch_param_groups(new, hp.lr, hp.weight_decay):
            optimizer.add_param_group(g)
            if not quiet:
                log(f"optimizer: +{sum(p.numel() for p in g['params']):,} parameters at lr {g['base_lr']:.3g}")

    # everything the loop carries from step to step, in one place: it is what a checkpoint saves
    st: dict[str, Any] = {
        "epoch": 0, "batches_done": 0, "step": 0, "train_examples": 0, "train_tokens": 0,
        "train_seconds": 0.0, "eval_seconds": 0.0, "epochs_without_gain": 0,
        "max_trainable": count_trainable(), "history": [], "best_score": None, "best_epoch": None,
        "best_metrics": {}, "smooth_loss": None, "epoch_examples": 0, "epoch_loss": 0.0,
        "epoch_batches": 0, "epoch_tokens": 0, "epoch_elapsed": 0.0, "peaks": peaks,
    }
    best_state: dict[str, Any] = {}
    step_seconds: list[float] = []  # steady-state optimizer steps (not checkpointed: timing only)
    step_tokens: list[int] = []
    pending_rng: Any = None
    sampler_start: Any = None
    if resume_from is not None:
        saved = ckpt.read(resume_from, accelerator.process_index)
        st.update(saved["state"]["loop"])
        peaks.update(st["peaks"])
        st["peaks"] = peaks
        # replay the strategy's events up to the checkpoint, so parameter groups join the optimizer
        # in the same order as they did (gradual unfreezing), before its state is loaded into them
        for epoch in range(st["epoch"] + 1):
            add_groups(strategy.on_epoch_start(inner, epoch), quiet=True)
            for step in range(epoch * steps_per_epoch + 1, min((epoch + 1) * steps_per_epoch, st["step"]) + 1):
                add_groups(strategy.on_step_end(inner, step), quiet=True)
        params = dict(inner.named_parameters())
        params.update(dict(inner.named_buffers()))
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(saved["optimizer"])
        strategy.load_extra_state(inner, saved["extra"])
        best_state = saved["best"]
        pending_rng = saved["rng"]
        sampler_start = pending_rng[0].get("sampler_epoch_start")
        log(f"resumed from {resume_from}: epoch {st['epoch'] + 1}, step {st['step']} of {total_steps}")

    def save_checkpoint(epoch_sampler_state: Any) -> None:
        started = time.perf_counter()
        trained = strategy.trainable_parameters(inner)
        tensors = {n: p for n, p in trained.items()}
        tensors.update({n: b for n, b in inner.named_buffers() if b.is_floating_point()})
        if main:
            ckpt.begin(workdir, st["step"])
        accelerator.wait_for_everyone()  # the directory exists before any process writes into it
        tmp = ckpt.tmp_path(workdir, st["step"])
        ckpt.write_rank(tmp, accelerator.process_index, epoch_sampler_state)
        if main:
            loop = {**st, "epoch_elapsed": time.perf_counter() - epoch_start}
            ckpt.write_main(tmp, tensors, best_state, optimizer.state_dict(), strategy.extra_state(inner),
                            {"loop": loop, "total_steps": total_steps})
        accelerator.wait_for_everyone()
        if main:
            ckpt.commit(tmp)
            log(f"checkpoint at step {st['step']} ({time.perf_counter() - started:.2f} s)")

    bar = tqdm(total=total_steps, initial=st["step"], desc=f"{strategy.name}", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process or None, file=sys.stderr)
    resume_epoch = st["epoch"] if resume_from is not None else None
    for epoch in range(st["epoch"], hp.epochs):
        resuming = epoch == resume_epoch
        if not resuming:
            add_groups(strategy.on_epoch_start(inner, epoch))
            st.update(epoch=epoch, batches_done=0, epoch_examples=0, epoch_loss=0.0, epoch_batches=0,
                      epoch_tokens=0, epoch_elapsed=0.0)
        st["max_trainable"] = max(st["max_trainable"], count_trainable())
        if sampler_gen is not None and resuming and sampler_start is not None:
            sampler_gen.set_state(sampler_start)
        epoch_sampler_state = sampler_gen.get_state() if sampler_gen is not None else None
        model.train()
        meter.release_free()  # what evaluation freed is not training's to count
        meter.reset_peak()
        epoch_start = time.perf_counter() - st["epoch_elapsed"]
        skip = st["batches_done"] if resuming else 0
        # wall time and tokens of each optimizer step after the epoch's first (which pays for the
        # loader's start and, on a GPU, kernel selection): the steady-state step time and speed
        last_mark, last_tokens = None, 0
        for i, batch in enumerate(train_dl):
            if i < skip:  # already trained on before the checkpoint (the order is the same)
                continue
            if pending_rng is not None:  # dropout etc. continue from where the checkpoint was
                ckpt.set_rng_state(*pending_rng)
                pending_rng = None
            with accelerator.accumulate(model):
                logits = strategy.forward(model, batch)
                loss = task.loss(logits, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
                    factor = strategy.lr_factor(st["step"], total_steps, warmup_steps)
                    for g in optimizer.param_groups:
                        g["lr"] = g["base_lr"] * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n = int(batch["labels"].shape[0]) * procs
            st["epoch_examples"] += n
            st["epoch_tokens"] += int(batch["attention_mask"].sum()) * procs if "attention_mask" in batch else 0
            st["epoch_batches"] += 1
            st["batches_done"] = i + 1
            value = loss.item()
            st["epoch_loss"] += value
            st["smooth_loss"] = value if st["smooth_loss"] is None else 0.9 * st["smooth_loss"] + 0.1 * value
            if accelerator.sync_gradients:
                now = time.perf_counter()  # loss.item() above waited for the device: the step is done
                if last_mark is not None:
                    step_seconds.append(now - last_mark)
                    step_tokens.append(st["epoch_tokens"] - last_tokens)
                last_mark, last_tokens = now, st["epoch_tokens"]
                check_budget(meter, budget, f"training at micro-batch {hp.batch_size}", memory_loaded)
                st["step"] += 1
                add_groups(strategy.on_step_end(inner, st["step"]))
                st["max_trainable"] = max(st["max_trainable"], count_trainable())
                rate = st["epoch_examples"] / max(1e-9, time.perf_counter() - epoch_start)
                bar.set_postfix(epoch=epoch + 1, loss=f"{st['smooth_loss']:.4f}", ex_per_s=f"{rate:.0f}")
                bar.update(1)
                if trackers:
                    accelerator.log({"train/loss": value, "train/lr": optimizer.param_groups[0]["lr"]},
                                    step=st["step"])
                if cfg.checkpoint_every and workdir and st["step"] % cfg.checkpoint_every == 0:
                    save_checkpoint(epoch_sampler_state)
        if pending_rng is not None:  # the checkpoint was the epoch's last step
            ckpt.set_rng_state(*pending_rng)
            pending_rng = None
        epoch_seconds = time.perf_counter() - epoch_start
        close_phase("train")
        st["train_seconds"] += epoch_seconds
        st["train_examples"] += st["epoch_examples"]
        st["train_tokens"] += st["epoch_tokens"]

        t0 = time.perf_counter()
        val = run_eval(val_dl)
        st["eval_seconds"] += time.perf_counter() - t0
        # every process saw its share of each batch: the epoch's loss is the mean over all of them
        train_loss = gathered_sum(accelerator, st["epoch_loss"]) / procs / max(1, st["epoch_batches"])
        record = {"epoch": epoch + 1, "train_loss": train_loss,
                  **{f"validation_{k}": v for k, v in val.items()}, "epoch_seconds": epoch_seconds,
                  "examples_per_second": st["epoch_examples"] / max(1e-9, epoch_seconds),
                  "tokens_per_second": st["epoch_tokens"] / max(1e-9, epoch_seconds)}
        st["history"].append(record)
        shown = ", ".join(f"{k} {val[k]:.4f}" for k in task.headline_metrics if k in val)
        line = (f"epoch {epoch + 1}/{hp.epochs}: train loss {record['train_loss']:.4f}, validation {shown} "
                f"({epoch_seconds:.1f} s, {record['examples_per_second']:.0f} examples/s)")
        log(line)
        if trackers:
            accelerator.log({f"validation/{k}": v for k, v in val.items()} | {"train/epoch_loss": record["train_loss"]},
                            step=st["step"])
        if not bar.disable:
            bar.write(line, file=sys.stderr)
        elif accelerator.is_local_main_process:  # no terminal, no bar: still say how training goes
            print(line, file=sys.stderr, flush=True)
        score = task.score(val)
        if st["best_score"] is None or score > st["best_score"]:
            # the adapter state fully describes what was trained, so it is also the best snapshot
            st.update(best_score=score, best_epoch=epoch + 1, best_metrics=val, epochs_without_gain=0)
            best_state = {k: v.detach().clone() for k, v in strategy.adapter_state(inner).items()}
        else:
            st["epochs_without_gain"] += 1
            if cfg.early_stopping_patience and st["epochs_without_gain"] >= cfg.early_stopping_patience:
                log(f"early stopping: no better validation {task.selection_metric} for "
                    f"{st['epochs_without_gain']} epochs")
                break
        st["batches_done"] = 0
    bar.close()

    if st["best_epoch"] != len(st["history"]):
        strategy.load_adapter_state(inner, best_state)
        log(f"restored the best epoch ({st['best_epoch']}, validation {task.selection_metric} "
            f"{st['best_metrics'][task.selection_metric]:.4f})")
    t0 = time.perf_counter()
    test = run_eval(test_dl, final=True)
    st["eval_seconds"] += time.perf_counter() - t0
    log("test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
    if trackers:
        accelerator.log({f"test/{k}": v for k, v in test.items()}, step=st["step"])
        accelerator.end_training()

    device = accelerator.device
    device_name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    total_params = sum(p.numel() for p in inner.parameters())
    train_seconds, max_trainable = st["train_seconds"], st["max_trainable"]
    metrics = {
        "strategy": strategy.name,
        "task": task.name,
        **{f"test_{k}": v for k, v in test.items()},
        **{f"validation_{k}": v for k, v in st["best_metrics"].items()},
        "best_epoch": st["best_epoch"],
        "epochs_run": len(st["history"]),
        "trainable_params": max_trainable,
        "total_params": total_params,
        "trainable_percent": 100.0 * max_trainable / max(1, total_params),
        "train_seconds": train_seconds,
        "eval_seconds": st["eval_seconds"],
        "train_examples": st["train_examples"],
        "samples_per_second": st["train_examples"] / max(1e-9, train_seconds),
        "train_tokens": st["train_tokens"],
        "tokens_per_second": st["train_tokens"] / max(1e-9, train_seconds),  # real tokens, padding not counted
        # the same without each epoch's first step (start-up, kernel selection): what a long run sees
        "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
        "steady_tokens_per_second": sum(step_tokens) / sum(step_seconds) if step_seconds else None,
        "batch_size": hp.batch_size,
        "grad_accumulation": cfg.grad_accumulation,
        "effective_batch_size": hp.batch_size * cfg.grad_accumulation,
        "processes": procs,
        "peak_memory_bytes": peaks["train"],
        "peak_memory_eval_bytes": peaks["eval"],
        "memory_loaded_bytes": memory_loaded,
        "peak_memory_increase_bytes": peaks["train"] - memory_loaded,
        "peak_reserved_bytes": peaks["train_reserved"] if meter.cuda else None,
        "peak_reserved_eval_bytes": peaks["eval_reserved"] if meter.cuda else None,
        "peak_memory_method": meter.method,
        "memory_budget_bytes": budget,
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "precision": cfg.levers.precision,
        "optimizer": cfg.levers.optimizer,
        "quantize": cfg.levers.quantize,
        "gradient_checkpointing": cfg.levers.gradient_checkpointing,
        "resumed": resume_from is not None,
    }
    return TrainOutcome(metrics, st["history"], inner)


def execute_run(run: ResolvedRun, workdir: str, echo: Callable[[str], None],
                resume: bool = False) -> dict[str, Any]:
    """Do a whole run into ``workdir``: load data and model, prepare, fit, save adapter and metrics.

    ``workdir`` is a staging directory; the caller moves it into place only when this returns.
    With ``resume`` the run continues from the newest checkpoint in ``workdir``. Under several
    processes every process calls this; only the main one writes.
    """
    import yaml
    from accelerate import PartialState
    from transformers import set_seed

    from . import checkpoint as ckpt
    from .adapter_io import save_adapter
    from .env import package_versions
    from .data import cap_eval_splits
    from .fingerprint import backbone_digests, fingerprint
    from .levers import prepare_base

    cfg, task = run.config, run.task
    state = PartialState()
    main = state.is_main_process
    say = echo if main else (lambda message: None)
    wall_start = time.perf_counter()
    log_file = open(os.path.join(workdir, "train.log"), "a", encoding="utf-8") if main else None

    def log(message: str) -> None:
        if log_file is not None:
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            log_file.flush()

    try:
        resume_from = ckpt.latest(workdir) if resume else None
        if resume and resume_from is None:
            raise PeftkitError(f"run {cfg.output_dir!r} has no complete checkpoint to resume from")
        resolved = run.as_dict()
        log(f"run: {json.dumps(resolved, default=str)}")
        set_seed(cfg.seed)
        say(f"loading data {cfg.dataset!r} for {task.name} ...")
        data = task.load_data(cfg)
        cap_eval_splits(data, cfg.max_eval_samples, cfg.seed)
        sizes = data.split_info["sizes"]
        log(f"data: {data.split_info['method']}; sizes {sizes}; labels {data.label_names}")
        resolved["split"] = data.split_info
        resolved["label_names"] = data.label_names  # config.yaml records the split actually made
        if main and not resume:
            with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as fh:
                yaml.safe_dump(resolved, fh, sort_keys=False)
        say(f"loading model {cfg.model!r} ...")
        processor = task.load_processor(cfg.model)
        set_seed(cfg.seed)  # the new head's initialisation depends on it
        base = task.load_model(cfg.model, data, processor, cfg.levers.quantize, cfg.levers.precision)
        # a library failing from here on is reported with the model's type (errors.library_error_line)
        set_context(model_type=getattr(getattr(base, "config", None), "model_type", None))
        base_digests = backbone_digests(base)  # before training: what "unchanged" means, and the fingerprint
        base = prepare_base(base, cfg.levers.quantize, cfg.levers.gradient_checkpointing)
        spec = task.spec(base, data)
        model = run.strategy.prepare(base, spec)
        if resume_from:
            say(f"resuming {run.strategy.name} from {os.path.basename(resume_from)} ...")
        else:
            say(f"training {run.strategy.name} for {run.hparams.epochs} epoch(s) on {sizes['train']:,} examples "
                f"(validation {sizes['validation']:,}, test {sizes['test']:,}) ...")
        if cfg.checkpoint_every and not resume_from:
            say(f"checkpoints every {cfg.checkpoint_every} steps; if the run stops, continue it with: "
                f"peftkit run --resume {cfg.output_dir}")
        outcome = fit(run, model, processor, data, spec, log, workdir=workdir, resume_from=resume_from)
        if not main:
            return outcome.metrics
        trained = outcome.model

        versions = package_versions()
        metrics = {
            "strategy": run.strategy.name, "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
            "epochs": run.hparams.epochs, **outcome.metrics,
        }
        recorded = ("test_accuracy", "test_f1_macro", "validation_accuracy", "test_perplexity",
                    "test_exact_match", "trainable_params", "total_params", "epochs", "seed")
        metadata = {
            "strategy": run.strategy.name,
            "strategy_options": options_to_dict(run.strategy.options),
            "base_model": cfg.model,
            "base_fingerprint": fingerprint(base_digests),
            "task": task.name,
            # a quantized base is fingerprinted quantized: loading applies the same quantization
            "base_quantization": cfg.levers.quantize,
            **task.metadata(data, processor, cfg),
            "dataset": cfg.dataset,
            "split": data.split_info,
            "metrics": {k: metrics[k] for k in recorded if k in metrics},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions,
        }
        metrics["adapter_bytes"] = save_adapter(os.path.join(workdir, "adapter"), run.strategy, trained,
                                                metadata, base_digests)
        metrics.update(wall_seconds=time.perf_counter() - wall_start, split=data.split_info,
                       label_names=data.label_names, history=outcome.history, versions=versions)
        write_json(os.path.join(workdir, "metrics.json"), metrics)
        # the checkpoints served their purpose: a finished run ships its adapter, not its optimizer
        import shutil

        shutil.rmtree(os.path.join(workdir, ckpt.CHECKPOINTS), ignore_errors=True)
        return metrics
    finally:
        if log_file is not None:
            log_file.close()
