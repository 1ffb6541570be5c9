"""Padding-free packing (``--packing``, peftkit.packing): rows of several whole examples, each
example's loss equal to its unpacked loss, far less padding; refused where it does not apply."""

from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

from peftkit.packing import IGNORE, collate_packed, first_fit_decreasing

from conftest import _build_tokenizer, _config, make_rows


def test_first_fit_decreasing_fills_rows_and_keeps_every_example_once() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    rows = first_fit_decreasing(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert rows == [[1, 6], [5, 4], [3, 2], [0, 7]]  # 9+1, 8+2, 7+3, 5+4: 39 tokens in the fewest rows, 4
    assert first_fit_decreasing(lengths, 10) == rows, "the same data packs the same"
    with pytest.raises(ValueError, match="more than a row's 4"):
        first_fit_decreasing([5], 4)


@pytest.fixture(scope="module")
def varied_csv(tmp_path_factory) -> str:
    """Prompt / response pairs of varied length (1 to 12 words of prompt, 1 to 6 of response)."""
    rng = random.Random(3)
    words = [row["text"].split() for row in make_rows(120, seed=5)]
    path = tmp_path_factory.mktemp("varied") / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        writer.writeheader()
        for w in words:
            writer.writerow(
                {"prompt": " ".join((w * 3)[: rng.randint(1, 12)]), "response": " ".join((w * 2)[: rng.randint(1, 6)])}
            )
    return str(path)


def _per_example_losses_unpacked(model, task, tok, train) -> dict[int, float]:
    batch = task.collate(tok)([train[i] for i in range(len(train))])
    logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "example_key")}).logits
    sums, _ = task._token_losses(logits, batch["labels"])
    return {int(k): float(s) for k, s in zip(batch["example_key"], sums)}


def _per_example_losses_packed(model, tok, packed) -> dict[int, float]:
    """Each example's summed token loss in the packed rows: its segment is where its positions
    restart at 0 (a row's trailing padding is a segment of its own, with no labels)."""
    batch = collate_packed([packed[i] for i in range(len(packed))], tok.pad_token_id)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    target = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0), reduction="none")
    token_loss = token_loss * (target != IGNORE)
    keys = iter(int(k) for k in batch["example_key"])
    out: dict[int, float] = {}
    for r, row in enumerate(packed):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            # token t's loss sits at t-1 (position t-1 predicts it); the first one's was dropped
            out[next(keys)] = float(token_loss[r, max(0, a - 1) : b - 1].sum())
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_packed_example_has_its_unpacked_loss(arch, varied_csv) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit.config import Levers, RunConfig
    from peftkit.tasks import get_task

    torch.manual_seed(0)
    tok = _build_tokenizer()
    config = _config(arch, len(tok), tok.pad_token_id)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    model = AutoModelForCausalLM.from_config(config).eval()
    task = get_task("causal-lm")
    cfg = RunConfig(task="causal-lm", dataset=varied_csv, max_length=40, max_train_samples=40)
    data = task.load_data(cfg)
    plain = task.encode(data, tok, cfg)["train"]
    packed = task.encode(data, tok, RunConfig(**{**vars(cfg), "levers": Levers(packing=True)}))["train"]
    assert sorted(k for row in packed["example_key"] for k in row) == sorted(plain["example_key"])
    assert len(packed) < len(plain) / 2, "short examples: several to a row"
    assert max(packed["length"]) <= 40
    with torch.no_grad():
        alone = _per_example_losses_unpacked(model, task, tok, plain)
        together = _per_example_losses_packed(model, tok, packed)
    assert alone.keys() == together.keys()
    for key, loss in alone.items():
        assert together[key] == pytest.approx(loss, rel=1e-4, abs=1e-4), key


def _metrics(out: str) -> dict:
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


def test_a_packed_run_trains_on_every_example_with_less_padding(tiny_causal_dir, varied_csv, run_cli, tmp_path) -> None:
    common = [
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_causal_dir,
        "--dataset",
        varied_csv,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "40",
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "8",
    ]
    code, _, err = run_cli(*common, "--output-dir", str(tmp_path / "padded"))
    assert code == 0, err
    code, _, err = run_cli(*common, "--packing", "--output-dir", str(tmp_path / "packed"))
    assert code == 0, err
    padded, packed = _metrics(str(tmp_path / "padded")), _metrics(str(tmp_path / "packed"))
    assert packed["packing"] is True and padded["packing"] is False
    assert packed["train_examples"] == padded["train_examples"] == 2 * 64, "every example, every epoch"
    assert packed["train_tokens"] == padded["train_tokens"]
    assert packed["optimizer_steps"] < padded["optimizer_steps"], "several examples a row: fewer batches"
    assert packed["padding_fraction"] < padded["padding_fraction"]
    assert 0 <= packed["padding_fraction"] < 0.3


def test_packing_is_refused_for_a_task_whose_examples_do_not_pack(tiny_model_dir, tiny_csv, run_cli, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--packing",
        "--output-dir",
        str(out),
    )
    assert code == 2 and not out.exists()
    assert stderr.strip().splitlines()[-1] == (
        "error: --packing is for tasks whose examples are token sequences of varied length (causal-lm); "
        "sequence-classification cannot pack its examples: drop --packing"
    )


def test_the_planner_measures_packed_rows(tmp_path) -> None:
    """A packed row learns every position: with the plain loss its vocabulary-wide logits are kept
    for all of them, which a short answer's batch does not have; the chunked loss does not keep them.
    (A vocabulary of 4,096: the logits must outweigh a tiny model's blocks to be seen.)"""
    from transformers import AutoModelForCausalLM

    from peftkit.config import Levers
    from peftkit.planner import PlanSettings, load_config, plan_strategy

    config = _config("llama", 4096, 0)
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    config = load_config(str(tmp_path))
    settings = dict(
        model=str(tmp_path), strategies=["lora"], task="causal-lm", batch_size=8, max_length=16, device="cuda"
    )  # from this CPU: the bytes autograd saves, exact
    answers = plan_strategy(config, "lora", PlanSettings(**settings, levers=Levers(loss="plain")))
    packed = plan_strategy(config, "lora", PlanSettings(**settings, levers=Levers(loss="plain", packing=True)))
    assert packed.status == "ok" and packed.activations > answers.activations
    chunked = plan_strategy(config, "lora", PlanSettings(**settings, levers=Levers(packing=True)))
    assert chunked.activations < packed.activations
