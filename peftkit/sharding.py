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
own slices.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import PeftkitError


def shard_model(model: Any, device: Any) -> list[str]:
    """``fully_shard`` each transformer block of ``model``, then ``model`` itself, over all the
    processes of the default process group (one mesh dimension). Returns the blocks' names, for
    the log. The model's parameters are replaced by sharded ones: build the optimizer after."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .structure import transformer_blocks

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


def check_fsdp(quantize: str | None, checkpoint_every: int | None) -> None:
    """Refuse, in one line, what peftkit cannot run sharded (yet)."""
    if quantize:
        raise PeftkitError(f"--fsdp with --quantize {quantize} is not supported: bitsandbytes weights are not "
                           "sharded here; use --quantize with data parallel (no --fsdp)")
    if checkpoint_every:
        raise PeftkitError("--fsdp with --checkpoint-every is not supported yet: checkpoints are written from the "
                           "main process's copy of the model, which holds only its shard; drop one of them")


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
        raise PeftkitError(f"the gathered model does not fit its unsharded copy (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return plain
