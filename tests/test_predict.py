"""`peftkit predict` (and inspect, merge) as issue 15 found them: a model made for another task,
run directories, misspelt names, label matching of generated answers, and predicting at scale
(input files, stdin, output files, batches, generation options, chat templates). Tiny models only."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from conftest import make_rows

SHIPPED = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters", "minilm-rotten-tomatoes-lora"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_csv, tiny_causal_dir):
    """Run directories of short lora runs: a tiny BERT classifier, a tiny causal LM on prompt /
    response pairs and one on labelled data (phrased as completions)."""
    from peftkit.cli import main

    root = tmp_path_factory.mktemp("predict-runs")
    pairs = root / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(
            {"prompt": r["text"], "response": "good" if r["label"] == "pos" else "bad"} for r in make_rows(64, seed=1)
        )
    common = ["--strategy", "lora", "--epochs", "1", "--batch-size", "16", "--max-length", "24", "--lr", "1e-2"]
    out = {}
    for name, args in {
        "classifier": ["--model", tiny_model_dir("bert"), "--dataset", tiny_csv],
        "pairs": ["--model", tiny_causal_dir, "--dataset", str(pairs)],
        "labelled": [
            "--task",
            "causal-lm",
            "--model",
            tiny_causal_dir,
            "--dataset",
            tiny_csv,
            "--max-train-samples",
            "64",
        ],
    }.items():
        out[name] = str(root / name)
        with pytest.raises(SystemExit) as done:
            main(["run", *common, *args, "--output-dir", out[name]])
        assert done.value.code in (0, None)
    return out


def _rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# -- finding 2: a model made for another task --------------------------------------------------


def test_a_model_made_for_another_task_is_refused_as_such(run_cli, runs, tiny_causal_dir) -> None:
    code, _, err = run_cli("predict", "--adapter", SHIPPED, "--model", "vit-tiny", "hi")
    assert (
        code == 2
        and "is a sequence-classification adapter, but model 'vit-tiny' is made for image-classification" in err
    )
    assert "hub copy None" not in err and "'minilm'" in err, "says what would be accepted"
    # a causal-lm adapter needs a model that generates, not a classifier's base
    code, _, err = run_cli("predict", "--adapter", runs["pairs"], "--model", "minilm", "hi")
    assert code == 2 and "is a causal-lm adapter, but model 'minilm' is made for sequence-classification" in err
    # a sequence classifier may sit on a causal LM's backbone: not refused for the task
    from peftkit.inference import check_model_task
    from peftkit.tasks import get_task

    check_model_task(get_task("sequence-classification"), tiny_causal_dir, "adapter", "base")


def test_an_offline_copy_that_fails_to_load_is_not_called_uninstalled(monkeypatch, tmp_path) -> None:
    import dataclasses

    from peftkit import models
    from peftkit.errors import PeftkitError

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    no_tokenizer = dataclasses.replace(
        models.EMBEDDED_MODELS["vit-tiny"], subdir="vit-tiny-test", build=models.EMBEDDED_MODELS["vit-tiny"].build
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, "vit-tiny", no_tokenizer)
    with pytest.raises(PeftkitError) as caught:
        models.load_tokenizer("vit-tiny")  # an image model has no tokenizer
    message = str(caught.value)
    assert message.startswith("cannot load model 'vit-tiny' from its offline copy")
    assert "None" not in message and "install" not in message


# -- finding 6: generated answers match labels loosely -------------------------------------------


def test_generated_labels_match_case_and_punctuation_aside(run_cli, runs) -> None:
    from peftkit.tasks.causal_lm import matching_label

    names = ["negative", "positive"]
    assert [
        matching_label(a, names)
        for a in (" Positive", " positive.", "NEGATIVE!\n", " \u201cNegative\u201d", "'positive' .")
    ] == ["positive", "positive", "negative", "negative", "positive"]
    assert [matching_label(a, names) for a in (" posit", "", " positive review", "...")] == [None] * 4
    code, stdout, err = run_cli("predict", "--adapter", runs["labelled"], "good fun", "dull weak")
    assert code == 0, err
    for row in _rows(stdout):
        assert row["label"] == matching_label(row["completion"], ["neg", "pos"])
        assert row["prompt"] == row["text"] + "\nAnswer:", "an adapter trained on labelled data phrases as it learned"


# -- finding 14: run directories, "did you mean" -------------------------------------------------


def test_a_run_directory_is_taken_for_its_adapter(run_cli, runs, tmp_path) -> None:
    run = runs["classifier"]
    code, stdout, err = run_cli("predict", "--adapter", run, "a good film")
    assert code == 0, err
    assert _rows(stdout)[0]["label"] in ("neg", "pos")
    code, stdout, err = run_cli("inspect", run)
    assert code == 0 and "strategy          lora" in stdout, err
    code, _, err = run_cli("merge", "--adapter", run, "--output", str(tmp_path / "merged"))
    assert code == 0 and os.path.exists(tmp_path / "merged" / "config.json"), err
    code, _, err = run_cli("inspect", str(tmp_path))
    assert code == 2 and "is not an adapter directory" in err and "run directory" in err


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--strategy", "lorra"], "unknown strategy 'lorra' (did you mean 'lora'?); available:"),
        (["--strategy", "head-onyl"], "(did you mean 'head_only'?)"),
        (["--task", "causal-llm"], "unknown task 'causal-llm' (did you mean 'causal-lm'?)"),
        (
            ["--strategy", "lora", "--set", "alhpa=8"],
            "unknown option 'alhpa' (did you mean 'alpha'?) for strategy 'lora'",
        ),
    ],
)
def test_misspelt_names_get_a_suggestion(args, expected, run_cli, tmp_path) -> None:
    code, _, err = run_cli("run", *args, "--output-dir", str(tmp_path / "run"))
    assert code == 2 and expected in err, err


def test_a_misspelt_config_key_gets_a_suggestion(run_cli, tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("strategy: lora\nepoch: 2\n")
    code, _, err = run_cli("run", "--config", str(path))
    assert code == 2 and "unknown key 'epoch' (did you mean 'epochs'?)" in err, err


# -- finding 16: predict at scale ----------------------------------------------------------------


def test_inputs_from_a_csv_answers_to_a_csv(run_cli, runs, tmp_path) -> None:
    source = tmp_path / "in.csv"
    source.write_text('id,sentence\n1,a good and charming film\n2,"dull, boring plot"\n3,superb\n')
    out = tmp_path / "answers.csv"
    code, stdout, err = run_cli(
        "predict", "--adapter", runs["classifier"], "--input", str(source), "--output", str(out), "--batch-size", "2"
    )
    assert code == 0 and stdout == "" and "wrote 3 answers" in err, err
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["text"] for r in rows] == ["a good and charming film", "dull, boring plot", "superb"]
    assert all(len(json.loads(r["probabilities"])) == 2 for r in rows)
    before = out.read_text()
    code, _, err = run_cli("predict", "--adapter", runs["classifier"], "--input", str(source), "--output", str(out))
    assert code == 2 and "already exists; pass --overwrite" in err and out.read_text() == before
    code, _, err = run_cli(
        "predict", "--adapter", runs["classifier"], "--input", str(source), "--output", str(out), "--overwrite"
    )
    assert code == 0, err


def test_inputs_from_jsonl_and_stdin(run_cli, runs, tmp_path, monkeypatch) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"review": "a good film", "n": 1}\n\n{"review": "dull", "n": 2}\n')
    out = tmp_path / "answers.jsonl"
    code, _, err = run_cli(
        "predict",
        "--adapter",
        runs["classifier"],
        "--input",
        str(source),
        "--text-column",
        "review",
        "--output",
        str(out),
    )
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == ["a good film", "dull"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a good film\n\n  \ndull boring\n"))
    code, stdout, err = run_cli("predict", "--adapter", runs["classifier"], "--input", "-")
    assert code == 0, err
    assert [r["text"] for r in _rows(stdout)] == ["a good film", "dull boring"], "one input per non-blank line"


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "no inputs: give texts, or --input FILE"),
        (["--input", "{txt}", "hi"], "either as texts or with --input FILE (- for stdin), not both"),
        (["--input", "{dir}/in.xlsx"], "unknown extension; accepted: .csv, .tsv, .jsonl, .txt"),
        (["--input", "{dir}/absent.txt"], "input file not found"),
        (["--input", "{csv}"], "no text column found (tried text, sentence"),
        (["--input", "{csv}", "--text-column", "body"], "text column 'body' not found; columns: id, words"),
        (["--input", "{txt}", "--text-column", "x"], "does not apply to"),
        (
            ["--input", "{txt}", "--output", "{dir}/out.parquet"],
            "output file '{dir}/out.parquet' has an unknown extension",
        ),
        (["--input", "{txt}", "--output", "{dir}/nowhere/out.csv"], "does not exist"),
        (["--max-new-tokens", "4", "hi"], "--max-new-tokens: only for adapters that generate text (causal-lm)"),
        (["--batch-size", "0", "hi"], "batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_predict_inputs_are_one_line_before_anything_loads(args, expected, run_cli, runs, tmp_path) -> None:
    (tmp_path / "in.txt").write_text("a good film\n")
    (tmp_path / "in.csv").write_text("id,words\n1,a good film\n")
    fill = {"txt": str(tmp_path / "in.txt"), "csv": str(tmp_path / "in.csv"), "dir": str(tmp_path)}
    args = [a.format(**fill) for a in args]
    code, stdout, err = run_cli("predict", "--adapter", runs["classifier"], *args)
    assert code == 2 and expected.format(**fill) in err and "Traceback" not in err, err
    assert stdout == "" and sorted(os.listdir(tmp_path)) == ["in.csv", "in.txt"], "nothing written"


def test_causal_lm_raw_prompts_new_tokens_and_seeded_sampling(run_cli, runs) -> None:
    adapter = runs["pairs"]
    code, stdout, err = run_cli("predict", "--adapter", adapter, "--max-new-tokens", "3", "the film is", "a plot")
    assert code == 0, err
    rows = _rows(stdout)
    assert [r["prompt"] for r in rows] == ["the film is", "a plot"], "no review template: not trained on one"
    assert all(len(r["completion"].split()) <= 3 for r in rows)
    sample = (
        "predict",
        "--adapter",
        adapter,
        "--do-sample",
        "--temperature",
        "1.5",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "6",
        "--seed",
        "3",
        "the film is",
    )
    first, second = run_cli(*sample), run_cli(*sample)
    assert first[0] == 0 and first[1] == second[1], "seeded: the same command samples the same answers"
    code, _, err = run_cli("predict", "--adapter", adapter, "--temperature", "0.7", "hi")
    assert code == 2 and "temperature only applies when sampling; add do_sample (--do-sample)" in err
    code, _, err = run_cli("predict", "--adapter", adapter, "--chat", "hi")
    assert code == 2 and "has no chat template; leave out --chat" in err


def test_chat_puts_each_prompt_in_the_template(tiny_causal_dir) -> None:
    from transformers import AutoTokenizer

    from peftkit.tasks.generation import encode_prompts

    tok = AutoTokenizer.from_pretrained(tiny_causal_dir)
    tok.chat_template = (
        "{% for m in messages %}[CLS] {{ m['content'] }} [SEP]{% endfor %}{% if add_generation_prompt %} the{% endif %}"
    )
    [ids] = encode_prompts(tok, ["good film"], chat=True, model="tiny")
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "good", "film", "[SEP]", "the"]
    [plain] = encode_prompts(tok, ["good film"], chat=False, model="tiny")
    assert tok.convert_ids_to_tokens(plain) == ["[CLS]", "good", "film", "[SEP]"]


def test_api_predict_takes_the_same_options(runs, tmp_path) -> None:
    from peftkit import api

    source = tmp_path / "in.txt"
    source.write_text("a good film\ndull\n")
    out = tmp_path / "out.jsonl"
    rows = api.predict(
        api.PredictConfig(
            adapter=runs["pairs"], input_file=str(source), output=str(out), max_new_tokens=2, batch_size=1
        )
    )
    assert [r["text"] for r in rows] == ["a good film", "dull"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
