"""What the loop sets up before its first step: the data loaders, the optimizer's parameter groups,
the accelerator, and the refusals of set-ups it cannot run correctly (distributed kinds, parameter
groups data parallel training could not follow)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..config import RunConfig
from ..errors import PeftkitError
from ..sharding import check_fsdp
from ..strategies.base import ParamGroup, Strategy


def make_loader(
    ds: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], batch_size: int, shuffle_seed: int | None
) -> tuple[Any, Any]:
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
        sampler: Any = (
            LengthGroupedSampler(batch_size, lengths=lengths, generator=gen)
            if lengths
            else RandomSampler(ds, generator=gen)
        )
    else:
        sampler = sorted(range(len(ds)), key=lengths.__getitem__) if lengths else list(range(len(ds)))
    loader = DataLoader(ds.with_format("torch"), batch_size=batch_size, sampler=sampler, collate_fn=collate)
    return loader, gen


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


def make_accelerator(cfg: RunConfig, workdir: str | None) -> tuple[Any, list[str]]:
    """A fresh ``Accelerator`` for one run, and the trackers it reports to."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

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
        if trackers
        else None,
    )
    return accelerator, trackers


def check_distributed(accelerator: Any, cfg: RunConfig, batch_size: int) -> None:
    """Refuse the distributed set-ups peftkit cannot run correctly (yet), before any step."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and stage >= 3):
        # peftkit shards with --fsdp itself (peftkit.sharding): accelerate's FSDP (GPU only) and
        # ZeRO-3 would take the snapshot and the adapter from the main process's shard
        raise PeftkitError(
            "accelerate's FSDP and DeepSpeed ZeRO-3 configs are not supported: launch with a data "
            "parallel config (configs/accelerate/multi_gpu.yaml) or torchrun and add --fsdp "
            "(or use DeepSpeed ZeRO-2)"
        )
    if kind == DistributedType.DEEPSPEED and cfg.checkpoint_every:
        raise PeftkitError(
            "--checkpoint-every is not supported under DeepSpeed: its optimizer state is split "
            "over the processes, and a checkpoint holds the main process's; use data parallel"
        )
    procs = accelerator.num_processes
    if cfg.fsdp and procs > 1:
        check_fsdp(cfg.levers.quantize)
    if cfg.levers.compile and cfg.fsdp and procs > 1:
        raise PeftkitError(
            "--compile with --fsdp is not tested here (FSDP2 with torch.compile needs its own "
            "set-up): drop --compile, or run data parallel"
        )
    if cfg.levers.packing and procs > 1:
        # a packed batch holds a varying number of examples, which accelerate cannot split evenly
        raise PeftkitError(
            f"--packing runs in one process for now ({procs} were started): drop --packing, or run in one process"
        )
    if batch_size % procs:
        raise PeftkitError(
            f"batch size {batch_size} cannot be split evenly over {procs} processes; choose a multiple of {procs}"
        )


def trainable_groups(strategy: Strategy, model: Any, procs: int) -> list[ParamGroup]:
    """The strategy's parameter groups, refused when there is nothing to train or when data
    parallel training could not follow them."""
    groups = strategy.param_groups(model)
    if not any(g.params for g in groups):
        raise PeftkitError(f"strategy {strategy.name!r} left no parameter to train on this model")
    if procs > 1:
        trained_now = {n for n, p in model.named_parameters() if p.requires_grad}
        later = set(strategy.trainable_parameters(model)) - trained_now
        if later:
            # DistributedDataParallel fixes the parameters it synchronises when it wraps the model;
            # one unfrozen later would train apart in each process, silently
            raise PeftkitError(
                f"strategy {strategy.name!r} makes parameters trainable as it trains, which data "
                f"parallel training cannot follow; run it in one process"
            )
    return groups
