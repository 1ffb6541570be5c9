"""What peftkit hands over has the modes a plain ``mkdir`` / ``open`` gives under the user's umask
(issue 15, finding 3): staging with ``mkdtemp`` and libraries' private temporary files once left a
bench's output, its runs, a merged model and the adapters' safetensors at 0700 / 0600."""

from __future__ import annotations

import os
import stat

import pytest

from peftkit.files import plain_mode, private_dir, publish_modes


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _bad_modes(root: str, umask: int) -> list[str]:
    """Every directory and file under ``root`` (itself included) whose mode is not what a plain
    mkdir / open would have given under ``umask``."""
    want_dir, want_file = 0o777 & ~umask, 0o666 & ~umask
    bad = []
    paths = [root] + [os.path.join(here, n) for here, dirs, files in os.walk(root) for n in dirs + files]
    for path in paths:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        want = want_dir if os.path.isdir(path) else want_file
        if mode != want:
            bad.append(f"{os.path.relpath(path, root)}: {oct(mode)} (expected {oct(want)})")
    return bad


def test_plain_mode_follows_the_umask(umask, tmp_path) -> None:
    assert plain_mode(directory=True) == 0o777 & ~umask and plain_mode() == 0o666 & ~umask
    made = private_dir(".x.partial-", str(tmp_path))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o777 & ~umask
    secret = os.path.join(made, "weights.safetensors")
    with open(secret, "w") as fh:
        fh.write("x")
    os.chmod(secret, 0o600)  # what a library's private temporary file leaves
    publish_modes(made)
    assert _bad_modes(made, umask) == []


def test_run_bench_and_merge_outputs_have_plain_modes(umask, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    common = [
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--max-train-samples",
        "32",
        "--max-eval-samples",
        "16",
    ]
    run_dir, bench_dir, merged = str(tmp_path / "run"), str(tmp_path / "bench"), str(tmp_path / "merged")
    code, _, err = run_cli("run", "-s", "lora", *common, "--output-dir", run_dir)
    assert code == 0, err
    code, _, err = run_cli("bench", "--strategies", "head_only", *common, "--output-dir", bench_dir)
    assert code == 0, err
    code, _, err = run_cli("merge", "--adapter", os.path.join(run_dir, "adapter"), "--output", merged)
    assert code == 0, err
    for root in (run_dir, bench_dir, merged):
        assert _bad_modes(root, umask) == [], root
    # what the checks above walked: the files the issue found at 0600 / 0700
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(bench_dir, "runs", "head_only-seed0", "adapter", "adapter.safetensors"))
    assert os.path.isfile(os.path.join(bench_dir, "results.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(merged))
