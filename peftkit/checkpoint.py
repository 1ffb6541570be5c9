"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``checkpoints/step-NNNNNNN`` in the run's staging directory:

    trainable.safetensors   the parameters the strategy trains (+ floating buffers), as now
    best.safetensors        the best epoch's adapter state so far
    optimizer.safetensors   the optimizer's tensors; its other state and groups in state.json
    strategy.safetensors    a strategy's own extra state (head_only's feature cache)
    rng-rankN.safetensors   each process's torch (and CUDA) random state and the sampler's
    rng-rankN.json          each process's Python and NumPy random states and its own loop state
                            (its share of the epoch's loss differs from the main process's)
    state.json              the main process's loop state (position: epoch, batches done, step;
                            counters, history), the optimizer's non-tensor state

Under ``--fsdp`` (several processes, each holding a slice of every parameter) the trained
parameters, the optimizer's tensors and the best epoch's state are instead written by every process,
its own slices, into ``shards/`` (``torch.distributed.checkpoint``, safetensors files; see
``sharding.save_shards``). A checkpoint resumes with as many processes as wrote it (one
``rng-rankN`` file each), and is refused in one line otherwise.

It is written into a temporary directory and renamed into place, and only then is the previous one
removed, so a process killed at any moment (SIGKILL included) leaves one complete checkpoint. Only
safetensors and JSON are read back: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .adapter_io import read_safetensors, write_safetensors
from .errors import PeftkitError
from .files import write_json
from .sharding import SHARDS, load_shards, save_shards, set_sharded_state, sharded_state

if TYPE_CHECKING:  # pragma: no cover
    import torch

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"
_BEST = "best."  # the best epoch's tensors among a sharded checkpoint's


def latest(run_dir: str) -> str | None:
    """The newest complete checkpoint in ``run_dir`` (None if there is none)."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = sorted(
        d for d in os.listdir(root) if d.startswith(_PREFIX) and os.path.exists(os.path.join(root, d, "state.json"))
    )
    return os.path.join(root, done[-1]) if done else None


# -- random states ------------------------------------------------------------------------------


def rng_state(sampler_state: torch.Tensor | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """This process's random states: (tensors, JSON-able)."""
    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    if sampler_state is not None:
        tensors["sampler_epoch_start"] = sampler_state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    plain = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (the sampler's state is the caller's)."""
    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# -- optimizer ---------------------------------------------------------------------------------


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and the rest (for JSON)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer(tensors: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, entries in plain["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": plain["param_groups"]}


# -- writing and reading ------------------------------------------------------------------------


def tmp_path(run_dir: str, step: int) -> str:
    """Where the checkpoint at ``step`` is written before it is renamed into place."""
    return os.path.join(run_dir, CHECKPOINTS, f".tmp-{_PREFIX}{step:07d}")


def begin(run_dir: str, step: int) -> str:
    """A fresh temporary directory for the checkpoint at ``step`` (main process)."""
    os.makedirs(os.path.join(run_dir, CHECKPOINTS), exist_ok=True)
    tmp = tmp_path(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
    os.makedirs(tmp)
    return tmp


def write_rank(tmp: str, rank: int, sampler_state: torch.Tensor | None, loop: dict[str, Any]) -> None:
    """Every process writes its own random states and loop state into the checkpoint being made."""
    tensors, plain = rng_state(sampler_state)
    write_safetensors(tensors, os.path.join(tmp, f"rng-rank{rank}.safetensors"))
    _write_json(os.path.join(tmp, f"rng-rank{rank}.json"), {**plain, "loop": loop})


def write_main(
    tmp: str,
    trainable: dict[str, Any],
    best: dict[str, Any],
    optimizer: dict[str, Any],
    extra: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """The main process writes the model, optimizer and loop state (state.json last: a checkpoint
    without it is incomplete and never read)."""
    write_safetensors(trainable, os.path.join(tmp, "trainable.safetensors"))
    write_safetensors(best, os.path.join(tmp, "best.safetensors"))
    opt_tensors, opt_plain = flatten_optimizer(optimizer)
    write_safetensors(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    write_state(tmp, extra, {**state, "optimizer": opt_plain})


def write_state(tmp: str, extra: dict[str, Any], state: dict[str, Any]) -> None:
    """The strategy's extra state, then state.json, last (main process)."""
    write_safetensors(extra, os.path.join(tmp, "strategy.safetensors"))
    _write_json(os.path.join(tmp, "state.json"), state)


def commit(tmp: str) -> str:
    """Rename the finished checkpoint into place, then drop older ones (main process)."""
    root = os.path.dirname(tmp)
    final = os.path.join(root, os.path.basename(tmp)[len(".tmp-") :])
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if path != final:
            shutil.rmtree(path, ignore_errors=True)
    return final


def writers(path: str) -> int:
    """How many processes wrote the checkpoint at ``path`` (each leaves its random state)."""
    return sum(1 for name in os.listdir(path) if name.startswith("rng-rank") and name.endswith(".json"))


def read(path: str, rank: int, processes: int) -> dict[str, Any]:
    """Everything a checkpoint holds, for process ``rank`` of ``processes``. A sharded checkpoint's
    tensors are not read here: every process loads its slices (``Checkpointer.restore``)."""

    def tensors(name: str) -> dict[str, Any]:
        return read_safetensors(os.path.join(path, name))

    written = writers(path)
    if written != processes:
        # the data order, the random states and (under --fsdp) the slices each process holds
        # all depend on the number of processes: another number would not continue the same run
        raise PeftkitError(
            f"checkpoint {path!r} was written by {written} process{'es' * (written != 1)} and "
            f"this run has {processes}; resume it with {written} (torchrun --nproc-per-node, "
            "accelerate launch --num-processes, or no launcher for 1)"
        )
    with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    with open(os.path.join(path, f"rng-rank{rank}.json"), encoding="utf-8") as fh:
        rng_plain = json.load(fh)
    out = {
        "state": state,
        "extra": tensors("strategy.safetensors"),
        "rng": (tensors(f"rng-rank{rank}.safetensors"), rng_plain),
    }
    if not state.get("sharded"):
        out.update(
            trainable=tensors("trainable.safetensors"),
            best=tensors("best.safetensors"),
            optimizer=unflatten_optimizer(tensors("optimizer.safetensors"), state["optimizer"]),
        )
    return out


def _write_json(path: str, data: Any) -> None:
    write_json(path, data, indent=None)  # optimizer state can be long: no indentation


# -- the checkpointer the training loop uses ------------------------------------------------------


class Checkpointer:
    """Owns a run's checkpoints: saving every ``every`` optimizer steps, restoring one (the
    strategy's events replayed first, so parameter groups rejoin the optimizer in their order),
    and handing back the random states at the moment training continues.

    Works with whatever the loop gives it (an accelerate ``Accelerator``, a strategy, the unwrapped
    model, the optimizer): this module stays below the strategies it serves.
    """

    def __init__(
        self,
        accelerator: Any,
        strategy: Any,
        model: Any,
        optimizer: Any,
        run_dir: str | None,
        every: int | None,
        log: Callable[[str], None],
        sharded: bool = False,
    ) -> None:
        self.accelerator, self.strategy, self.model, self.optimizer = accelerator, strategy, model, optimizer
        self.run_dir, self.every, self.log = run_dir, every, log
        self.sharded = sharded  # --fsdp: every process writes and reads its own slices
        self.pending_rng: tuple[dict[str, Any], dict[str, Any]] | None = None  # set by restore
        self.sampler_start: Any = None  # the sampler's state when the checkpoint's epoch began

    def saved_tensors(self) -> dict[str, Any]:
        """The model's tensors a checkpoint keeps: what the strategy trains, and floating buffers
        (the frozen base is the base model's)."""
        tensors = dict(self.strategy.trainable_parameters(self.model))
        tensors.update({n: b for n, b in self.model.named_buffers() if b.is_floating_point()})
        return tensors

    def due(self, step: int) -> bool:
        """Whether a checkpoint is written after optimizer step ``step``."""
        return bool(self.every and self.run_dir and step % self.every == 0)

    def save(self, step: int, loop: dict[str, Any], best: dict[str, Any], sampler_state: Any, total_steps: int) -> None:
        """Write the checkpoint at ``step`` (every process calls this; each writes its random state)."""
        started = time.perf_counter()
        main = self.accelerator.is_main_process
        tensors = self.saved_tensors()
        if main:
            begin(self.run_dir, step)
        self.accelerator.wait_for_everyone()  # the directory exists before any process writes into it
        tmp = tmp_path(self.run_dir, step)
        write_rank(tmp, self.accelerator.process_index, sampler_state, loop)
        state = {"loop": loop, "total_steps": total_steps}
        if self.sharded:
            shards, optimizer = sharded_state(self.model, self.optimizer, set(tensors))
            save_shards(os.path.join(tmp, SHARDS), {**shards, **{_BEST + k: v for k, v in best.items()}})
            if main:
                write_state(
                    tmp,
                    self.strategy.extra_state(self.model),
                    {**state, "sharded": True, "best_keys": sorted(best), "optimizer": optimizer},
                )
        elif main:
            write_main(tmp, tensors, best, self.optimizer.state_dict(), self.strategy.extra_state(self.model), state)
        self.accelerator.wait_for_everyone()
        if main:
            commit(tmp)
            self.log(f"checkpoint at step {step} ({time.perf_counter() - started:.2f} s)")

    def restore(
        self, path: str, steps_per_epoch: int, add_groups: Callable[[list[Any]], None]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load the checkpoint at ``path`` into the model, optimizer and strategy; returns the loop
        state it saved and the best epoch's adapter state. The random states wait in
        ``pending_rng`` until ``continue_rng`` (the first batch trained after the checkpoint)."""
        import torch

        saved = read(path, self.accelerator.process_index, self.accelerator.num_processes)
        # this process's own loop state (its share of the epoch's loss); a checkpoint from before
        # each process wrote one has the main process's only
        loop = saved["rng"][1].get("loop") or saved["state"]["loop"]
        if bool(saved["state"].get("sharded")) != self.sharded:  # the run's config.yaml decides both
            raise PeftkitError(
                f"checkpoint {path!r} was written {'with' if not self.sharded else 'without'} "
                f"--fsdp and this run is {'not ' * (not self.sharded)}sharded; resume it as it ran"
            )
        self.replay(loop["epoch"], loop["step"], steps_per_epoch, add_groups)
        if self.sharded:
            best = self.restore_shards(path, saved["state"])
        else:
            params = dict(self.model.named_parameters())
            params.update(dict(self.model.named_buffers()))
            with torch.no_grad():
                for name, value in saved["trainable"].items():
                    params[name].copy_(value.to(params[name].device, params[name].dtype))
            self.optimizer.load_state_dict(saved["optimizer"])
            best = saved["best"]
        self.strategy.load_extra_state(self.model, saved["extra"])
        self.pending_rng = saved["rng"]
        self.sampler_start = self.pending_rng[0].get("sampler_epoch_start")
        return loop, best

    def restore_shards(self, path: str, state: dict[str, Any]) -> dict[str, Any]:
        """Every process loads its slices of a sharded checkpoint into the model and optimizer;
        returns the best epoch's state (this process's slices)."""
        targets, _ = sharded_state(self.model, self.optimizer, set(self.saved_tensors()))
        # the best epoch's tensors are loaded into copies shaped (and sliced) as the model's
        # own, never into the parameters themselves
        best = {
            k: v.detach().clone() for k, v in self.strategy.adapter_state(self.model).items() if k in state["best_keys"]
        }
        targets.update({_BEST + k: v for k, v in best.items()})
        load_shards(os.path.join(path, SHARDS), targets)
        set_sharded_state(self.model, self.optimizer, targets, state["optimizer"])
        return {k: targets[_BEST + k] for k in best}

    def replay(self, epoch: int, step: int, steps_per_epoch: int, add_groups: Callable[[list[Any]], None]) -> None:
        """The strategy's events up to (epoch, step), in the order training raised them, so the
        parameter groups they add (gradual unfreezing) join the optimizer before its state loads."""
        for e in range(epoch + 1):
            add_groups(self.strategy.on_epoch_start(self.model, e))
            for s in range(e * steps_per_epoch + 1, min((e + 1) * steps_per_epoch, step) + 1):
                add_groups(self.strategy.on_step_end(self.model, s))

    def continue_rng(self) -> None:
        """Dropout and the like continue from where the checkpoint was (once, after a restore)."""
        if self.pending_rng is not None:
            set_rng_state(*self.pending_rng)
            self.pending_rng = None
