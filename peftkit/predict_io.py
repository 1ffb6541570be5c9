"""What ``peftkit predict`` reads and writes at scale: inputs from a file or stdin, answers into a
CSV or JSON-lines file, and the generation settings of a task that generates text.

Inputs: ``.txt`` (and ``-``, stdin) holds one input per line (blank lines are skipped); ``.csv``,
``.tsv`` and ``.jsonl`` hold one per row, in the column named (``--text-column``) or the first of the
task's usual column names that exists. Outputs are written whole or not at all (a temporary file
renamed into place) and never replace an existing file unless asked to.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .data import pick_column
from .errors import PeftkitError

STDIN = "-"
INPUT_FORMATS = (".csv", ".tsv", ".jsonl", ".txt")
OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class GenerationOptions:
    """How a task that generates (causal-lm) answers. The defaults are greedy decoding of a
    label's length (an adapter trained on labelled data) or 64 new tokens, prompts as given."""

    max_new_tokens: int | None = None
    """Tokens to generate at most (None: the task's default)."""
    do_sample: bool = False
    """Sample instead of greedy decoding (seeded by ``seed``)."""
    temperature: float | None = None
    """Sampling temperature (with ``do_sample``; None: the model's generation config)."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``."""
    seed: int = 0
    """Seeds sampling, so the same command gives the same answers."""
    chat: bool = False
    """Wrap each prompt in the model's chat template (``tokenizer.apply_chat_template``)."""

    def validate(self) -> None:
        """One-line errors for values generation would refuse or silently ignore."""
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1
        ):
            raise PeftkitError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise PeftkitError(f"temperature must be a positive number, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise PeftkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.do_sample and (self.temperature is not None or self.top_p is not None):
            given = "temperature" if self.temperature is not None else "top_p"
            raise PeftkitError(f"{given} only applies when sampling; add do_sample (--do-sample)")
        if self.seed < 0:
            raise PeftkitError(f"seed must be >= 0, got {self.seed}")

    def given(self) -> list[str]:
        """The settings that differ from the defaults (for refusing them where nothing generates)."""
        return [
            name
            for name, value, default in (
                ("max_new_tokens", self.max_new_tokens, None),
                ("do_sample", self.do_sample, False),
                ("temperature", self.temperature, None),
                ("top_p", self.top_p, None),
                ("chat", self.chat, False),
            )
            if value != default
        ]


@dataclass
class PredictConfig:
    """What ``peftkit predict`` was asked (a field per flag, and the inputs): ``api.predict`` and
    ``api.predict_iter`` take it."""

    adapter: str | None = None
    """An adapter directory or a run directory (its ``adapter/``); or None with ``onnx`` or ``openvino``."""
    inputs: list[str] | None = None
    """The texts to answer (image files for an image classifier); or None with ``input_file``."""
    input_file: str | None = None
    """``.txt`` or ``-`` for stdin: one input per line; ``.csv``, ``.tsv``, ``.jsonl``: ``text_column``."""
    text_column: str | None = None
    """The column of ``input_file`` holding the inputs (default: the first of the task's usual names)."""
    model: str | object | None = None
    """The base model, instead of the one the adapter's metadata names (one for another task is
    refused); from Python also a loaded model, as ``RunConfig.model`` takes one."""
    force: bool = False
    """Apply the adapter even to a base whose weights differ from those it was trained on."""
    output: str | None = None
    """Also write the answers to this ``.csv`` or ``.jsonl`` file (atomically)."""
    overwrite: bool = False
    """Replace an existing ``output`` file."""
    batch_size: int | None = None
    """Inputs per forward pass (default: the task's)."""
    max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    chat: bool = False
    progress: bool | None = None
    """A progress bar on stderr (default: for a file or more than 64 inputs)."""
    onnx: str | None = None
    """Answer with what ``export`` wrote to this directory (ONNX Runtime, no PyTorch model) instead
    of an adapter."""
    openvino: str | None = None
    """Answer with what ``export --format openvino`` wrote to this directory (OpenVINO on the CPU,
    no PyTorch model) instead of an adapter."""

    def _models(self) -> list[tuple[str, str | None]]:
        """The flags that name a model, with what each was given: exactly one must be."""
        return [("--adapter", self.adapter), ("--onnx", self.onnx), ("--openvino", self.openvino)]

    @property
    def generation(self) -> GenerationOptions:
        """How a task that generates (causal-lm) answers: ``GenerationOptions`` of the fields above."""
        return GenerationOptions(
            self.max_new_tokens, self.do_sample, self.temperature, self.top_p, self.seed, self.chat
        )

    def validate(self) -> None:
        """Refuse, before anything is read, what names no model or no inputs, or both of either."""
        given = [flag for flag, value in self._models() if value is not None]
        if len(given) != 1:
            raise PeftkitError(
                f"give an adapter (--adapter DIR) or an export (--onnx DIR, --openvino DIR), not {' and '.join(given)}"
                if given
                else "no model: give --adapter DIR (or --onnx DIR or --openvino DIR, what peftkit export wrote)"
            )
        if self.adapter is None and (self.model is not None or self.force):
            raise PeftkitError(
                f"{'--model' if self.model is not None else '--force'} applies to an --adapter; an "
                f"{given[0]} export holds its whole model"
            )
        if (not self.inputs) == (self.input_file is None):  # both, or neither
            raise PeftkitError(
                "give the inputs either as texts or with --input FILE (- for stdin), not both"
                if self.input_file is not None
                else "no inputs: give texts, or --input FILE (- for stdin)"
            )
        if self.input_file is None and self.text_column is not None:
            raise PeftkitError(
                f"--text-column {self.text_column!r} applies to an --input file, not to texts given as arguments"
            )


# -- inputs -----------------------------------------------------------------------------------


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def read_inputs(path: str, column: str | None, guesses: tuple[str, ...]) -> list[str]:
    """The inputs in ``path`` (``-``: stdin, one per line): a ``.txt`` file's non-blank lines, or
    a ``.csv`` / ``.tsv`` / ``.jsonl`` file's ``column`` (None: the first of ``guesses`` there)."""
    kind = ".txt" if path == STDIN else _suffix(path)
    if kind not in INPUT_FORMATS:
        raise PeftkitError(
            f"input file {path!r} has an unknown extension; accepted: "
            f"{', '.join(INPUT_FORMATS)}, or - for stdin (one input per line)"
        )
    if kind == ".txt" and column is not None:
        raise PeftkitError(
            f"--text-column {column!r} does not apply to {path!r}: a .txt file (or stdin) holds "
            "one input per line; columns are read from .csv, .tsv and .jsonl files"
        )
    if path != STDIN and not os.path.isfile(path):
        raise PeftkitError(
            f"input file not found: {path}"
            if not os.path.exists(path)
            else f"input path {path!r} is a directory; give a file"
        )
    try:
        if path == STDIN:
            inputs = _lines(sys.stdin)
        else:
            with open(path, encoding="utf-8-sig", newline="" if kind != ".txt" else None) as fh:
                inputs = (
                    _lines(fh)
                    if kind == ".txt"
                    else _jsonl_column(fh, path, column, guesses)
                    if kind == ".jsonl"
                    else _csv_column(fh, path, column, guesses, "\t" if kind == ".tsv" else ",")
                )
    except UnicodeDecodeError:
        raise PeftkitError(f"input {path!r} is not UTF-8 text") from None
    if not inputs:
        raise PeftkitError(f"input {'(stdin)' if path == STDIN else repr(path)} holds no inputs")
    return inputs


def _lines(fh: Iterable[str]) -> list[str]:
    return [line.rstrip("\r\n") for line in fh if line.strip()]


def _as_text(value: Any, where: str, col: str) -> str:
    """A cell as an input: numbers as their text (as the data loaders read them), no empties."""
    if value is None or isinstance(value, (dict, list)):
        raise PeftkitError(f"{where}: column {col!r} holds {json.dumps(value)}, not a text")
    return value if isinstance(value, str) else json.dumps(value)


def _csv_column(fh: Any, path: str, column: str | None, guesses: tuple[str, ...], delimiter: str) -> list[str]:
    reader = csv.DictReader(fh, delimiter=delimiter)
    col = pick_column(list(reader.fieldnames or []), column, guesses, "text")
    try:
        return [_as_text(row[col], f"{path} line {reader.line_num}", col) for row in reader]
    except csv.Error as exc:
        raise PeftkitError(f"{path} line {reader.line_num} is not valid CSV: {exc}") from None


def _jsonl_column(fh: Any, path: str, column: str | None, guesses: tuple[str, ...]) -> list[str]:
    out, col = [], None
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftkitError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise PeftkitError(f"{path} line {number} must be a JSON object, got {type(row).__name__}")
        col = col or pick_column(list(row), column, guesses, "text")
        if col not in row:
            raise PeftkitError(f"{path} line {number} has no {col!r}; it has: {', '.join(row)}")
        out.append(_as_text(row[col], f"{path} line {number}", col))
    return out


# -- outputs ----------------------------------------------------------------------------------


def check_output_file(path: str, overwrite: bool) -> None:
    """Refuse, before any work, an output whose format is unknown, whose folder is missing, or
    that exists (unless ``overwrite``)."""
    if _suffix(path) not in OUTPUT_FORMATS:
        raise PeftkitError(
            f"output file {path!r} has an unknown extension; accepted: {', '.join(OUTPUT_FORMATS)} "
            "(without --output, JSON lines go to stdout)"
        )
    if os.path.isdir(path):
        raise PeftkitError(f"output path {path!r} is a directory; give a file name")
    if os.path.exists(path) and not overwrite:
        raise PeftkitError(f"output file {path!r} already exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PeftkitError(f"the folder of output file {path!r} does not exist: {folder}")


def _cell(value: Any) -> Any:
    """A CSV cell: lists (probabilities) as JSON, None as empty."""
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def write_rows(path: str, rows: list[dict[str, Any]], overwrite: bool) -> None:
    """Write ``rows`` to ``path`` as CSV (a column per key) or JSON lines, by its extension, whole
    or not at all: into a temporary file beside it, renamed into place."""
    check_output_file(path, overwrite)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if _suffix(path) == ".jsonl":
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            else:
                columns = list(dict.fromkeys(key for row in rows for key in row))
                writer = csv.DictWriter(fh, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


__all__ = [
    "GenerationOptions",
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "STDIN",
    "check_output_file",
    "read_inputs",
    "write_rows",
]
