"""`peftkit env`: the version table, the lock comparison, and the device report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from peftkit.env import (
    REPORTED_PACKAGES,
    environment_report,
    find_lock,
    format_report,
    lock_status,
    package_versions,
    read_lock,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_versions_are_the_installed_ones() -> None:
    versions = package_versions()
    assert list(versions) == ["python", *REPORTED_PACKAGES]
    assert versions["torch"] == version("torch") and versions["transformers"] == version("transformers")
    assert package_versions(("surely-not-a-package",))["surely-not-a-package"] == "not installed"


def test_read_lock_takes_pins_and_skips_comments_options_and_markers(tmp_path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# a comment\n--find-links /somewhere\nTorch==2.13.0+cpu   # via peftkit\n"
        "scikit_learn==1.9.1\n    # via mlxtend\nnumpy==2.4.6 ; python_version >= '3.11'\n"
        "-e .\nfoo[extra]==1.0\n"
    )
    assert read_lock(str(lock)) == {"torch": "2.13.0+cpu", "scikit-learn": "1.9.1", "numpy": "2.4.6", "foo": "1.0"}


def test_lock_status_says_match_difference_and_absence() -> None:
    versions = {
        "python": "3.11.7",
        "peftkit": "0.1.0",
        "torch": "2.13.0+cpu",
        "transformers": "5.24.0",
        "peft": "0.21",
        "numpy": "not installed",
        "tokenizers": "0.23.3",
    }
    locked = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.0", "numpy": "2.4.6"}
    assert lock_status(versions, locked) == {
        "peftkit": "this project",
        "torch": "matches lock",
        "transformers": "differs from lock (locked 5.23.0)",
        "peft": "matches lock",  # 0.21 and 0.21.0 are the same release
        "numpy": "differs from lock (locked 2.4.6)",
        "tokenizers": "not in lock",
    }
    assert set(lock_status(versions, None).values()) == {"lock not found"}
    # the lock pins torch's version; the build install.sh chose (CPU, CUDA) is that version, as pip
    # decides "torch==2.13.0"; a pin that names a build matches only that build
    assert lock_status({"torch": "2.13.0+cpu"}, {"torch": "2.13.0"})["torch"] == "matches lock"
    assert lock_status({"torch": "2.13.0"}, {"torch": "2.13.0"})["torch"] == "matches lock"
    assert lock_status({"torch": "2.13.0"}, {"torch": "2.13.0+cpu"})["torch"].startswith("differs")
    assert lock_status({"torch": "2.14.0+cpu"}, {"torch": "2.13.0"})["torch"].startswith("differs")


def test_the_repository_lock_pins_torch_by_version_without_cuda_packages() -> None:
    path = find_lock()
    assert path == os.path.join(REPO, "requirements.lock")
    pins = read_lock(path)
    assert "+" not in pins["torch"] and "pytest" in pins and "transformers" in pins
    cuda = ("nvidia-", "cuda-", "triton")
    assert not [name for name in pins if name.startswith(cuda)]
    # the CUDA build's own packages are locked apart, for machines where no CPU build can be had;
    # nothing in that file repeats (or contradicts) the main lock
    extra = read_lock(os.path.join(REPO, "scripts", "torch-cuda.lock"))
    assert extra and all(name.startswith(cuda) for name in extra) and not set(extra) & set(pins)


def _interpreter(version: str) -> str | None:
    """A working ``python<version>`` on this machine (pyenv's shims name versions they will not run)."""
    import glob
    import shutil

    candidates = [
        shutil.which(f"python{version}"),
        *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}"))),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-V"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("python", ["3.10", "not-a-python"])
def test_install_refuses_a_python_the_lock_is_not_for_in_one_line(tmp_path, python) -> None:
    interpreter = _interpreter(python) if python[0].isdigit() else str(tmp_path / python)
    if interpreter is None:
        pytest.skip(f"no working python{python} on this machine")
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["bash", os.path.join(REPO, "install.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": interpreter, "VENV": str(venv)},
        timeout=60,
    )
    assert result.returncode == 2 and not venv.exists()
    expected = (
        f"install.sh: Python 3.10 ({interpreter}) is not one peftkit is locked for; accepted: "
        "Python 3.11, 3.12, 3.13 (PYTHON=<interpreter>)"
        if python == "3.10"
        else f"install.sh: PYTHON='{interpreter}' does not run a Python interpreter"
    )
    assert result.stderr.strip().splitlines() == [expected]


def test_a_missing_lock_is_reported_not_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PEFTKIT_LOCK", str(tmp_path / "none.lock"))
    monkeypatch.setattr("peftkit.env._REPO_ROOT", str(tmp_path))  # as if installed without the repository
    report = environment_report()
    assert report["lock"]["path"] is None and report["lock"]["status"]["torch"] == "lock not found"
    assert "lock: not found" in format_report(report)


def test_env_command_text_and_json(run_cli, tmp_path) -> None:
    lock = tmp_path / "old.lock"
    lock.write_text(f"torch==0.0.1\ntransformers=={version('transformers')}\n")
    code, stdout, stderr = run_cli("env", "--lock", str(lock))
    assert code == 0, stderr
    assert f"torch         {version('torch')}" in stdout and "differs from lock (locked 0.0.1)" in stdout
    assert "transformers" in stdout and "matches lock" in stdout
    assert "CPU: " in stdout and "CUDA: " in stdout and "platform: " in stdout
    code, stdout, stderr = run_cli("env", "--json", "--lock", str(lock))
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["versions"] == package_versions()
    assert report["lock"]["status"]["torch"] == "differs from lock (locked 0.0.1)"
    assert report["lock"]["status"]["datasets"] == "not in lock"
    import torch

    device = report["device"]
    assert device["cuda_available"] == torch.cuda.is_available()
    assert len(device["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert device["cuda_version"] == torch.version.cuda
    assert report["machine"]["cores"] == os.cpu_count() and report["machine"]["cpu"]


def test_env_with_a_missing_lock_file_is_one_line(run_cli, tmp_path) -> None:
    code, _, stderr = run_cli("env", "--lock", str(tmp_path / "nope.lock"))
    assert (
        code == 2
        and stderr.strip()
        == f"error: lock file not found: {str(tmp_path / 'nope.lock')!r}; "
        "give a requirements-style file of name==version lines"
    )


@pytest.mark.parametrize("args", [["--help"], ["env", "--help"]])
def test_help_does_not_import_torch(args) -> None:
    code = (
        "import sys\nfrom peftkit.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'imported torch'\n"
    ).replace("%r", repr(args))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_bitsandbytes_8bit_cast_message_is_shown_once_per_process(caplog) -> None:
    """bitsandbytes logs its bf16 -> fp16 cast on every 8-bit matmul (3,640 lines in a 24-step GPU
    run); after quiet_libraries the first one is shown and the repeats are not."""
    import logging

    from peftkit.env import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # twice, as a bench worker and the API both may: still one filter
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(5):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
        logger.warning("another message")
    messages = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert messages == [
        "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
        "another message",
    ]
    assert len(logger.filters) == 1


def test_a_run_hides_the_libraries_objects_from_the_garbage_collector() -> None:
    """Each phase of a run starts with a full collection; the ~500,000 objects the imports made
    are frozen first (once per process, and only in peftkit's own: a user's session that imports
    peftkit keeps its garbage collector as it was), so those collections do not walk them every time."""
    import gc
    import sys

    # (a fresh interpreter may have frozen a few objects of its own: 375 on CPython 3.12, 0 on 3.11)
    code = (
        "import gc\nbefore = gc.get_freeze_count()\nimport peftkit.env as env\n"
        "env.freeze_imported_objects()\n"
        "print(gc.get_freeze_count() - before)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["0"], done.stdout + done.stderr

    from peftkit.env import freeze_imported_objects, own_process

    own_process()  # as the command line says (every run_cli test of this session already did)
    freeze_imported_objects()
    frozen = gc.get_freeze_count()
    assert frozen > 100_000 and "peft" in sys.modules
    freeze_imported_objects()  # once per process: a later run's objects are never frozen
    assert gc.get_freeze_count() == frozen


@pytest.mark.parametrize(
    ("budget", "device", "lean"), [(None, "cpu", False), (2**30, "cpu", True), (2**30, "cuda", False)]
)
def test_only_cpu_runs_with_a_budget_are_lean(budget, device, lean) -> None:
    """A CPU run given a memory budget fits before it is fast (env.lean_host_memory: its steps return
    free heap pages between blocks); without a budget, or on CUDA, nothing is returned. Nothing
    process-wide is set either way (glibc's own settings stay as they were)."""
    import torch

    from peftkit import env

    assert env.lean_host_memory(torch.device(device), budget) is lean


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_returning_heap_holes_lowers_the_resident_set_and_a_cpu_run_does_it_every_ten_steps(monkeypatch) -> None:
    """Half of 4,096 heap blocks of 64 KiB freed between live ones (the holes a step's freed
    activations leave) stay resident until ``return_heap_holes``; a lean CPU run's meter (a run with
    a memory budget) calls it every ``HEAP_TRIM_EVERY`` optimizer steps; a CPU run without a budget
    keeps them for its next steps, and a CUDA one never calls it."""
    import torch

    import peftkit.memory as memory

    meter = memory.MemoryMeter("cpu", lean=True)
    blocks = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KiB each: the heap's, not mmap's
    del blocks[::2]
    before = meter.current()
    memory.return_heap_holes()
    assert before - meter.current() > 64 * 2**20, "at least half of the 128 MiB freed went back"
    del blocks
    calls: list[int] = []
    monkeypatch.setattr(memory, "return_heap_holes", lambda: calls.append(1))
    for step in range(1, 31):
        meter.return_heap_holes(step)
        memory.MemoryMeter("cpu").return_heap_holes(step)
        memory.MemoryMeter("cuda", lean=True).return_heap_holes(step)
    assert memory.HEAP_TRIM_EVERY == 10 and len(calls) == 3
    # metrics.json's peak_memory_method says which kind of peak it is
    assert "returned to the system every 10 steps" in meter.method
    assert "returned" not in memory.MemoryMeter("cpu").method


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_heap_trims_between_blocks_come_forward_and_backward_in_training_only(monkeypatch) -> None:
    """A CPU training step returns the heap's free pages each time the blocks' outputs add up to the
    threshold: on the way forward after those blocks, and on the way back when their outputs' gradients
    arrive, in reverse order. The gradients are the same as without; nothing happens in evaluation,
    without gradients or through blocks that save nothing (a frozen backbone); ``remove`` takes the
    hooks off; CUDA and a model without transformer blocks get none."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit.memory as memory

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 8))
    output_bytes = 2 * 8 * 16 * 4
    events: list[str] = []
    monkeypatch.setattr(memory, "return_heap_holes", lambda: events.append("trim"))
    monkeypatch.setattr(memory, "TRIM_EVERY_BYTES", 2 * output_bytes)  # after every second block
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *_, i=i: events.append(f"fwd{i}"))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        events.append("loss")
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    events.clear()
    trims = memory.trim_heap_between_blocks(model, torch.device("cpu"))
    assert trims is not None
    trimmed = grads()
    assert all(torch.equal(a, b) for a, b in zip(plain, trimmed))
    # forward: after blocks 1, 3, 5 (their own hooks came first); backward: 3 more, before the loss's
    # gradient reaches block 5's output and each earlier one in turn
    assert events[events.index("fwd1") + 1] == "trim" and events[events.index("fwd5") + 1] == "trim"
    assert events[: events.index("loss")].count("trim") == 3 and events.count("trim") == 6
    assert trims.count == 6 and trims.seconds >= 0

    events.clear()
    with torch.no_grad():
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids).logits.sum().backward()
    model.train()
    model.requires_grad_(False)  # a frozen backbone: its blocks save nothing for backward
    model(input_ids=ids)
    assert "trim" not in events

    trims.remove()
    model.requires_grad_(True)
    events.clear()
    grads()
    assert "trim" not in events
    assert memory.trim_heap_between_blocks(model, torch.device("cuda")) is None
    assert memory.trim_heap_between_blocks(torch.nn.Linear(2, 2), torch.device("cpu")) is None
