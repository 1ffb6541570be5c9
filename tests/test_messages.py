"""What the commands say, worded as a user reads it (issue 15, findings 8 and 12): the flag a
refusal suggests is the command's own, hints come once, every error line starts ``error:``."""

from __future__ import annotations

import pytest


def test_merge_into_an_existing_output_suggests_its_own_flag(run_cli, tmp_path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    code, _, err = run_cli("merge", "--adapter", str(tmp_path / "nope"), "--output", str(tmp_path / "merged"))
    assert code == 2
    assert err.strip().endswith("use --overwrite to replace it or choose another --output"), err


@pytest.mark.parametrize("given", [".long.partial", ".long.partial/"])
def test_resume_given_the_staging_directory_names_the_run_directory(given, run_cli, tmp_path) -> None:
    (tmp_path / ".long.partial").mkdir()
    code, _, err = run_cli("run", "--resume", str(tmp_path / given))
    assert code == 2 and "..long.partial.partial" not in err
    assert err.strip().endswith(f"resume it by its run directory: peftkit run --resume {tmp_path / 'long'}"), err


@pytest.mark.parametrize("args", [["bogus"], ["run", "--epochs", "x"], ["merge", "--output", "x"],
                                  ["predict", "--adapter", "x"], ["run", "--resume"], ["-x"]])
def test_usage_errors_are_one_lowercase_error_line(args, run_cli) -> None:
    code, _, err = run_cli(*args)
    assert code == 2
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()] and err.startswith("error: "), err
    assert "Error:" not in err


def test_no_command_shows_the_help_not_an_error(run_cli) -> None:
    code, _, err = run_cli()
    assert code == 2 and err.startswith("Usage: peftkit") and "error:" not in err
    assert "peftkit bench" in err  # the commands are listed

