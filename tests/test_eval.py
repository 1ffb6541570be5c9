"""``peftkit eval``: an adapter on a labelled file it has not seen, beside a majority-class baseline
(issue 15, finding 15). Tiny models trained for seconds; the figures are checked against
``predict`` on every row and scikit-learn, not against themselves."""

from __future__ import annotations

import csv
import json
import os

import pytest

from conftest import make_rows


def _write_csv(path, rows: list[dict[str, str]], fields: tuple[str, str] = ("text", "label")) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows([(r["text"], r["label"]) for r in rows])
    return str(path)


@pytest.fixture(scope="module")
def three_label_run(tmp_path_factory, tiny_model_dir) -> str:
    """A head_only run on three labels (neg, neutral, pos): a file with only two of them has its
    own ids (neg=0, pos=1) that are not the adapter's (pos=2)."""
    from peftkit.cli import main

    base = tmp_path_factory.mktemp("eval-train")
    rows = make_rows(150) + [{"text": "the film was a movie and the plot", "label": "neutral"}] * 50
    data = _write_csv(base / "train.csv", rows)
    out = str(base / "run")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "run",
                "--strategy",
                "head_only",
                "--model",
                tiny_model_dir("bert"),
                "--dataset",
                data,
                "--epochs",
                "3",
                "--max-length",
                "16",
                "--output-dir",
                out,
            ]
        )
    assert done.value.code == 0
    return out


@pytest.fixture(scope="module")
def eval_csv(tmp_path_factory) -> str:
    """20 positive and 10 negative unseen rows, under other column names: the majority class is pos."""
    rows = make_rows(80, seed=7)
    rows = [r for r in rows if r["label"] == "pos"][:20] + [r for r in rows if r["label"] == "neg"][:10]
    return _write_csv(tmp_path_factory.mktemp("eval-data") / "unseen.csv", rows, ("sentence", "sentiment"))


def test_eval_matches_predict_row_by_row_with_a_majority_baseline_and_a_png(
    three_label_run, eval_csv, run_cli, tmp_path
) -> None:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from peftkit import api

    out = tmp_path / "eval"
    # a run directory works as --adapter: its adapter/ is used
    code, stdout, err = run_cli("eval", "--adapter", three_label_run, "--dataset", eval_csv, "--output", str(out))
    assert code == 0, err
    result = json.load(open(out / "metrics.json"))
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["examples"] == 30 and result["label_names"] == ["neg", "neutral", "pos"]

    with open(eval_csv) as fh:
        rows = list(csv.DictReader(fh))
    predicted = api.predict(
        api.PredictConfig(adapter=os.path.join(three_label_run, "adapter"), inputs=[r["sentence"] for r in rows])
    )
    names = ["neg", "neutral", "pos"]
    y = [names.index(r["sentiment"]) for r in rows]
    p = [row["label_id"] for row in predicted]
    assert result["metrics"]["accuracy"] == pytest.approx(sum(a == b for a, b in zip(y, p)) / 30)
    assert result["metrics"]["f1_macro"] == pytest.approx(
        f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert result["confusion_matrix"] == confusion_matrix(y, p, labels=[0, 1, 2]).tolist()
    precision, recall, _, support = precision_recall_fscore_support(y, p, labels=[0, 1, 2], zero_division=0)
    assert [c["support"] for c in result["per_class"]] == [10, 0, 20] == list(support)
    assert [c["precision"] for c in result["per_class"]] == pytest.approx(list(precision))
    assert [c["recall"] for c in result["per_class"]] == pytest.approx(list(recall))
    # always "pos": 20 of 30 right; F1 of pos 2*20/(30+20) = 0.8, of neg and neutral 0, over three labels
    assert result["baseline"]["predicts"] == "pos"
    assert result["baseline"]["accuracy"] == pytest.approx(20 / 30)
    assert result["baseline"]["f1_macro"] == pytest.approx(0.8 / 3)
    assert "baseline, majority class (always 'pos'): accuracy 0.6667" in stdout
    assert "true \\ predicted" in stdout and "confusion_matrix.png" in stdout
    better = result["metrics"]["accuracy"] > 20 / 30
    assert ("warning: the adapter is not better than the majority class baseline" in err) is not better
    assert result["trained_on_it"] is False and "was trained on" not in err


def test_eval_on_the_training_file_says_the_figures_overstate(three_label_run, run_cli) -> None:
    train_csv = os.path.join(os.path.dirname(three_label_run), "train.csv")
    code, _, err = run_cli(
        "eval", "--adapter", three_label_run, "--dataset", train_csv, "--max-eval-samples", "20", "--json"
    )
    assert code == 0, err
    assert "warning: the adapter was trained on" in err and "overstate" in err


def test_eval_refuses_a_label_the_adapter_does_not_know(three_label_run, run_cli, tmp_path) -> None:
    data = _write_csv(tmp_path / "odd.csv", make_rows(10) + [{"text": "a dull film", "label": "mixed"}])
    out = tmp_path / "eval"
    code, stdout, err = run_cli("eval", "--adapter", three_label_run, "--dataset", data, "--output", str(out))
    assert code == 2 and stdout == ""
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: label 'mixed' of {data!r} is not one the adapter was trained on; its labels: neg, neutral, pos"
    )
    assert "loading adapter" not in err  # refused from the data and the adapter's metadata, before the model loads
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_eval_refuses_an_existing_output_before_evaluating(three_label_run, eval_csv, run_cli, tmp_path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code, _, err = run_cli("eval", "--adapter", three_label_run, "--dataset", eval_csv, "--output", str(out))
    assert code == 2 and "already exists; use --overwrite" in err and "evaluating" not in err
    assert (out / "metrics.json").read_text() == "{}"
    code, _, err = run_cli(
        "eval",
        "--adapter",
        three_label_run,
        "--dataset",
        eval_csv,
        "--output",
        str(out),
        "--overwrite",
        "--max-eval-samples",
        "12",
        "--json",
    )
    assert code == 0, err
    assert json.load(open(out / "metrics.json"))["examples"] == 12


def test_the_warning_says_when_an_adapter_does_no_better_than_the_baseline() -> None:
    from peftkit.evaluation import EvalResult

    def result(accuracy: float) -> EvalResult:
        return EvalResult(
            "a",
            "d.csv",
            "sequence-classification",
            "lora",
            10,
            ["neg", "pos"],
            {"accuracy": accuracy, "f1_macro": 0.4},
            {"name": "majority class", "predicts": "pos", "accuracy": 0.6, "f1_macro": 0.375},
            headline=["accuracy", "f1_macro"],
        )

    assert result(0.6).warning == (
        "the adapter is not better than the majority class baseline on accuracy "
        "(0.6000 vs 0.6000 for always answering 'pos')"
    )
    assert result(0.61).warning is None
    no_baseline = result(0.1)
    no_baseline.baseline = None
    assert no_baseline.warning is None and no_baseline.to_dict()["warning"] is None


def test_eval_of_a_causal_lm_adapter_reports_exact_match_beside_the_majority_answer(
    run_cli, tiny_model_dir, tmp_path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import _build_tokenizer, _config

    torch.manual_seed(0)
    tok = _build_tokenizer()
    config = _config("llama", len(tok), tok.pad_token_id)
    config.eos_token_id = tok.eos_token_id
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    train = _write_csv(tmp_path / "train.csv", make_rows(60))
    code, _, err = run_cli(
        "run",
        "--task",
        "causal-lm",
        "--strategy",
        "head_only",
        "--model",
        str(tmp_path / "lm"),
        "--dataset",
        train,
        "--epochs",
        "1",
        "--max-length",
        "24",
        "--max-eval-samples",
        "4",
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert code == 0, err
    rows = make_rows(9, seed=3)  # 5 pos, 4 neg
    data = _write_csv(tmp_path / "unseen.csv", rows)
    code, stdout, err = run_cli("eval", "--adapter", str(tmp_path / "run"), "--dataset", data, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["task"] == "causal-lm" and result["examples"] == 9 and result["confusion_matrix"] is None
    assert result["metrics"]["perplexity"] > 1 and 0 <= result["metrics"]["exact_match"] <= 1
    assert result["baseline"] == {
        "name": "majority answer",
        "predicts": "pos",
        "exact_match": pytest.approx(5 / 9),
        "accuracy": pytest.approx(5 / 9),
    }


def test_eval_takes_a_small_file_of_a_single_class_whole(three_label_run, run_cli, tmp_path) -> None:
    """Four rows of one label: no train/validation/test split to make, no two classes to need."""
    rows = [r for r in make_rows(8, seed=2) if r["label"] == "neg"]
    data = _write_csv(tmp_path / "negatives.csv", rows)
    code, stdout, err = run_cli("eval", "--adapter", three_label_run, "--dataset", data, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["examples"] == 4 and [c["support"] for c in result["per_class"]] == [4, 0, 0]
    assert result["baseline"]["predicts"] == "neg" and result["baseline"]["accuracy"] == 1.0
    assert "warning: the adapter is not better than" in err  # nothing beats always right
