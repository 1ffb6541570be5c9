"""Data loading: file formats, label mapping, seeded splits, and the errors for bad data."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from peftkit.data import Shape, load_labelled_data, load_text_data, text_shape
from peftkit.errors import PeftkitError

from conftest import make_rows


def _write_csv(path, rows, fields=("text", "label")) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_csv_string_labels_and_seeded_80_10_10_split(tiny_csv) -> None:
    data = load_labelled_data(tiny_csv, seed=3)
    assert data.label_names == ["neg", "pos"]
    sizes = data.split_info["sizes"]
    assert sizes == {"train": 160, "validation": 20, "test": 20}
    assert "80/10/10" in data.split_info["method"] and data.split_info["seed"] == 3
    assert set(data.splits["train"]["label"]) == {0, 1}
    # the same seed gives the same split; another seed another one
    again = load_labelled_data(tiny_csv, seed=3)
    other = load_labelled_data(tiny_csv, seed=4)
    assert again.splits["test"]["text"] == data.splits["test"]["text"]
    assert other.splits["test"]["text"] != data.splits["test"]["text"]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "csv.gz", "dir"])
def test_formats(fmt, tmp_path) -> None:
    import datasets

    rows = make_rows(60)
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "csv.gz":
        path = tmp_path / "d.csv.gz"
        plain = _write_csv(tmp_path / "plain.csv", rows)
        path.write_bytes(gzip.compress(open(plain, "rb").read()))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(rows[:40]),
                "validation": datasets.Dataset.from_list(rows[40:50]),
                "test": datasets.Dataset.from_list(rows[50:]),
            }
        ).save_to_disk(str(path))
    data = load_labelled_data(str(path))
    assert sum(data.split_info["sizes"].values()) == 60
    assert data.label_names == ["neg", "pos"]
    if fmt == "dir":
        assert data.split_info["method"] == "splits given by the dataset"


def test_integer_labels_and_custom_columns(tmp_path) -> None:
    rows = [{"review": r["text"], "stars": 5 if r["label"] == "pos" else 1} for r in make_rows(50)]
    path = _write_csv(tmp_path / "d.csv", rows, fields=("review", "stars"))
    data = load_labelled_data(path, text_column="review", label_column="stars")
    assert data.label_names == ["1", "5"]
    assert set(data.splits["train"]["label"]) == {0, 1}


def test_max_train_samples_caps_train_only(tiny_csv) -> None:
    data = load_labelled_data(tiny_csv, max_train_samples=50)
    assert data.split_info["sizes"] == {"train": 50, "validation": 20, "test": 20}


def test_missing_validation_is_carved_from_train(tmp_path) -> None:
    import datasets

    rows = make_rows(100)
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:90]), "test": datasets.Dataset.from_list(rows[90:])}
    ).save_to_disk(str(path))
    data = load_labelled_data(str(path))
    assert data.split_info["sizes"] == {"train": 80, "validation": 10, "test": 10}
    assert "validation carved out of train" in data.split_info["method"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", r"data file not found: .*nothere.csv"),
        ("missing_column", r"text column 'body' not found; columns: text, label"),
        ("empty", r"holds no examples|no usable training examples"),
        ("single_class", r"single class \('pos'\)"),
        ("bad_format", r"unknown format; accepted: .csv"),
        ("not_a_dataset_dir", r"not a dataset saved by datasets"),
        ("float_labels", r"holds float values; classification needs integer or string labels"),
    ],
)
def test_bad_data(case, message, tmp_path, tiny_csv) -> None:
    kwargs = {}
    if case == "missing_file":
        source = str(tmp_path / "nothere.csv")
    elif case == "missing_column":
        source, kwargs = tiny_csv, {"text_column": "body"}
    elif case == "empty":
        source = _write_csv(tmp_path / "e.csv", [])
    elif case == "single_class":
        source = _write_csv(tmp_path / "s.csv", [{"text": "good film", "label": "pos"}] * 20)
    elif case == "bad_format":
        source = str(tmp_path / "d.xlsx")
        open(source, "w").write("x")
    elif case == "not_a_dataset_dir":
        source = str(tmp_path)
    else:
        source = _write_csv(tmp_path / "f.csv", [{"text": f"t{i}", "label": i + 0.5} for i in range(20)])
    with pytest.raises(PeftkitError, match=message):
        load_labelled_data(source, **kwargs)


@pytest.mark.real
def test_embedded_rotten_tomatoes() -> None:
    data = load_labelled_data("rotten_tomatoes")
    sizes = data.split_info["sizes"]
    assert data.label_names == ["negative", "positive"]
    total = sum(sizes.values())
    assert 12_700 <= total <= 12_808  # 7,403 fresh + 5,405 rotten, minus duplicate texts
    texts = [t for s in ("train", "validation", "test") for t in data.splits[s]["text"]]
    assert len(texts) == len(set(texts)), "duplicate texts must be dropped"
    share = sum(data.splits["test"]["label"]) / sizes["test"]
    assert 0.53 < share < 0.6  # stratified: the test split keeps the fresh share (~0.58)


@pytest.mark.parametrize(
    "columns, named, shape",
    [
        (["prompt", "response"], {}, Shape.PROMPT_RESPONSE),
        (["question", "answer", "label"], {}, Shape.PROMPT_RESPONSE),  # a response column wins
        (["text", "label"], {}, Shape.LABELLED),
        (["review", "stars"], {"label_column": "stars"}, Shape.LABELLED),
        (["text"], {}, Shape.PLAIN_TEXT),
        (["sentence", "id"], {}, Shape.PLAIN_TEXT),
        (["body", "notes"], {"response_column": "notes"}, Shape.PROMPT_RESPONSE),
    ],
)
def test_shape_is_read_from_the_columns(columns, named, shape) -> None:
    assert (
        text_shape(columns, named.get("text_column"), named.get("label_column"), named.get("response_column")) is shape
    )


def test_text_data_without_a_text_column_is_refused() -> None:
    with pytest.raises(PeftkitError, match=r"no text column found .* columns: body, id"):
        text_shape(["body", "id"], None, None, None)


def test_text_data_carries_its_shape(tiny_csv, tmp_path) -> None:
    assert load_text_data(tiny_csv).shape is Shape.LABELLED
    plain = tmp_path / "plain.csv"
    plain.write_text("sentence\n" + "\n".join(f"line number {i}" for i in range(30)) + "\n")
    data = load_text_data(str(plain), seed=1)
    assert data.shape is Shape.PLAIN_TEXT and data.split_info["columns"] == {"text": "sentence"}
    assert data.splits["train"][0]["prompt"] == "" and sum(data.split_info["sizes"].values()) == 30


def test_numeric_answers_are_text(tmp_path) -> None:
    """A CSV of numeric answers is read as integers; they are learned as text (0 included), not a traceback."""
    path = _write_csv(
        tmp_path / "sums.csv",
        [{"prompt": f"{i} + 1 =", "response": i + 1 - (i == 5) * 6} for i in range(30)],
        fields=("prompt", "response"),
    )
    data = load_text_data(path)
    assert data.shape is Shape.PROMPT_RESPONSE and sum(data.split_info["sizes"].values()) == 30
    responses = [r for split in data.splits.values() for r in split["response"]]
    assert all(isinstance(r, str) for r in responses) and "0" in responses


# -- what a run says about its data (issue 15: findings 9, 10, 11) ---------------------------------


def _reviews(path, n: int = 300, empty_text: int = 0, empty_label: int = 0, neg_share: float = 0.5) -> str:
    """``id, review, sentiment`` rows: distinct reviews, the first rows with empty cells."""
    rows = [
        {
            "id": i,
            "review": f"review number {i} of the film",
            "sentiment": "neg" if i % 100 < neg_share * 100 else "pos",
        }
        for i in range(n)
    ]
    for i in range(empty_text):
        rows[i]["review"] = ""
    for i in range(empty_text, empty_text + empty_label):
        rows[i]["sentiment"] = ""
    return _write_csv(path, rows, fields=("id", "review", "sentiment"))


def _warnings(data, task: str = "sequence-classification") -> list[str]:
    from peftkit.tasks import get_task

    return [n for n in data.notes if n.startswith("warning:")] + get_task(task).data_warnings(data)


def test_guessed_columns_are_said_and_recorded(tmp_path) -> None:
    path = _reviews(tmp_path / "my.csv")
    data = load_labelled_data(path)
    assert data.notes == [
        f"data: {path}: 300 rows; text column 'review', label column 'sentiment' "
        "(guessed; --text-column/--label-column to choose)"
    ]
    assert data.split_info["columns"] == {"text": "review", "label": "sentiment"}
    from peftkit.data import resolved_columns

    assert resolved_columns(data) == {"text_column": "review", "label_column": "sentiment"}
    named = load_labelled_data(path, text_column="review")  # only what was guessed is said to be
    assert named.notes[0].endswith("(label guessed; --label-column to choose)")
    plain = tmp_path / "plain.csv"
    plain.write_text("sentence\n" + "\n".join(f"line {i}" for i in range(30)) + "\n")
    # plain text's one column is the text column: a run records it as --text-column
    assert resolved_columns(load_text_data(str(plain))) == {"text_column": "sentence"}


def test_rows_with_empty_cells_are_counted_and_said(tmp_path) -> None:
    data = load_labelled_data(_reviews(tmp_path / "my.csv", empty_text=12, empty_label=8))
    assert _warnings(data) == ["warning: 20 of 300 rows dropped: empty text 'review' (12) or label 'sentiment' (8)"]
    assert data.split_info["rows"] == {"read": 300, "used": 280, "dropped_empty": {"text": 12, "label": 8}}
    assert sum(data.split_info["sizes"].values()) == 280
    pairs = tmp_path / "qa.csv"
    pairs.write_text("question,answer\n" + "\n".join(f"q{i},{'' if i < 5 else i}" for i in range(40)) + "\n")
    assert load_text_data(str(pairs)).notes[1] == "warning: 5 of 40 rows dropped: empty response 'answer' (5)"


def test_swapped_columns_warn_of_free_text_and_name_the_fix(tmp_path) -> None:
    path = _reviews(tmp_path / "my.csv")
    swapped = load_labelled_data(path, text_column="sentiment", label_column="review")
    assert _warnings(swapped) == [
        "warning: label column 'review' has 300 distinct values in 300 rows and looks like free text, not "
        "classes; did you mean --text-column review --label-column sentiment?"
    ]
    # a causal LM may well answer in free text: only classification tasks check
    assert _warnings(load_text_data(path, text_column="sentiment", label_column="review"), "causal-lm") == []
    # long labels read as sentences even when few; no column to swap with: the others are named
    wordy = tmp_path / "wordy.csv"
    _write_csv(
        wordy,
        [{"id": i, "note": f"note {i}", "label": f"this is sentence number {i % 3} of three"} for i in range(60)],
        fields=("id", "note", "label"),
    )
    assert _warnings(load_labelled_data(str(wordy), text_column="note")) == [
        "warning: label column 'label' has 3 distinct values in 60 rows and looks like free text, not classes; "
        "name the column that holds the classes with --label-column (other columns: id)"
    ]


def test_a_dominant_class_is_warned_of(tmp_path) -> None:
    data = load_labelled_data(_reviews(tmp_path / "my.csv", neg_share=0.91))
    [warning] = _warnings(data)
    assert (
        warning.startswith("warning: class 'neg' is 9")
        and "of the training rows; accuracy alone will mislead, read macro-F1 (majority baseline 0.9" in warning
    )


def test_balanced_data_with_its_own_columns_gets_no_warning(tiny_csv, tmp_path) -> None:
    assert _warnings(load_labelled_data(tiny_csv)) == []
    assert _warnings(load_labelled_data(_reviews(tmp_path / "my.csv"))) == []


def test_a_run_says_and_records_its_columns(run_cli, tiny_model_dir, tmp_path) -> None:
    """The console line, config.yaml and metrics.json name the guessed columns; the drop is said."""
    import os

    import yaml

    data, out = _reviews(tmp_path / "my.csv", empty_text=12, empty_label=8), str(tmp_path / "run")
    code, _, err = run_cli(
        "run",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        data,
        "--output-dir",
        out,
        "--strategy",
        "head_only",
        "--epochs",
        "1",
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "32",
        "--max-length",
        "16",
    )
    assert code == 0, err
    said = [
        f"data: {data}: 300 rows; text column 'review', label column 'sentiment' "
        "(guessed; --text-column/--label-column to choose)",
        "warning: 20 of 300 rows dropped: empty text 'review' (12) or label 'sentiment' (8)",
    ]
    assert all(line in err.splitlines() for line in said) and "warning: class" not in err
    config = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert (config["text_column"], config["label_column"], config["response_column"]) == ("review", "sentiment", None)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["split"]["columns"] == {"text": "review", "label": "sentiment"}
    assert metrics["split"]["rows"]["used"] == 280
    log = open(os.path.join(out, "train.log")).read()
    assert all(line in log for line in said)


@pytest.mark.parametrize("rows", [[], [{"text": "good film", "label": "pos"}] * 20], ids=["empty", "one_class"])
def test_bad_data_is_refused_before_torch_loads(rows, tmp_path) -> None:
    """Issue 32 (6): a run reads its data before importing torch, transformers and peft (seconds), so an
    empty or one-class file is refused as fast as a missing one; nothing is written."""
    import subprocess
    import sys

    source = _write_csv(tmp_path / "bad.csv", rows)
    out = tmp_path / "run"
    code = (
        "import sys\nfrom peftkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    print('exit', e.code, sorted(m for m in ('torch', 'peft', 'accelerate') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "--strategy", "lora", "--dataset", source, "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "exit 2 []", done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
    assert not out.exists()
