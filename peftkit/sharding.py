"""Fully sharded data parallel (FSDP2, PyTorch's ``fully_shard``) for ``peftkit run --fsdp``.

Under several processes each transformer block (found by structure, ``structure.transformer_blocks``)
is sharded, then the root: every process holds a 1/N slice of every parameter, its gradient and
its optimizer state, and gathers a block's whole parameters only while that block computes. Frozen
and trainable parameters may share a block (LoRA's matrices beside the frozen weights): FSDP2 shards
each parameter on its own, so a mixed block is sharded as any other.

Driven here directly, not through accelerate: accelerate 1.15 applies FSDP only on GPUs and on a
CPU machine silently falls back to plain data parallel, while ``fully_shard`` runs on a CPU with
gloo, which is what lets the test suite check it (two processes against one).

What reads whole tensors gets them gathered: the adapter is saved from an unsharded copy of the
prepared model on the main process (``gather_full_model``), so its files are laid out exactly as a
one-process run's. The best-epoch snapshot stays sharded: each process keeps and restores its
own slices. So do checkpoints: every process writes its own slices of the trained parameters, the
optimizer state and the best-epoch snapshot with ``torch.distributed.checkpoint`` (``save_shards``)
in safetensors files (its Hugging Face storage: no pickle on the way back, unlike DCP's default
format, whose metadata file is a pickle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import PeftkitError
from .structure import transformer_blocks

SHARDS = "shards"  # the directory of a checkpoint that holds the processes' slices
_MODEL, _OPTIMIZER = "model.", "optimizer."  # key prefixes in the shards


def shard_model(model: Any, device: Any) -> list[str]:
    """``fully_shard`` each transformer block of ``model``, then ``model`` itself, over all the
    processes of the default process group (one mesh dimension). Returns the blocks' names, for
    the log. The model's parameters are replaced by sharded ones: build the optimizer after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    found = transformer_blocks(model)
    names: list[str] = []
    if found is not None:
        prefix, blocks = found
        for i, block in enumerate(blocks):
            fully_shard(block, mesh=mesh)
            names.append(f"{prefix}.{i}")
    fully_shard(model, mesh=mesh)
    return names


def check_shardable(strategy: str, not_sharded: str | None) -> None:
    """Refuse, in one line, a strategy that says why it cannot be sharded (``Strategy.not_sharded``:
    every built-in one can; a plugin may not)."""
    if not_sharded:
        raise PeftkitError(f"strategy {strategy!r} cannot train with --fsdp: {not_sharded}")


def check_fsdp(quantize: str | None) -> None:
    """Refuse, in one line, what peftkit cannot run sharded (yet)."""
    if quantize:
        raise PeftkitError(
            f"--fsdp with --quantize {quantize} is not supported: bitsandbytes weights are not "
            "sharded here; use --quantize with data parallel (no --fsdp)"
        )


def reshard(model: Any) -> None:
    """Put every sharded module of ``model`` back to its shards. FSDP2 leaves the root's own
    parameters (embeddings, the head) gathered after a forward pass, so that backward finds them
    ready; then ``model.parameters()`` yields those gathered copies, and a value copied into one
    (restoring the best epoch) would be dropped at the next reshard instead of reaching the shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_full_model(model: Any, rebuild: Callable[[], Any], is_main: bool) -> Any:
    """On every process (a collective): ``model``'s whole state, gathered. On the main process it is
    loaded into ``rebuild()`` (a fresh, unsharded copy of the prepared model) and that copy is
    returned; elsewhere ``model`` is returned as it is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return model
    plain = rebuild()
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if missing or unexpected:  # the copy is prepared as the sharded model was: any difference is a bug
        raise PeftkitError(
            f"the gathered model does not fit its unsharded copy (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return plain


# -- sharded checkpoints ------------------------------------------------------------------------


def sharded_state(model: Any, optimizer: Any, names: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a checkpoint keeps of a sharded run, as this process holds it: the model's tensors in
    ``names`` (the trained parameters and floating buffers; the frozen base is the base model's)
    and the optimizer's state, keyed by name (slices: DTensors), plus the optimizer's non-tensor
    state (its groups, any scalar) for JSON. A collective: every process calls it. An optimizer that
    has not stepped yet gets its state made (zeros), so that a load has tensors to fill."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    reshard(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {_MODEL + k: v for k, v in model_state.items() if k in names}
    plain: dict[str, Any] = {"param_groups": optim_state["param_groups"], "scalars": {}}
    for param, entry in optim_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIMIZER}{param}.{key}"] = value
            else:
                plain["scalars"].setdefault(param, {})[key] = value
    return tensors, plain


def set_sharded_state(model: Any, optimizer: Any, tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    """Put what ``sharded_state`` returned (after ``load_shards`` filled it) back into ``model``
    and ``optimizer``; other tensors in ``tensors`` are ignored."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    state: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(_OPTIMIZER):
            param, key = name[len(_OPTIMIZER) :].rsplit(".", 1)
            state.setdefault(param, {})[key] = value
    for param, entries in plain["scalars"].items():
        state.setdefault(param, {}).update(entries)
    reshard(model)
    # not strict: the frozen base is not in a checkpoint
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict={"state": state, "param_groups": plain["param_groups"]},
        options=StateDictOptions(strict=False),
    )


def save_shards(path: str, tensors: dict[str, Any]) -> None:
    """Every process writes its slices of ``tensors`` into the directory ``path`` (a collective):
    one safetensors file per process, each slice's place in the whole tensor in its metadata.
    A tensor every process holds whole (a step count) is written once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True))


def load_shards(path: str, targets: dict[str, Any]) -> None:
    """Fill ``targets`` (this process's slices, as ``sharded_state`` makes them) in place from the
    shards ``save_shards`` wrote into ``path`` (a collective). Only safetensors files are read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(path))
    except Exception as exc:  # DCP's own errors are long, multi-process reports: one line instead
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftkitError(f"cannot read the sharded checkpoint in {path!r}: {first}") from exc
