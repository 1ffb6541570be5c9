"""Pinned numbers (issue 31, item 1): every built-in strategy trained two epochs on a tiny BERT
(classification) and a tiny Llama (causal LM), each epoch's training loss and validation figures
equal to the values stored in ``tests/data/stored_losses.json`` at rtol 1e-5, in torchtune's style.

A restructure that changes no arithmetic leaves them all equal; a change that moves a number fails
here, naming the run, the epoch and the figure. When a change is meant to move them (a new default,
a new dependency in the lock), rewrite the file and say why in the commit:

    PEFTKIT_STORE_LOSSES=1 .venv/bin/python -m pytest tests/test_stored_losses.py

(that run writes the file and skips its tests: it checks nothing). The file records the versions
that produced it; the figures are those of this machine's CPU kernels, so another CPU family may
differ in the last digits.
"""

from __future__ import annotations

import json
import os

import pytest

STORED = os.path.join(os.path.dirname(__file__), "data", "stored_losses.json")
STRATEGIES = ("full", "lora", "adapter", "prefix", "gradual_unfreeze", "head_only")
# settings that make each strategy do its own thing within two short epochs (as tests/test_shipping.py)
EXTRA = {"gradual_unfreeze": ["--set", "unfreeze_every_steps=5"], "prefix": ["--set", "num_virtual_tokens=4"]}
RTOL = 1e-5


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _figures(tmp_path, model: str, task: str, data: str, strategy: str) -> list[dict[str, float]]:
    """Per epoch: the training loss and every validation figure of one two-epoch run."""
    from peftkit.cli import main

    out = str(tmp_path / f"{task}-{strategy}")
    with pytest.raises(SystemExit) as done:
        main(
            [
                "run",
                "-s",
                strategy,
                "--model",
                model,
                "--task",
                task,
                "--dataset",
                data,
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--max-length",
                "16",
                "--lr",
                "5e-3",
                "--max-eval-samples",
                "40",
                "--output-dir",
                out,
                *EXTRA.get(strategy, []),
            ]
        )
    assert done.value.code in (0, None), f"{task} {strategy}: exit {done.value.code}"
    with open(os.path.join(out, "metrics.json")) as fh:
        history = json.load(fh)["history"]
    return [
        {k: v for k, v in e.items() if k == "train_loss" or (k.startswith("validation_") and v is not None)}
        for e in history
    ]


# run name -> (tiny model fixture, argument, task, data fixture)
MODELS = {
    "bert/sequence-classification": ("tiny_model_dir", "bert", "sequence-classification", "tiny_csv"),
    "llama/causal-lm": ("tiny_causal_dir", None, "causal-lm", "pairs_csv"),
}
RUNS = [f"{m}/{s}" for m in MODELS for s in STRATEGIES]


def _run_figures(request, tmp_path, run: str) -> list[dict[str, float]]:
    prefix, strategy = run.rsplit("/", 1)
    model_fixture, arch, task, data_fixture = MODELS[prefix]
    model = request.getfixturevalue(model_fixture)
    return _figures(tmp_path, model(arch) if arch else model, task, request.getfixturevalue(data_fixture), strategy)


@pytest.fixture(scope="module")
def stored(request, tmp_path_factory) -> dict:
    """The stored figures; with PEFTKIT_STORE_LOSSES=1, every run measured and written instead."""
    if os.environ.get("PEFTKIT_STORE_LOSSES") == "1":
        tmp = tmp_path_factory.mktemp("stored")
        runs = {run: _run_figures(request, tmp, run) for run in RUNS}
        os.makedirs(os.path.dirname(STORED), exist_ok=True)
        with open(STORED + ".tmp", "w") as fh:
            json.dump({"versions": _versions(), "runs": runs}, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(STORED + ".tmp", STORED)
        pytest.skip(f"PEFTKIT_STORE_LOSSES=1: wrote {STORED}; nothing was checked")
    with open(STORED) as fh:
        return json.load(fh)


# Each test trains its own run, not a module fixture training all twelve: under pytest-xdist every
# worker that gets one of these tests builds the module fixture again, so two workers trained all
# twelve runs twice (tests/test_stored_losses.py -n 2: 28 s, each worker's setup 19 s).
@pytest.mark.parametrize("run", RUNS)
def test_each_epochs_figures_equal_the_stored_ones(run, stored, request, tmp_path) -> None:
    expected, got = stored["runs"][run], _run_figures(request, tmp_path, run)
    assert len(got) == len(expected) == 2, f"{run}: {len(got)} epochs, stored {len(expected)}"
    for epoch, (want, have) in enumerate(zip(expected, got), 1):
        assert set(have) == set(want), f"{run} epoch {epoch}: figures {sorted(have)}, stored {sorted(want)}"
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=RTOL, abs=1e-12), (
                f"{run} epoch {epoch} {key}: {have[key]!r}, stored {value!r} (stored with {stored['versions']})"
            )
