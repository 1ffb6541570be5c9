"""The one training loop every strategy runs through.

Built on accelerate (device placement, gradient accumulation, mixed precision, multi-process), it
branches only on what a strategy returns: its parameter groups, its event hooks, its forward and
its adapter state. A difference between two strategies in a benchmark is therefore a difference
between the strategies, not between two copies of a loop.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import RunConfig
from .errors import PeftkitError
from .levers import make_optimizer, store_frozen_in_half
from .memory import MemoryMeter, apply_budget, check_budget, parse_size
from .strategies.base import ParamGroup, Strategy, TaskSpec, TrainingDefaults, options_from_dict, options_to_dict


@dataclass
class ResolvedRun:
    """A ``RunConfig`` with every default filled in, plus the strategy object it names."""

    config: RunConfig
    strategy: Strategy
    hparams: TrainingDefaults

    def as_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.update(strategy=self.strategy.name, epochs=self.hparams.epochs, batch_size=self.hparams.batch_size,
                 lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                 warmup_ratio=self.hparams.warmup_ratio,
                 strategy_options=options_to_dict(self.strategy.options))
        d.pop("overwrite", None)
        return d


def resolve(cfg: RunConfig) -> ResolvedRun:
    """Look up the strategy, check its options, fill unset hyper-parameters from its defaults."""
    from .levers import check_levers
    from .registry import get_strategy

    cls = get_strategy(cfg.strategy)
    strategy = cls(options_from_dict(cls, cfg.strategy_options))
    check_levers(cfg, strategy)
    d = cls.defaults
    hp = TrainingDefaults(
        lr=cfg.lr if cfg.lr is not None else d.lr,
        epochs=cfg.epochs if cfg.epochs is not None else d.epochs,
        batch_size=cfg.batch_size if cfg.batch_size is not None else d.batch_size,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else d.weight_decay,
        warmup_ratio=cfg.warmup_ratio if cfg.warmup_ratio is not None else d.warmup_ratio,
    )
    return ResolvedRun(cfg, strategy, hp)


# -- data -------------------------------------------------------------------------------------

def tokenize_splits(splits: Any, tokenizer: Any, max_length: int) -> Any:
    """Tokenize every split (no padding yet: batches are padded to their longest example) and give
    each example an ``example_key`` unique across splits, for strategies that cache per example."""
    offset = 0
    out = {}
    for name in ("train", "validation", "test"):
        ds = splits[name]

        def encode(batch: dict[str, list], idx: list[int], start: int) -> dict[str, Any]:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            enc["example_key"] = [start + i for i in idx]
            return enc

        ds = ds.map(encode, batched=True, with_indices=True, remove_columns=["text"], fn_kwargs={"start": offset})
        out[name] = ds.rename_column("label", "labels")
        offset += len(ds)
    return out


def make_loader(ds: Any, tokenizer: Any, batch_size: int, shuffle_seed: int | None) -> Any:
    """A DataLoader that pads each batch to its longest example.

    Training batches group examples of similar length (with randomness, seeded) so little time goes
    into padding; evaluation runs in length order for the same reason (order does not change metrics).
    """
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [len(ids) for ids in ds["input_ids"]]
    if shuffle_seed is not None:
        gen = torch.Generator().manual_seed(shuffle_seed)
        sampler: Any = LengthGroupedSampler(batch_size, lengths=lengths, generator=gen)
    else:
        sampler = sorted(range(len(lengths)), key=lengths.__getitem__)
    return DataLoader(ds.with_format("torch"), batch_size=batch_size, sampler=sampler,
                      collate_fn=DataCollatorWithPadding(tokenizer))


# -- metrics ----------------------------------------------------------------------------------

def classification_metrics(preds: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over classes of each class's F1; a class never predicted
    nor present counts as 0, as in scikit-learn with zero_division=0)."""
    acc = (preds == labels).float().mean().item() if len(labels) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "f1_macro": sum(f1s) / len(f1s)}


# -- the loop ---------------------------------------------------------------------------------

@dataclass
class TrainOutcome:
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model, unwrapped from accelerate


def torch_param_groups(groups: list[ParamGroup], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Split each strategy group into decayed (matrices) and undecayed (biases, norms) halves:
    decided by tensor shape, so no parameter names are matched."""
    out = []
    for group in groups:
        decay = [p for p in group.params.values() if p.ndim >= 2]
        no_decay = [p for p in group.params.values() if p.ndim < 2]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                base = lr * group.lr_scale
                out.append({"params": params, "weight_decay": wd, "lr": base, "base_lr": base})
    return out


def evaluate(strategy: Strategy, model: Any, loader: Any, num_labels: int, accelerator: Any,
             after_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of ``model`` over ``loader`` (all processes gathered).
    ``after_batch`` runs after every batch (the memory budget check)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    preds, labels, loss_sum = [], [], 0.0
    with torch.no_grad():
        for batch in loader:
            logits = strategy.forward(model, batch)
            loss_sum += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
            p, y = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            preds.append(p.cpu())
            labels.append(y.cpu())
            if after_batch is not None:
                after_batch()
    p, y = torch.cat(preds), torch.cat(labels)
    out = classification_metrics(p, y, num_labels)
    out["loss"] = loss_sum / max(1, len(y))
    return out


def fit(run: ResolvedRun, model: Any, tokenizer: Any, data: Any, task: TaskSpec,
        log: Callable[[str], None]) -> TrainOutcome:
    """Train ``model`` (already prepared by the strategy), validate each epoch, restore the best
    epoch, evaluate on test. Returns the metrics and the per-epoch history."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg, strategy, hp = run.config, run.strategy, run.hparams
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision;
    # every fit is a run of its own (tests, Python use and benchmarks/overhead.py run several in one
    # process), so its precision state starts afresh. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accumulation,
                              mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision))
    budget = parse_size(cfg.memory_budget) if cfg.memory_budget else None
    apply_budget(accelerator.device, budget)  # before the model moves to the card
    splits = tokenize_splits(data.splits, tokenizer, cfg.max_length)
    train_dl = make_loader(splits["train"], tokenizer, hp.batch_size, shuffle_seed=cfg.seed)
    val_dl = make_loader(splits["validation"], tokenizer, cfg.eval_batch_size, None)
    test_dl = make_loader(splits["test"], tokenizer, cfg.eval_batch_size, None)

    # frozen weights need no fp32 master copy under mixed precision (levers.store_frozen_in_half)
    store_frozen_in_half(model, strategy.trainable_parameters(model), cfg.precision)
    groups = strategy.param_groups(model)
    if not any(g.params for g in groups):
        raise PeftkitError(f"strategy {strategy.name!r} left no parameter to train on this model")
    optimizer = make_optimizer(cfg.optimizer, torch_param_groups(groups, hp.lr, hp.weight_decay), hp.lr)
    model, optimizer, train_dl, val_dl, test_dl = accelerator.prepare(model, optimizer, train_dl, val_dl, test_dl)
    # Memory is measured per phase from here: "loaded" is the model (and data) in place, before any
    # step; training and evaluation peaks are kept apart because they answer different questions
    # (what training needs vs what serving needs).
    meter = MemoryMeter(accelerator.device)
    meter.release_free()  # loading's temporary buffers are gone; "loaded" is what stays
    memory_loaded = meter.current()
    peaks = {"train": 0, "eval": 0, "train_reserved": 0, "eval_reserved": 0}

    def close_phase(phase: str) -> None:
        peaks[phase] = max(peaks[phase], meter.peak())
        peaks[phase + "_reserved"] = max(peaks[phase + "_reserved"], meter.peak_reserved() or 0)

    def run_eval(loader: Any) -> dict[str, float]:
        meter.release_free()
        meter.reset_peak()
        out = evaluate(strategy, model, loader, task.num_labels, accelerator,
                       after_batch=lambda: check_budget(meter, budget, "evaluation", memory_loaded))
        close_phase("eval")
        return out

    steps_per_epoch = math.ceil(len(train_dl) / cfg.grad_accumulation)
    total_steps = steps_per_epoch * hp.epochs
    warmup_steps = int(hp.warmup_ratio * total_steps)

    def count_trainable() -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def add_groups(new: list[ParamGroup]) -> None:
        for g in torch_param_groups(new, hp.lr, hp.weight_decay):
            optimizer.add_param_group(g)
            log(f"optimizer: +{sum(p.numel() for p in g['params']):,} parameters at lr {g['base_lr']:.3g}")

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"accuracy": -1.0}
    max_trainable = count_trainable()
    step, train_examples, train_tokens, train_seconds, eval_seconds = 0, 0, 0, 0.0, 0.0
    epochs_without_gain = 0
    bar = tqdm(total=total_steps, desc=f"{strategy.name}", unit="step", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process or None, file=sys.stderr)
    smooth_loss = None
    for epoch in range(hp.epochs):
        add_groups(strategy.on_epoch_start(model, epoch))
        max_trainable = max(max_trainable, count_trainable())
        model.train()
        meter.release_free()  # what evaluation freed is not training's to count
        meter.reset_peak()
        epoch_start, epoch_examples, epoch_loss, epoch_batches = time.perf_counter(), 0, 0.0, 0
        epoch_tokens = 0
        for batch in train_dl:
            with accelerator.accumulate(model):
                logits = strategy.forward(model, batch)
                loss = F.cross_entropy(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
                    factor = strategy.lr_factor(step, total_steps, warmup_steps)
                    for g in optimizer.param_groups:
                        g["lr"] = g["base_lr"] * factor
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n = batch["labels"].shape[0]
            epoch_examples += n
            epoch_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            epoch_batches += 1
            value = loss.item()
            epoch_loss += value
            smooth_loss = value if smooth_loss is None else 0.9 * smooth_loss + 0.1 * value
            if accelerator.sync_gradients:
                check_budget(meter, budget, f"training at micro-batch {hp.batch_size}", memory_loaded)
                step += 1
                add_groups(strategy.on_step_end(model, step))
                max_trainable = max(max_trainable, count_trainable())
                rate = epoch_examples / max(1e-9, time.perf_counter() - epoch_start)
                bar.set_postfix(epoch=epoch + 1, loss=f"{smooth_loss:.4f}", ex_per_s=f"{rate:.0f}")
                bar.update(1)
        epoch_seconds = time.perf_counter() - epoch_start
        close_phase("train")
        train_seconds += epoch_seconds
        train_examples += epoch_examples
        train_tokens += epoch_tokens

        t0 = time.perf_counter()
        val = run_eval(val_dl)
        eval_seconds += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": epoch_loss / max(1, epoch_batches),
                  "validation_accuracy": val["accuracy"], "validation_f1_macro": val["f1_macro"],
                  "validation_loss": val["loss"], "epoch_seconds": epoch_seconds,
                  "examples_per_second": epoch_examples / max(1e-9, epoch_seconds),
                  "tokens_per_second": epoch_tokens / max(1e-9, epoch_seconds)}
        history.append(record)
        line = (f"epoch {epoch + 1}/{hp.epochs}: train loss {record['train_loss']:.4f}, validation accuracy "
                f"{val['accuracy']:.4f}, f1 {val['f1_macro']:.4f} ({epoch_seconds:.1f} s, "
                f"{record['examples_per_second']:.0f} examples/s)")
        log(line)
        if not bar.disable:
            bar.write(line, file=sys.stderr)
        elif accelerator.is_local_main_process:  # no terminal, no bar: still say how training goes
            print(line, file=sys.stderr, flush=True)
        if val["accuracy"] > best["accuracy"]:
            # the adapter state fully describes what was trained, so it is also the best snapshot
            best = {"accuracy": val["accuracy"], "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in strategy.adapter_state(model).items()}}
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
            if cfg.early_stopping_patience and epochs_without_gain >= cfg.early_stopping_patience:
                log(f"early stopping: no better validation accuracy for {epochs_without_gain} epochs")
                break
    bar.close()

    if best.get("epoch") != len(history):
        strategy.load_adapter_state(accelerator.unwrap_model(model), best["state"])
        log(f"restored the best epoch ({best['epoch']}, validation accuracy {best['accuracy']:.4f})")
    t0 = time.perf_counter()
    test = run_eval(test_dl)
    eval_seconds += time.perf_counter() - t0
    log(f"test accuracy {test['accuracy']:.4f}, f1 {test['f1_macro']:.4f}")

    device = accelerator.device
    device_name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    total_params = sum(p.numel() for p in model.parameters())
    metrics = {
        "strategy": strategy.name,
        "test_accuracy": test["accuracy"],
        "test_f1_macro": test["f1_macro"],
        "test_loss": test["loss"],
        "validation_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "trainable_params": max_trainable,
        "total_params": total_params,
        "trainable_percent": 100.0 * max_trainable / max(1, total_params),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "train_examples": train_examples,
        "samples_per_second": train_examples / max(1e-9, train_seconds),
        "train_tokens": train_tokens,
        "tokens_per_second": train_tokens / max(1e-9, train_seconds),  # real tokens, padding not counted
        "batch_size": hp.batch_size,
        "grad_accumulation": cfg.grad_accumulation,
        "effective_batch_size": hp.batch_size * cfg.grad_accumulation * accelerator.num_processes,
        "peak_memory_bytes": peaks["train"],
        "peak_memory_eval_bytes": peaks["eval"],
        "memory_loaded_bytes": memory_loaded,
        "peak_memory_increase_bytes": peaks["train"] - memory_loaded,
        "peak_reserved_bytes": peaks["train_reserved"] if meter.cuda else None,
        "peak_reserved_eval_bytes": peaks["eval_reserved"] if meter.cuda else None,
        "peak_memory_method": meter.method,
        "memory_budget_bytes": budget,
        "device": device_name,
        "torch_threads": torch.get_num_threads(),
        "precision": cfg.precision,
        "optimizer": cfg.optimizer,
        "quantize": cfg.quantize,
        "gradient_checkpointing": cfg.gradient_checkpointing,
    }
    return TrainOutcome(metrics, history, accelerator.unwrap_model(model))


def write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")


def execute_run(run: ResolvedRun, workdir: str, echo: Callable[[str], None]) -> dict[str, Any]:
    """Do a whole run into ``workdir``: load data and model, prepare, fit, save adapter and metrics.

    ``workdir`` is a staging directory; the caller moves it into place only when this returns.
    """
    import yaml
    from transformers import set_seed

    from .adapter_io import package_versions, save_adapter
    from .fingerprint import backbone_digests, fingerprint
    from .data import load_labelled_data
    from .levers import prepare_base
    from .models import load_classifier, load_tokenizer

    cfg = run.config
    wall_start = time.perf_counter()
    log_path = os.path.join(workdir, "train.log")
    log_file = open(log_path, "a", encoding="utf-8")

    def log(message: str) -> None:
        log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        log_file.flush()

    try:
        resolved = run.as_dict()
        log(f"run: {json.dumps(resolved, default=str)}")
        set_seed(cfg.seed)
        echo(f"loading data {cfg.dataset!r} ...")
        data = load_labelled_data(cfg.dataset, cfg.text_column, cfg.label_column, cfg.seed, cfg.max_train_samples)
        sizes = data.split_info["sizes"]
        log(f"data: {data.split_info['method']}; sizes {sizes}; labels {data.label_names}")
        resolved["split"] = data.split_info
        resolved["label_names"] = data.label_names  # config.yaml records the split actually made
        with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(resolved, fh, sort_keys=False)
        echo(f"loading model {cfg.model!r} ...")
        tokenizer = load_tokenizer(cfg.model)
        set_seed(cfg.seed)  # the new head's initialisation depends on it
        base = load_classifier(cfg.model, data.label_names, tokenizer.pad_token_id,
                               quantize=cfg.quantize, precision=cfg.precision)
        base_digests = backbone_digests(base)  # before training: what "unchanged" means, and the fingerprint
        base = prepare_base(base, cfg.quantize, cfg.gradient_checkpointing)
        task = TaskSpec(num_labels=len(data.label_names), label_names=tuple(data.label_names))
        model = run.strategy.prepare(base, task)
        echo(f"training {run.strategy.name} for {run.hparams.epochs} epoch(s) on {sizes['train']:,} examples "
             f"(validation {sizes['validation']:,}, test {sizes['test']:,}) ...")
        outcome = fit(run, model, tokenizer, data, task, log)
        trained = outcome.model

        versions = package_versions()
        metrics = {
            "strategy": run.strategy.name, "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
            "epochs": run.hparams.epochs, **outcome.metrics,
        }
        metadata = {
            "strategy": run.strategy.name,
            "strategy_options": options_to_dict(run.strategy.options),
            "base_model": cfg.model,
            "base_fingerprint": fingerprint(base_digests),
            "task": "sequence-classification",
            # a quantized base is fingerprinted quantized: loading applies the same quantization
            "base_quantization": cfg.quantize,
            "label_names": data.label_names,
            "max_length": cfg.max_length,
            "dataset": cfg.dataset,
            "split": data.split_info,
            "metrics": {k: metrics[k] for k in ("test_accuracy", "test_f1_macro", "validation_accuracy",
                                                "trainable_params", "total_params", "epochs", "seed")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions,
        }
        metrics["adapter_bytes"] = save_adapter(os.path.join(workdir, "adapter"), run.strategy, trained,
                                                metadata, base_digests)
        metrics.update(wall_seconds=time.perf_counter() - wall_start, split=data.split_info,
                       label_names=data.label_names, history=outcome.history, versions=versions)
        write_json(os.path.join(workdir, "metrics.json"), metrics)
        return metrics
    finally:
        log_file.close()
