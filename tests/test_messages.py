"""What the commands say, worded as a user reads it (issue 15, findings 8 and 12): the flag a
refusal suggests is the command's own, hints come once, every error line starts ``error:``."""

from __future__ import annotations

import pytest


def test_merge_into_an_existing_output_suggests_its_own_flag(run_cli, tmp_path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()  # exists (a missing one is refused first, before the output is looked at)
    code, _, err = run_cli("merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"))
    assert code == 2
    assert err.strip().endswith("use --overwrite to replace it or choose another --output"), err


@pytest.mark.parametrize("given", [".long.partial", ".long.partial/"])
def test_resume_given_the_staging_directory_names_the_run_directory(given, run_cli, tmp_path) -> None:
    (tmp_path / ".long.partial").mkdir()
    code, _, err = run_cli("run", "--resume", str(tmp_path / given))
    assert code == 2 and "..long.partial.partial" not in err
    assert err.strip().endswith(f"resume it by its run directory: peftkit run --resume {tmp_path / 'long'}"), err


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["run", "--epochs", "x"],
        ["merge", "--output", "x"],
        ["predict", "--adapter", "x"],
        ["run", "--resume"],
        ["-x"],
    ],
)
def test_usage_errors_are_one_lowercase_error_line(args, run_cli) -> None:
    code, _, err = run_cli(*args)
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()] and err.startswith("error: "), err
    assert "Error:" not in err


def test_no_command_shows_the_help_not_an_error(run_cli) -> None:
    code, _, err = run_cli()
    assert code == 2 and err.startswith("Usage: peftkit") and "error:" not in err
    assert "peftkit bench" in err  # the commands are listed


def test_a_small_adapter_is_sized_in_kib_and_inspect_shows_the_base_quantization(
    run_cli, tiny_model_dir, tiny_csv, tmp_path
) -> None:
    """head_only's few-KiB head was reported as ``adapter 0.00 MiB``; ``inspect`` left out
    ``base_quantization`` (which ``predict`` acts on) in its text form."""
    import json

    from peftkit.memory import format_size

    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "run",
        "-s",
        "head_only",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--max-length",
        "16",
        "--max-train-samples",
        "32",
        "--max-eval-samples",
        "16",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    size = json.load(open(out / "metrics.json"))["adapter_bytes"]
    assert 0 < size < 2**20 and f"adapter {format_size(size)}\n" in stdout and "0.00 MiB" not in stdout
    code, stdout, err = run_cli("inspect", str(out / "adapter"))
    assert code == 0, err
    assert f"size              {size:,} bytes ({format_size(size)})" in stdout
    assert "base quantization none (full-precision base)" in stdout
