"""What a bug report needs: package versions, the machine and device, and whether the installed
versions are the locked ones (``peftkit env``).

The same version table (``package_versions``) goes into every run's ``metrics.json``, every
adapter's metadata and a benchmark's ``results.json``, so a figure can always be traced to the
versions that produced it. Only ``device_info`` imports torch; the rest reads package metadata,
which takes milliseconds.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import re
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .deferred_compile import defer_compile_while_importing
from .memory import format_size

# What a result depends on, in the order a report shows it. tokenizers and numpy are not direct
# dependencies, but a tokenizer or numeric change shifts results as surely as a transformers one.
REPORTED_PACKAGES = (
    "peftkit",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
    "bitsandbytes",
    "tokenizers",
    "numpy",
)
NOT_INSTALLED = "not installed"
LOCK_FILE = "requirements.lock"
# the lock sits in the repository root, one level above this package (an editable or source install)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OncePerMessage:
    """A ``logging`` filter that lets each distinct message through once per process."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


LOGGER = "peftkit"
"""The logger library code says its progress through (``logging.getLogger(LOGGER)``, level INFO):
a Python user's logging configuration decides where it goes; peftkit's own processes (the command
line, its workers) print it on stderr (``log_to_stderr``)."""


def to_log(message: str) -> None:
    """The library API's default ``echo``: the ``peftkit`` logger at INFO, where the training loop's
    lines go too; your logging configuration decides what shows (``logging.basicConfig(level=logging.INFO)``)."""
    logging.getLogger(LOGGER).info(message)


class StderrLines(logging.Handler):
    """Each record's message alone on stderr, as the command line has always printed its progress:
    above the progress bar when one is drawn (``tqdm.write``, so the bar is not torn), flushed.
    ``sys.stderr`` is looked up per line: whatever stands there then (a test's capture) gets it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            tqdm = sys.modules.get("tqdm")  # imported by whoever draws a bar; none drawn without it
            if tqdm is not None:
                tqdm.tqdm.write(line, file=sys.stderr)
            else:
                sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: a handler never raises
            self.handleError(record)


def log_to_stderr() -> None:
    """Print the ``peftkit`` logger's progress lines on stderr (``StderrLines``), once per process,
    and not also through the root logger's handlers. Only in peftkit's own processes
    (``own_process``): in a user's, their logging configuration decides."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, StderrLines) for h in logger.handlers):
        logger.addHandler(StderrLines())
    logger.setLevel(logging.INFO)
    logger.propagate = False


def quiet_libraries_in_own_process() -> None:
    """``quiet_libraries`` in peftkit's own processes (``own_process``); nothing in a user's Python
    session, whose logging and warning settings are theirs (as ``freeze_imported_objects``). What the
    library API calls where it is about to import transformers and datasets."""
    if _own_process:
        quiet_libraries()


def quiet_libraries() -> None:
    """Silence library chatter that is not for our users (load reports, per-map progress bars):
    process-wide settings, so only for peftkit's own processes (``quiet_libraries_in_own_process``).

    Called once the process is about to import them; importing datasets and transformers is what
    makes it slow, so never at import time.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_import_noise()
    # bitsandbytes' 8-bit matmul logs "inputs will be cast from torch.bfloat16 to float16" on every
    # call: 140 lines a step on a 20-block Llama under bf16 (3,640 in one 24-step run of the GPU
    # suite). True and worth knowing once, noise after that.
    matmul_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, OncePerMessage) for f in matmul_logger.filters):
        matmul_logger.addFilter(OncePerMessage())
    # datasets' "Parameter 'indices'=[0, 1, ... 12,752 numbers] couldn't be hashed properly" (issue
    # 15: printed when a Ctrl-C hit its hashing): a random cache key is all it means, nothing to act on
    logging.getLogger("datasets.fingerprint").setLevel(logging.ERROR)
    # huggingface_hub logs a line per retry of a failing request; the error that follows says it all
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # FutureWarnings are not silenced wholesale: each one is fixed or filtered where it is raised
    # (strategies/lora.py), so a new deprecation in our own use of a library still shows.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars: ours is the one that matters


_frozen = False
_own_process = False  # set by own_process(): the command line's process, a bench or tune worker


def _quiet_import_noise() -> None:
    """What a library says when it is merely imported, silenced before anything imports it (the
    command line checks a ``peft:NAME`` strategy, which imports peft, before ``quiet_libraries``):
    bitsandbytes (imported by peft) warns on CPUs with AVX512-BF16 that an optional kernel package is
    missing; the fallback it uses works, and the message only alarms users. Imports nothing."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")


def own_process() -> None:
    """Say that this process is peftkit's own (the command line, a bench or tune worker), not a
    user's Python session that imported peftkit: process-wide settings are then ours to make
    (``freeze_imported_objects``; ``quiet_libraries``; progress printed on stderr, ``log_to_stderr``;
    bitsandbytes imported with ``torch.compile`` deferred, ``deferred_compile``)."""
    global _own_process
    log_to_stderr()
    _quiet_import_noise()
    if not _own_process:
        defer_compile_while_importing()
    _own_process = True


def lean_host_memory(device: Any, budget: int | None) -> bool:
    """Whether a run fits before it is fast: a CPU run with a memory budget (``--memory-budget``).
    Its training steps then hand the heap's free pages back to the system between transformer
    blocks (``memory.trim_heap_between_blocks``) and every ``memory.HEAP_TRIM_EVERY`` steps, so its
    peak is its live memory, the peak ``peftkit plan`` predicts.

    Why only then: the pages returned are faulted in again when the next blocks need them. On
    SmolLM2-135M LoRA at 8 x 512 tokens (2-core EPYC) that lowers the training peak from 6.1 to
    4.4 GiB for 1.7 million more page faults a 22-second step: cheap in one process, but in this
    virtual machine 1.2-1.4x the step when another process runs between the steps
    (``benchmarks/refault.py``, benchmarks/README.md). A run without a budget wants speed."""
    return budget is not None and getattr(device, "type", str(device)) == "cpu"


def freeze_imported_objects() -> None:
    """Once per process, and only in peftkit's own (``own_process``), before a training run loads
    its data and model: make the libraries' imports (peft and accelerate too), then move every
    object alive (the modules, classes and functions they made: about 500,000 with torch,
    transformers, datasets and peft) out of the garbage collector's sight (``gc.freeze``). In a
    user's session (the Python API) their objects would be frozen too, so it is left alone there.

    Every phase of a run starts with a full collection (``memory.release_free_memory``, so the
    resident set counts live memory), and each one walked all of them: 0.23 s a collection on a
    2-core EPYC, 1.6 s of a 2-second run of a tiny model, and half a second per epoch of
    ``head_only``'s cheap cached epochs. Frozen objects are still freed when nothing refers to
    them; only a reference cycle among them would stay, and imports make none worth collecting.
    Garbage is collected first, so none of it is frozen."""
    global _frozen
    if _frozen or not _own_process:
        return

    import accelerate  # noqa: F401  (every run imports them; their objects are frozen with the rest)
    import peft  # noqa: F401

    gc.collect()
    gc.freeze()
    _frozen = True


def package_versions(packages: tuple[str, ...] = REPORTED_PACKAGES) -> dict[str, str]:
    """``{"python": ..., package: version}`` for each of ``packages`` ("not installed" if absent).

    The one version table of the project: metrics.json, adapter metadata and bench results.
    """
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = NOT_INSTALLED
    return out


def normalize_name(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Scikit_Learn`` -> ``scikit-learn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find_lock(path: str | None = None) -> str | None:
    """The lock file to compare with: ``path`` if given, else ``$PEFTKIT_LOCK``, else the
    repository's ``requirements.lock`` when peftkit runs from a checkout; None when there is none
    (peftkit installed as a package, without its repository)."""
    candidate = path or os.environ.get("PEFTKIT_LOCK") or os.path.join(_REPO_ROOT, LOCK_FILE)
    return candidate if os.path.isfile(candidate) else None


def read_lock(path: str) -> dict[str, str]:
    """The ``name==version`` pins of a requirements-style lock, by normalized name.

    Comments, options (``--find-links ...``) and ``via`` annotations are skipped; environment
    markers (``; python_version ...``) are dropped from the version.
    """
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*([^\s;\\]+)", line)
            if match:
                pins[normalize_name(match.group(1))] = match.group(2)
    return pins


def _same_version(installed: str, locked: str) -> bool:
    """Whether ``installed`` is the locked release, as pip's ``name==locked`` decides it: "1.0" and
    "1.0.0" are the same release, and a build label ("2.13.0+cpu", "2.13.0+cu126") is the build
    install.sh chose for this machine, not another version; a pin that names a build
    ("2.13.0+cpu") matches only that build."""
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(f"=={locked}").contains(installed, prereleases=True)
    except Exception:  # noqa: BLE001 - packaging missing or a non-PEP 440 string: compare the text
        return installed == locked


def lock_status(versions: dict[str, str], locked: dict[str, str] | None) -> dict[str, str]:
    """For each package of ``versions`` (python aside): "matches lock", "differs from lock
    (locked X)", "not in lock", or "lock not found" when ``locked`` is None."""
    out: dict[str, str] = {}
    for name, installed in versions.items():
        if name == "python":
            continue
        pinned = None if locked is None else locked.get(normalize_name(name))
        if name == "peftkit":  # the project itself: installed from its checkout, never pinned by its lock
            out[name] = "this project" if locked is not None else "lock not found"
        elif locked is None:
            out[name] = "lock not found"
        elif pinned is None:
            out[name] = "not in lock"
        elif installed != NOT_INSTALLED and _same_version(installed, pinned):
            out[name] = "matches lock"
        else:
            out[name] = f"differs from lock (locked {pinned})"
    return out


def machine_description() -> dict[str, Any]:
    """The CPU model (from /proc/cpuinfo where there is one), core count, memory and platform of
    this machine: what timings and memory figures are tied to."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "platform": platform.platform()}


def device_info() -> dict[str, Any]:
    """What torch sees: CUDA available or not, the CUDA and cuDNN versions torch was built with,
    and each GPU's name and total memory (imports torch)."""
    import torch

    cuda = torch.cuda.is_available()
    cudnn = None
    if torch.backends.cudnn.is_available():
        cudnn = torch.backends.cudnn.version()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_bytes": props.total_memory})
    return {
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "gpus": gpus,
        "torch_threads": torch.get_num_threads(),
    }


def environment_report(lock_path: str | None = None) -> dict[str, Any]:
    """Everything ``peftkit env`` prints: versions, their lock status, machine and device."""
    versions = package_versions()
    path = find_lock(lock_path)
    status = lock_status(versions, read_lock(path) if path else None)
    return {
        "versions": versions,
        "lock": {"path": path, "status": status},
        "machine": machine_description(),
        "device": device_info(),
    }


def format_report(report: dict[str, Any]) -> str:
    """``environment_report`` as the plain text a bug report can paste."""
    versions, lock, machine, device = report["versions"], report["lock"], report["machine"], report["device"]
    width = max(len(n) for n in versions)
    lines = [f"- {'python':<{width}}  {versions['python']}"]
    for name, installed in versions.items():
        if name != "python":
            lines.append(f"- {name:<{width}}  {installed:<14} {lock['status'][name]}")
    lines.append(f"- lock: {lock['path'] or 'not found (installed without the repository)'}")
    lines.append(f"- platform: {machine['platform']}")
    memory = format_size(machine["memory_bytes"]) if machine["memory_bytes"] else "unknown"
    lines.append(f"- CPU: {machine['cpu']} ({machine['cores']} cores, {memory} memory)")
    if device["cuda_available"]:
        lines.append(f"- CUDA: available, CUDA {device['cuda_version']}, cuDNN {device['cudnn_version']}")
        for i, gpu in enumerate(device["gpus"]):
            lines.append(f"- GPU {i}: {gpu['name']}, {format_size(gpu['memory_bytes'])}")
    else:
        built = (
            f" (torch built for CUDA {device['cuda_version']})" if device["cuda_version"] else " (CPU build of torch)"
        )
        lines.append(f"- CUDA: not available{built}")
    return "\n".join(lines)
