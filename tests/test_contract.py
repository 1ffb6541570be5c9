"""The strategy contract, checked for every registered strategy on several tiny architectures.

Parametrized over the registry itself, so a strategy is tested the moment it is registered:
prepare -> a few training steps -> gradients reach exactly the declared parameters and nothing
else moves -> save the adapter -> load it onto a fresh base -> identical logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers import set_seed

from peftkit import registry
from peftkit.adapter_io import read_metadata, save_adapter
from peftkit.config import RunConfig
from peftkit.fingerprint import backbone_digests
from peftkit.loop import make_accelerator, torch_param_groups, train_step
from peftkit.models import load_classifier, load_tokenizer
from peftkit.strategies.base import TaskSpec

from conftest import ARCHITECTURES, make_rows

LABELS = ["neg", "pos"]
TASK = TaskSpec(num_labels=2, label_names=tuple(LABELS))


def _batch(tokenizer, n: int = 8) -> dict[str, torch.Tensor]:
    rows = make_rows(n, seed=1)
    batch = dict(tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([LABELS.index(r["label"]) for r in rows])
    batch["example_key"] = torch.arange(n)
    return batch


def _step_loss(strategy):
    """What a training step computes (``Task.step_loss``): the strategy's logits and the loss."""
    return lambda model, batch: F.cross_entropy(strategy.forward(model, batch), batch["labels"])


@contextmanager
def _gradients_reaching(model: torch.nn.Module) -> Iterator[set[str]]:
    """The names of the parameters a gradient was accumulated into while the block ran (a step
    zeroes the gradients it used, so they are recorded as they arrive)."""
    reached: set[str] = set()
    hooks = [
        p.register_post_accumulate_grad_hook(lambda _p, n=n: reached.add(n))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    try:
        yield reached
    finally:
        for hook in hooks:
            hook.remove()


def _fresh(strategy_cls, model_dir: str, seed: int):
    tok = load_tokenizer(model_dir)
    set_seed(seed)
    base = load_classifier(model_dir, LABELS, tok.pad_token_id)
    digests = backbone_digests(base)
    strategy = strategy_cls()
    return strategy, strategy.prepare(base, TASK), tok, digests


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(registry.available()))
def test_strategy_contract(name: str, arch: str, tiny_model_dir, tmp_path) -> None:
    cls = registry.get_strategy(name)
    model_dir = tiny_model_dir(arch)
    strategy, model, tok, digests = _fresh(cls, model_dir, seed=0)
    declared = strategy.trainable_parameters(model)
    assert declared, f"{name} declares no trainable parameter on {arch}"
    all_params = dict(model.named_parameters())
    assert set(declared) <= set(all_params)
    before = {n: p.detach().clone() for n, p in all_params.items()}

    # the loop's own training step (peftkit.loop.train_step), one optimizer step per "epoch"
    accelerator, _ = make_accelerator(RunConfig(), None)
    lr, epochs = 1e-2, 3
    opt = torch.optim.AdamW(torch_param_groups(strategy.param_groups(model), lr, 0.0), lr=lr)
    batch = _batch(tok)
    model.train()
    for epoch in range(epochs):
        for g in torch_param_groups(strategy.on_epoch_start(model, epoch), lr, 0.0):
            opt.add_param_group(g)
        live = {n for n, p in model.named_parameters() if p.requires_grad}
        with _gradients_reaching(model) as with_grad:
            train_step(
                accelerator,
                model,
                opt,
                strategy,
                _step_loss(strategy),
                batch,
                step=epoch,
                total_steps=epochs,
                warmup_steps=0,
                max_grad_norm=1.0,
            )
        # gradients reach exactly the parameters that are trainable now, all of them declared
        assert with_grad == live, (
            f"{name}/{arch}: grads {sorted(with_grad - live)[:3]} vs {sorted(live - with_grad)[:3]}"
        )
        assert with_grad <= set(declared)
        for g in torch_param_groups(strategy.on_step_end(model, epoch + 1), lr, 0.0):
            opt.add_param_group(g)

    after = dict(model.named_parameters())
    for n, p in after.items():
        if n not in declared:
            assert torch.equal(p, before[n]), f"{name}/{arch}: undeclared parameter {n} changed"
    assert any(not torch.equal(after[n], before[n]) for n in declared), f"{name}/{arch}: nothing trained"

    # save -> load on a fresh base (different seed, so a head that failed to load would differ)
    directory = str(tmp_path / "adapter")
    save_adapter(directory, strategy, model, {"strategy": name}, digests)
    strategy2, model2, _, _ = _fresh(cls, model_dir, seed=123)
    strategy2.load_adapter(model2, directory, read_metadata(directory))
    model.eval()
    model2.eval()
    plain = {k: v for k, v in batch.items() if k != "example_key"}  # no cache: compute afresh
    with torch.no_grad():
        expected = strategy.forward(model, plain)
        got = strategy2.forward(model2, plain)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
