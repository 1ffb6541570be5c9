"""Measuring memory honestly, per phase, and holding a run to a memory budget.

On CUDA the numbers are the caching allocator's: ``max_memory_allocated`` (what tensors needed at
the peak) and ``max_memory_reserved`` (what the allocator held from the driver, the figure an
out-of-memory error is about), with the peak reset between phases. A budget is enforced by
``torch.cuda.set_per_process_memory_fraction``, so a run over it fails with the allocator's own
out-of-memory error, exactly as it would on a smaller card.

On CPU the number is the process's resident set: its high-water mark (``VmHWM`` in
``/proc/self/status``) reset between phases by writing ``5`` to ``/proc/self/clear_refs`` (Linux
4.0+). It counts everything the process holds (Python, libraries, model, data, activations), which
is what a machine's RAM has to hold. Where the reset is not available (macOS) the peak is
``getrusage``'s, over the whole process lifetime, and the method string says so. A budget on CPU is
checked after every step: a run whose peak goes over it stops with ``MemoryBudgetExceeded``.
"""

from __future__ import annotations

import functools
import gc
import re
import resource
import sys
import time
from typing import Any

from .errors import PeftkitError
from .structure import transformer_blocks

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class MemoryBudgetExceeded(PeftkitError):
    """A run's measured peak went over its memory budget (the CPU analogue of CUDA out-of-memory)."""


def parse_size(text: str | int | float) -> int:
    """``"4GiB"`` -> 4294967296, ``"500MB"`` -> 500000000, ``"1.5G"`` -> 1500000000 bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise PeftkitError(
                f"memory size {text!r} is not understood; use a number with a unit such as "
                "512MiB, 4GiB, 8GB or 1.5G (KiB/MiB/GiB/TiB are powers of 2, KB/MB/GB/TB of 10)"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise PeftkitError(f"memory size must be positive, got {text!r}")
    return size


def format_size(n: float | None) -> str:
    """Bytes as a short human figure in powers of two (``1.23 GiB``)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


class MemoryMeter:
    """Current and peak memory of one device, with a peak that can be reset between phases."""

    def __init__(self, device: Any, lean: bool = False, heap_trims: HeapTrimsBetweenBlocks | None = None) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.resettable = True if self.cuda else _can_reset_cpu_peak()
        # a lean CPU run (one with a memory budget, ``env.lean_host_memory``) returns the heap's free
        # pages between transformer blocks (``heap_trims``) and every HEAP_TRIM_EVERY steps
        self.lean = lean and not self.cuda
        self.heap_trims = heap_trims

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated (reserved reported beside it), peak reset per phase"
        how = (
            "process peak resident set (VmHWM), reset per phase via /proc/self/clear_refs"
            if self.resettable
            else "process peak resident set over its whole life (getrusage ru_maxrss; no per-phase reset here)"
        )
        if self.lean:  # what the peak is of: a run that returned its free memory to the system
            between = (
                f"every {self.heap_trims.every_bytes >> 20} MiB of transformer-block outputs, forward and "
                "backward, and "
                if self.heap_trims is not None
                else ""
            )
            how += f"; free heap pages returned to the system {between}every {HEAP_TRIM_EVERY} steps (--memory-budget)"
        return how

    def current(self) -> int:
        """Bytes in use now: allocated tensors on CUDA, resident set on CPU."""
        if self.cuda:
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        kib = _proc_status_kib("VmRSS")
        return kib * 1024 if kib is not None else self._ru_maxrss()

    def release_free(self) -> None:
        """CPU: hand freed heap back to the system first, so the resident set counts live memory
        (``release_free_memory``). CUDA: nothing to do; the allocator's counts are exact."""
        if not self.cuda:
            release_free_memory()

    def return_heap_holes(self, step: int) -> None:
        """A lean CPU run, every ``HEAP_TRIM_EVERY`` optimizer steps: the heap's free pages back to
        the system (``return_heap_holes``). Otherwise (CUDA, a CPU run without a budget, which keeps
        them for its next steps) nothing."""
        if self.lean and step % HEAP_TRIM_EVERY == 0:
            return_heap_holes()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")

    def peak(self) -> int:
        """Peak bytes since the last ``reset_peak``."""
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        kib = _proc_status_kib("VmHWM") if self.resettable else None
        return kib * 1024 if kib is not None else self._ru_maxrss()

    def peak_reserved(self) -> int | None:
        """CUDA only: the allocator's peak reserved bytes since the last reset."""
        if not self.cuda:
            return None
        import torch

        return int(torch.cuda.max_memory_reserved(self.device))

    @staticmethod
    def _ru_maxrss() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def release_free_memory() -> None:
    """Give memory the process freed back to the system (glibc keeps freed heap for reuse, so the
    resident set of a CPU run would otherwise stay at its highest point forever: evaluation's larger
    batches would then count against training, and the planner's deltas would hide reused memory)."""
    gc.collect()
    return_heap_holes()


# A lean CPU run (one with a memory budget: ``env.lean_host_memory``) returns its heap's free pages
# every this many optimizer steps (``return_heap_holes``).
# Over an epoch of MiniLM batches of varied length (the embedded default's lora run, 319 steps), the
# holes freed activations leave on glibc's heap kept growing the resident peak: 1.56 GiB without, 1.37
# GiB returned every 10 steps (25: 1.39, 50: 1.42), for 1.2 s of malloc_trim in 116 s of training
# and the returned pages faulted in again: 10-step windows of MiniLM batches alternately with and
# without a trim, 1.047 [1.004, 1.091] the time (16 pairs). The planner measures up to 12 steps with
# no trim between them (``planner.measure.MAX_STEPS``): 10 keeps a run's creep inside what it sees
# (the bench's plan errors went from -15..-18% to -10..+8%).
HEAP_TRIM_EVERY = 10


def return_heap_holes() -> None:
    """Hand the free pages of glibc's heap back to the system (``malloc_trim(0)``: the holes that
    freed tensors left between live ones, which otherwise stay resident); no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``: milliseconds), or
    None where there is none."""
    import ctypes  # not at the top: 3 ms more on `import peftkit` (tests/test_imports.py)
    import ctypes.util

    libc_name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        return ctypes.CDLL(libc_name).malloc_trim if libc_name else None
    except (OSError, AttributeError):
        return None


# A lean CPU run's training step (one with a memory budget) returns the heap's free pages to the
# system (``return_heap_holes``) each time its transformer blocks have put out this many bytes of
# hidden states since the last return, on the way forward and again on the way back
# (``HeapTrimsBetweenBlocks``). Why: a block frees temporaries several times the size of its output;
# glibc keeps the holes they leave resident, and a step's peak counted them all. On vs_trainer.py's
# jobs (SmolLM2-135M LoRA, fp32, 2-core AMD EPYC), training peak without / with these trims:
# a (8 x 512 tokens, 9 MiB a block's output, every 5 blocks) 6.09 / 4.36 GiB; every 3 blocks 4.25,
# every 10 4.65, every 15 5.03, once a pass 6.03; every 5 forward only 4.79; b (8 x 312) 4.44 / 3.50.
# Until 2026-12-08 such runs instead had glibc return every freed block of 4 MiB or more at once
# (``mallopt(M_MMAP_THRESHOLD)``): a 4.63 GiB, b 3.63 GiB, for 3 million more page faults a step of a
# where the trims take 1.7 million (and 12 trims of 20-80 ms).
TRIM_EVERY_BYTES = 45 * 2**20


class HeapTrimsBetweenBlocks:
    """CPU training: hand the heap's free pages back to the system between transformer blocks, each
    time ``TRIM_EVERY_BYTES`` of block outputs have gone by, forward (a forward hook on each block)
    and backward (a hook on the gradient of that block's output). Only while a block trains with
    gradients flowing through it (not in evaluation or generation, nor through a frozen backbone,
    which saves nothing); a block output is the first tensor it returns. ``remove()`` takes the
    hooks off the model. ``count`` and ``seconds``: the trims made and the time they took."""

    def __init__(self, blocks: list[Any], every_bytes: int) -> None:
        self.every_bytes = every_bytes
        self.forward_bytes = 0  # block outputs since the last trim on the way forward
        self.count = 0
        self.seconds = 0.0
        self.handles = [block.register_forward_hook(self._after_block) for block in blocks]

    def _after_block(self, module: Any, args: Any, output: Any) -> None:
        import torch

        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not (module.training and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor)):
            return
        if not hidden.requires_grad:
            return
        self.forward_bytes += hidden.nbytes
        if self.forward_bytes >= self.every_bytes:
            self.forward_bytes = 0
            self.trim()
            # its gradient is the first thing backward computes for the blocks before it: the holes
            # the later blocks' backward left go before theirs make more
            hidden.register_hook(self._in_backward)

    def _in_backward(self, grad: Any) -> None:
        self.trim()

    def trim(self) -> None:
        started = time.perf_counter()
        return_heap_holes()
        self.seconds += time.perf_counter() - started
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def trim_heap_between_blocks(model: Any, device: Any) -> HeapTrimsBetweenBlocks | None:
    """``HeapTrimsBetweenBlocks`` on ``model``'s transformer blocks (``structure.transformer_blocks``)
    for a CPU run where glibc can return memory; None elsewhere (CUDA's caching allocator keeps its
    own blocks; a model without such blocks). The loop calls it for lean runs (``env.lean_host_memory``)."""
    if getattr(device, "type", str(device)) != "cpu" or _malloc_trim() is None:
        return None
    found = transformer_blocks(model)
    return HeapTrimsBetweenBlocks(found[1], TRIM_EVERY_BYTES) if found else None


def apply_budget(device: Any, budget: int | None) -> None:
    """On CUDA, cap this process's share of the card at ``budget`` bytes (no-op on CPU, where the
    budget is checked against measurements instead)."""
    if budget is None or getattr(device, "type", str(device)) != "cuda":
        return
    import torch

    # accelerate's device is "cuda" without an index; the allocator's cap wants the card's number
    index = device.index if getattr(device, "index", None) is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if budget > total:
        raise PeftkitError(f"memory budget {format_size(budget)} is more than the card has ({format_size(total)})")
    torch.cuda.set_per_process_memory_fraction(budget / total, index)


def check_budget(meter: MemoryMeter, budget: int | None, where: str, loaded: int | None = None) -> None:
    """Raise ``MemoryBudgetExceeded`` if the measured peak is over ``budget``. ``loaded`` (the
    memory in use before training) is named in the message, since no smaller batch can help when
    it alone is over the budget."""
    if budget is None:
        return
    peak = meter.peak_reserved() if meter.cuda else meter.peak()
    if peak is not None and peak > budget:
        alone = f"; the loaded model alone takes {format_size(loaded)}" if loaded is not None else ""
        raise MemoryBudgetExceeded(
            f"peak memory {format_size(peak)} went over the budget {format_size(budget)} during {where}{alone}"
        )


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's out-of-memory error and for a budget overrun on CPU."""
    if isinstance(exc, MemoryBudgetExceeded):
        return True
    if "torch" in sys.modules:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
