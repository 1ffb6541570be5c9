"""The shared training loop: head-only's feature cache, best-epoch restore, early stopping."""

from __future__ import annotations

import pytest
from transformers import set_seed

from peftkit.config import RunConfig
from peftkit.data import load_labelled_data
from peftkit.models import load_classifier, load_tokenizer
from peftkit.strategies.base import TaskSpec
from peftkit.tasks.sequence_classification import classification_metrics
from peftkit.train import fit, resolve


def _fit(model_dir: str, data_path: str, **overrides):
    cfg = RunConfig(model=model_dir, dataset=data_path, max_length=16, **overrides)
    run = resolve(cfg)
    data = load_labelled_data(data_path, seed=cfg.seed)
    tok = load_tokenizer(model_dir)
    set_seed(cfg.seed)
    base = load_classifier(model_dir, data.label_names, tok.pad_token_id)
    task = TaskSpec(num_labels=len(data.label_names), label_names=tuple(data.label_names))
    model = run.strategy.prepare(base, task)
    logs: list[str] = []
    return fit(run, model, tok, data, task, logs.append), logs


def test_head_only_runs_the_backbone_in_the_first_epoch_only(tiny_model_dir, tiny_csv) -> None:
    one, _ = _fit(tiny_model_dir("bert"), tiny_csv, strategy="head_only", epochs=1, batch_size=16)
    five, _ = _fit(tiny_model_dir("bert"), tiny_csv, strategy="head_only", epochs=5, batch_size=16)
    # epoch 1: 10 train batches + 1 validation batch, then 1 test batch; epochs 2-5 add nothing
    assert one.model.backbone_calls == 12
    assert five.model.backbone_calls == one.model.backbone_calls
    assert len(five.history) == 5


def test_best_epoch_restored_and_early_stopping(tiny_model_dir, tiny_csv, capsys) -> None:
    # a learning rate this large makes later epochs worse than the best one, so the loop must
    # restore it, and patience 1 stops after the first epoch without a gain
    from peftkit.env import log_to_stderr

    log_to_stderr()  # the console of peftkit's own process (the CLI), where the epoch lines are printed
    outcome, logs = _fit(
        tiny_model_dir("bert"), tiny_csv, strategy="full", epochs=8, batch_size=16, lr=0.5, early_stopping_patience=1
    )
    history = outcome.history
    best = max(h["validation_accuracy"] for h in history)
    assert outcome.metrics.validation["accuracy"] == best
    if outcome.metrics.best_epoch != len(history):
        assert any(line.startswith("restored the best epoch") for line in logs)
    assert len(history) < 8 and any(line.startswith("early stopping") for line in logs)
    # issue 15: early stopping was in train.log only; the console shows it with the epoch lines
    console = capsys.readouterr().err
    assert f"early stopping after epoch {len(history)}/8: no better validation accuracy" in console
    # and each epoch's rate as format_rate words it (0.6 examples/s once read "1")
    from peftkit.metrics import format_rate

    for h in history:
        assert f"s, {format_rate(h['examples_per_second'])} examples/s)" in console


@pytest.mark.parametrize(
    "rate,text",
    [
        (0.6, "0.60"),
        (0.62, "0.62"),
        (0.048, "0.048"),
        (6.14, "6.1"),
        (9.96, "10"),
        (10.4, "10"),
        (115.5, "116"),
        (0.0, "0"),
    ],
)
def test_small_rates_keep_two_significant_digits(rate, text) -> None:
    from peftkit.metrics import format_rate

    assert format_rate(rate) == text


def test_gradient_accumulation_counts_optimizer_steps(tiny_model_dir, tiny_csv) -> None:
    outcome, _ = _fit(tiny_model_dir("bert"), tiny_csv, strategy="lora", epochs=1, batch_size=8, grad_accumulation=4)
    assert outcome.metrics.train_examples == 160


def test_macro_f1_matches_definition() -> None:
    import torch

    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([0, 1, 1, 1, 2, 0])
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0 = 2*1/(2+1+1) = .5, c1 = 2*2/(4+0+1) = .8, c2 = 2*1/(2+1+0) = .6667
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_unfrozen_groups_join_the_running_optimizer(tiny_model_dir, tiny_csv, monkeypatch) -> None:
    """gradual_unfreeze: groups are added to the same optimizer, whose state for the head is kept."""
    import torch

    made = []
    real_adamw = torch.optim.AdamW

    class Recording(real_adamw):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    outcome, logs = _fit(
        tiny_model_dir("bert"),
        tiny_csv,
        strategy="gradual_unfreeze",
        epochs=1,
        batch_size=16,
        strategy_options={"unfreeze_every_steps": 2},
    )
    assert len(made) == 1, "one optimizer for the whole run"
    opt = made[0]
    steps = 10  # 160 examples / 16
    head = [p for g in opt.param_groups[:2] for p in g["params"]]  # the first groups: head (+ pooler)
    assert all(int(opt.state[p]["step"]) == steps for p in head), "head state was reset"
    # head, block 1, block 0, embeddings: 3 groups joined (each split into decay / no-decay)
    assert sum(line.startswith("optimizer: +") for line in logs) == 6
    rates = sorted({g["base_lr"] for g in opt.param_groups}, reverse=True)
    assert rates == pytest.approx([1e-3 / 2.6**k for k in range(4)])


def test_in_split_order_puts_examples_back_by_their_key() -> None:
    from peftkit.tasks.base import in_split_order

    # evaluated by length (keys 12, 10, 13, 11), put back in the split's order (10, 11, 12, 13)
    assert in_split_order([12, 10, 13, 11], [True, False, True, True]) == [0, 1, 1, 1]


def test_a_run_records_which_test_examples_it_got_right_in_split_order(tiny_model_dir, tmp_path) -> None:
    """Texts of varying length (so evaluation, which runs by length, meets them out of order) and
    a fifth of the labels flipped (so some answers are wrong however well it learned): the record
    has one entry per test example, its mean is the accuracy, and entry i is test example i."""
    import csv
    import random

    import torch

    from conftest import FILLER, make_rows

    rng = random.Random(1)
    rows = [
        {
            "text": r["text"] + " " + " ".join(rng.choices(FILLER, k=rng.randrange(8))),
            "label": r["label"] if rng.random() > 0.2 else ("neg" if r["label"] == "pos" else "pos"),
        }
        for r in make_rows(200)
    ]
    path = tmp_path / "varied.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    model_dir = tiny_model_dir("bert")
    outcome, _ = _fit(model_dir, str(path), strategy="full", epochs=1, batch_size=16, eval_batch_size=8)
    record = outcome.metrics.per_example_correct
    test = load_labelled_data(str(path), seed=0).splits["test"]
    assert record is not None and len(record) == len(test)
    assert record.count("1") / len(record) == pytest.approx(outcome.metrics.test["accuracy"])
    assert "0" in record and "1" in record
    # the trained model, example by example in the split's order
    tok = load_tokenizer(model_dir)
    model = outcome.model.eval()
    expected = ""
    with torch.no_grad():
        for text, label in zip(test["text"], test["label"]):
            batch = dict(tok([text], truncation=True, max_length=16, return_tensors="pt"))
            expected += "1" if int(model(**batch).logits.argmax()) == label else "0"  # full: the model itself
    assert record == expected
