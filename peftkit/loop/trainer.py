"""``Trainer``: one run's training, the pieces ``fit`` calls in order. ``setup`` builds what is fixed
for a run (accelerator, loaders, optimizer, memory meter); then an epoch at a time, its steps, the
losses read in bulk, the progress bar (or a heartbeat line without a terminal), checkpoints,
validation and the best epoch's selection; at the end the test split and the run's figures."""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from ..checkpoint import Checkpointer
from ..config import RunConfig
from ..durations import format_duration, time_left
from ..env import LOGGER, lean_host_memory
from ..kernels import compile_blocks
from ..levers import logical_numel, make_optimizer, store_frozen_in_half
from ..memory import (
    HeapTrimsBetweenBlocks,
    MemoryMeter,
    apply_budget,
    check_budget,
    parse_size,
    trim_heap_between_blocks,
)
from ..metrics import RunMetrics, format_rate
from ..packing import padding_fraction
from ..sharding import check_shardable, reshard, shard_model
from ..stats import bits
from ..strategies.base import ParamGroup, Strategy, TrainingDefaults
from ..tasks.base import StepLoss, Task, gathered_sum
from .setup import check_distributed, make_accelerator, make_loader, torch_param_groups, trainable_groups
from .state import LoopState, StepTimes
from .step import train_step

PROGRESS = logging.getLogger(LOGGER)  # how training goes, for the user (train.log has its own writer)

# Optimizer steps between reads of the training loss on an accelerator: reading a value waits for
# the device to finish all queued work, so a read every step keeps it idle while the host prepares
# the next step. Ten steps make a readable progress bar and stall the device once in ten.
READ_EVERY = 10
#: Without a terminal there is no progress bar: a line every this many seconds (step, loss, examples/s,
#: time left) shows a log reader that training goes on between epoch lines, which can be minutes apart.
HEARTBEAT_SECONDS = 30.0


class Trainer:
    """One run's training: what is fixed for the run (set by ``setup``), the ``LoopState`` that
    changes, and the pieces ``fit`` calls in order."""

    accelerator: Any
    model: Any  # as prepared by accelerate (a DDP wrapper under several processes)
    inner: Any  # the model strategies see (unwrapped)
    optimizer: Any
    loaders: dict[str, Any]  # train, validation, test
    sampler_gen: Any  # the training loader's shuffling generator
    trackers: list[str]
    meter: MemoryMeter
    heap_trims: HeapTrimsBetweenBlocks | None  # CPU: the heap's free pages returned between blocks
    budget: int | None
    memory_loaded: int | None
    processor: Any  # the task's tokenizer or image processor
    data: Any  # the task's data (TaskData): its shape decides what evaluation does
    procs: int  # processes training together
    sharded: bool  # FSDP: each process holds a slice of every parameter (``--fsdp`` under several processes)
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    warmup_steps: int
    checkpointer: Checkpointer
    step_loss: StepLoss  # the task's training loss (plain or chunked), for the model strategies see
    bar: Any  # the progress bar (tqdm)

    def __init__(
        self, cfg: RunConfig, strategy: Strategy, hp: TrainingDefaults, task: Task, log: Callable[[str], None]
    ) -> None:
        self.cfg, self.strategy, self.hp, self.task, self.log = cfg, strategy, hp, task, log
        self.state = LoopState()
        self.times = StepTimes()
        self.epoch_start = 0.0
        self.test_correct: list[int] | None = None  # per test example, set by ``test``
        self.unread: list[tuple[int, Any]] = []  # (optimizer step, loss on the device) not read yet
        self.read_at_step = 0  # the optimizer step at the last read
        self.epoch_steps = 0  # optimizer steps of this epoch (in this process's run)
        self.read_every = 1  # optimizer steps between reads of the losses: set by ``setup``
        self.bar_opened = (0.0, 0)  # (time, optimizer step) when training started in this process
        self.next_beat = math.inf  # when the next line without a terminal is due (``beat``)

    def setup(
        self, model: Any, processor: Any, data: Any, workdir: str | None, tracker_config: Callable[[], dict[str, Any]]
    ) -> None:
        """Accelerator, loaders, optimizer and memory meter, in the order the numbers depend on."""
        cfg, hp, strategy = self.cfg, self.hp, self.strategy
        self.processor = processor  # evaluation may need it (generation decodes with the tokenizer)
        self.data = data  # and the data's shape (a language model's answers are generated, plain text's not)
        self.accelerator, self.trackers = make_accelerator(cfg, workdir)
        procs = self.procs = self.accelerator.num_processes
        check_distributed(self.accelerator, cfg, hp.batch_size)
        self.budget = parse_size(cfg.memory_budget) if cfg.memory_budget else None
        apply_budget(self.accelerator.device, self.budget)  # before the model moves to the card
        self.lean_memory = lean_host_memory(self.accelerator.device, self.budget)  # CPU: fit before speed
        train_dl, val_dl, test_dl = self.make_loaders(processor, data)
        self.place_model(model)
        groups = trainable_groups(strategy, model, procs)
        optimizer = make_optimizer(cfg.levers.optimizer, torch_param_groups(groups, hp.lr, hp.weight_decay), hp.lr)
        if self.sharded:  # the model is not accelerate's to wrap: it would add data parallel on top
            self.model = model
            self.optimizer, train_dl = self.accelerator.prepare(optimizer, train_dl)
        else:
            # the training loader goes with the model: DeepSpeed takes its micro-batch from the loaders
            # prepared with it, and an evaluation batch must not become it
            self.model, self.optimizer, train_dl = self.accelerator.prepare(model, optimizer, train_dl)
        val_dl, test_dl = self.accelerator.prepare(val_dl, test_dl)
        self.loaders = {"train": train_dl, "validation": val_dl, "test": test_dl}
        self.inner = self.accelerator.unwrap_model(self.model)  # what strategies see (no DDP wrapper)
        # a lean CPU run: its peak would otherwise count the holes its blocks' temporaries leave
        self.heap_trims = trim_heap_between_blocks(self.inner, self.accelerator.device) if self.lean_memory else None
        self.step_loss = self.task.step_loss(strategy, self.inner, cfg.levers.loss, self.sharded)
        # on a CPU every operation has finished when it returns: a read costs nothing, so every step
        self.read_every = 1 if self.accelerator.device.type == "cpu" else READ_EVERY
        if self.trackers:
            self.accelerator.init_trackers("peftkit", config=tracker_config())
        self.start_counting(len(train_dl))
        self.checkpointer = Checkpointer(
            self.accelerator,
            strategy,
            self.inner,
            self.optimizer,
            workdir,
            cfg.checkpoint_every,
            self.log,
            sharded=self.sharded,
        )

    def make_loaders(self, processor: Any, data: Any) -> tuple[Any, Any, Any]:
        """The train, validation and test loaders of the task's encoded splits (not yet prepared by
        accelerate); the training loader's shuffling generator is kept (``sampler_gen``)."""
        cfg, procs = self.cfg, self.procs
        splits = self.task.encode(data, processor, cfg)
        collate = self.task.collate(processor)
        eval_batch = -(-cfg.eval_batch_size // procs) * procs  # evaluation batches split evenly too
        train_dl, self.sampler_gen = make_loader(splits["train"], collate, self.hp.batch_size, shuffle_seed=cfg.seed)
        val_dl, _ = make_loader(splits["validation"], collate, eval_batch, None)
        test_dl, _ = make_loader(splits["test"], collate, eval_batch, None)
        return train_dl, val_dl, test_dl

    def place_model(self, model: Any) -> None:
        """Frozen weights in half precision, the model on the card, compiled, and sharded under
        ``--fsdp`` over several processes (``sharded``): all before the optimizer is made."""
        cfg, strategy, procs = self.cfg, self.strategy, self.procs
        # frozen weights need no fp32 master copy under mixed precision (levers.store_frozen_in_half)
        store_frozen_in_half(model, strategy.trainable_parameters(model), cfg.levers.precision)
        if self.accelerator.device.type == "cuda" and not cfg.fsdp and cfg.levers.quantize is None:
            # on the card before the optimizer is made, so torch's AdamW is its fused one (a quantized
            # base is there already; FSDP places each shard itself)
            model.to(self.accelerator.device)
        if cfg.levers.compile:
            blocks = compile_blocks(model)
            self.log(f"compile: {blocks} transformer blocks compiled for training (the first step compiles)")
        self.sharded = cfg.fsdp and procs > 1
        if cfg.fsdp and procs == 1:
            line = "--fsdp: one process, so nothing to shard: this is a plain one-process run"
            self.log(line)
            PROGRESS.info(line)
        if self.sharded:
            check_shardable(strategy.name, strategy.not_sharded)
            # before the optimizer: sharding replaces the parameters it will hold
            trainable_groups(strategy, model, procs)  # what cannot train over several processes is refused first
            # fully_shard moves each block to the device as it shards it: the whole model never is there
            blocks = shard_model(model, self.accelerator.device)
            self.log(f"fsdp: {len(blocks)} blocks and the root sharded over {procs} processes")

    def start_counting(self, train_batches: int) -> None:
        """The memory meter, what the loaded model holds, the step counts and the trainable count,
        once everything is in place and before any step."""
        # Memory is measured per phase from here: "loaded" is the model (and data) in place, before
        # any step
        self.meter = MemoryMeter(self.accelerator.device, lean=self.lean_memory, heap_trims=self.heap_trims)
        self.meter.release_free()  # loading's temporary buffers are gone; "loaded" is what stays
        self.memory_loaded = self.meter.current()
        self.steps_per_epoch = math.ceil(train_batches / self.cfg.grad_accumulation)
        self.total_steps = self.steps_per_epoch * self.hp.epochs
        self.warmup_steps = self.hp.warmup_steps(self.total_steps)  # a ratio of the run, capped (TrainingDefaults)
        self.state.max_trainable = self.count_trainable()

    # -- helpers ---------------------------------------------------------------------------

    def settled(self) -> Any:
        """The model strategies see, every parameter in its one true place: under FSDP its shards
        (``sharding.reshard``), as the best-epoch snapshot is taken and restored."""
        if self.sharded:
            reshard(self.inner)
        return self.inner

    def count_trainable(self) -> int:
        return sum(p.numel() for p in self.inner.parameters() if p.requires_grad)

    def add_groups(self, new: list[ParamGroup], quiet: bool = False) -> None:
        """Parameter groups a strategy's event made trainable join the optimizer."""
        for g in torch_param_groups(new, self.hp.lr, self.hp.weight_decay):
            self.optimizer.add_param_group(g)
            if not quiet:
                self.log(f"optimizer: +{sum(p.numel() for p in g['params']):,} parameters at lr {g['base_lr']:.3g}")

    def close_phase(self, phase: Literal["train", "eval"]) -> None:
        self.state.peaks.record(phase, self.meter.peak(), self.meter.peak_reserved())

    def evaluate(self, split: str, final: bool = False) -> dict[str, float]:
        """The task's metrics on ``split``; its time counts as evaluation time."""
        return self.measured(
            lambda after_batch: self.task.evaluate(
                self.strategy,
                self.model,
                self.loaders[split],
                self.accelerator,
                after_batch=after_batch,
                final=final,
                context=self.processor,
                data=self.data,
            )
        )

    def measured(self, evaluate: Callable[[Callable[[], None]], Any]) -> Any:
        """``evaluate(after_batch)`` as an evaluation phase: its memory peak, the budget checked
        after each batch, its time counted as evaluation time."""
        started = time.perf_counter()
        self.meter.release_free()
        self.meter.reset_peak()

        def after_batch() -> None:
            check_budget(self.meter, self.budget, "evaluation", self.memory_loaded)

        out = evaluate(after_batch)
        self.close_phase("eval")
        self.state.eval_seconds += time.perf_counter() - started
        return out

    # -- resume ----------------------------------------------------------------------------

    def resume(self, path: str) -> None:
        """Continue from the checkpoint at ``path``."""
        loop, best = self.checkpointer.restore(path, self.steps_per_epoch, lambda g: self.add_groups(g, quiet=True))
        self.state = LoopState.from_dict(loop, best)
        self.log(f"resumed from {path}: epoch {self.state.epoch + 1}, step {self.state.step} of {self.total_steps}")

    def save_checkpoint(self, sampler_state: Any) -> None:
        st = self.state
        loop = {**st.to_dict(), "epoch_elapsed": time.perf_counter() - self.epoch_start}
        self.checkpointer.save(st.step, loop, st.best.snapshot, sampler_state, self.total_steps)

    def measure_zero_shot(self) -> None:
        """The untrained model's validation metrics, before the first step, for a task that
        judges a run against them (``Task.needs_zero_shot_reference``): one more validation pass,
        over the loader validation uses (capped by --max-eval-samples). Never after a step: a run
        resumed from a checkpoint without them stays without."""
        if not self.task.needs_zero_shot_reference or self.state.step or self.state.zero_shot is not None:
            return
        self.state.zero_shot = self.evaluate("validation")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.state.zero_shot.items())
        self.log(f"zero-shot validation (before training): {shown}")

    # -- an epoch --------------------------------------------------------------------------

    def open_bar(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=f"{self.strategy.name}",
            unit="step",
            dynamic_ncols=True,
            disable=not self.accelerator.is_local_main_process or None,
            file=sys.stderr,
        )
        now = time.perf_counter()
        self.bar_opened = (now, self.state.step)
        self.next_beat = now + HEARTBEAT_SECONDS

    def beat(self, epoch: int) -> None:
        """Without a terminal (the bar disabled by tqdm), a line on stderr every ``HEARTBEAT_SECONDS``:
        the step, the running loss, examples/s and the time left at the rate so far."""
        now = time.perf_counter()
        if now < self.next_beat or not self.bar.disable or not self.accelerator.is_local_main_process:
            return
        self.next_beat = now + HEARTBEAT_SECONDS
        self.read_losses(epoch)  # a current loss, at one wait for the device per line
        st = self.state
        start, first_step = self.bar_opened
        left = time_left(now - start, max(1, st.step - first_step), self.total_steps - st.step)
        rate = st.epoch_examples / max(1e-9, now - self.epoch_start)
        loss = f", loss {st.smooth_loss:.4f}" if st.smooth_loss is not None else ""
        PROGRESS.info(
            f"{self.strategy.name}: step {st.step}/{self.total_steps} (epoch {epoch + 1}/{self.hp.epochs}){loss}, "
            f"{format_rate(rate)} examples/s, about {format_duration(left)} of training left"
        )

    def train_epoch(self, epoch: int, resuming: bool) -> float:
        """Train epoch ``epoch`` (0-based; ``resuming``: from the checkpoint's place in it).
        Returns its seconds."""
        st, ckpt = self.state, self.checkpointer
        if not resuming:
            self.add_groups(self.strategy.on_epoch_start(self.inner, epoch))
            st.start_epoch(epoch)
        st.max_trainable = max(st.max_trainable, self.count_trainable())
        if self.sampler_gen is not None and resuming and ckpt.sampler_start is not None:
            self.sampler_gen.set_state(ckpt.sampler_start)
        sampler_state = self.sampler_gen.get_state() if self.sampler_gen is not None else None
        self.model.train()
        self.meter.release_free()  # what evaluation freed is not training's to count
        self.meter.reset_peak()
        self.epoch_start = time.perf_counter() - st.epoch_elapsed
        skip = st.batches_done if resuming else 0
        self.times.start_epoch()
        self.epoch_steps, self.read_at_step = 0, st.step
        for i, batch in enumerate(self.loaders["train"]):
            if i < skip:  # already trained on before the checkpoint (the order is the same)
                continue
            ckpt.continue_rng()
            loss = train_step(
                self.accelerator,
                self.model,
                self.optimizer,
                self.strategy,
                self.step_loss,
                batch,
                step=st.step,
                total_steps=self.total_steps,
                warmup_steps=self.warmup_steps,
                max_grad_norm=self.cfg.max_grad_norm,
            )
            self.count_batch(i, batch)
            self.unread.append((st.step + 1, loss.detach()))  # read in bulk: reading one waits for the device
            if self.accelerator.sync_gradients:
                self.end_step(epoch, sampler_state)
        self.read_losses(epoch)  # the epoch's loss is complete
        ckpt.continue_rng()  # the checkpoint was the epoch's last step
        seconds = time.perf_counter() - self.epoch_start
        self.close_phase("train")
        st.end_epoch(seconds)
        return seconds

    def count_batch(self, index: int, batch: dict[str, Any]) -> None:
        """Count a micro-batch's examples (a packed row holds several: ``example_key`` has one each),
        real tokens (the collate's count, ``real_tokens``, read without waiting for the device; else
        the attention mask's) and positions."""
        procs = self.procs
        examples = len(batch["example_key"] if "example_key" in batch else batch["labels"]) * procs
        if "real_tokens" in batch:
            tokens = int(batch["real_tokens"]) * procs
        else:
            tokens = int(batch["attention_mask"].sum()) * procs if "attention_mask" in batch else 0
        positions = int(batch["input_ids"].numel()) * procs if "input_ids" in batch else 0
        self.state.add_batch(index, examples, tokens, positions)

    def end_step(self, epoch: int, sampler_state: Any) -> None:
        """After an optimizer step: the losses read where due (``read_losses``), the memory budget,
        the strategy's step event, the progress bar, trackers and the checkpoint."""
        st = self.state
        st.step += 1
        self.epoch_steps += 1
        due_checkpoint = self.checkpointer.due(st.step)
        # the epoch's first step is read alone: its time (the loader's start) is left out of the timing
        if self.epoch_steps == 1 or self.epoch_steps % self.read_every == 0 or due_checkpoint:
            self.read_losses(epoch)
        check_budget(self.meter, self.budget, f"training at micro-batch {self.hp.batch_size}", self.memory_loaded)
        self.meter.return_heap_holes(st.step)  # (a lean CPU run: the holes an epoch's varied batches leave)
        self.add_groups(self.strategy.on_step_end(self.inner, st.step))
        st.max_trainable = max(st.max_trainable, self.count_trainable())
        self.bar.update(1)
        self.beat(epoch)
        if self.trackers:
            self.accelerator.log({"train/lr": self.optimizer.param_groups[0]["lr"]}, step=st.step)
        if due_checkpoint:
            self.save_checkpoint(sampler_state)

    def read_losses(self, epoch: int) -> None:
        """Read the micro-batch losses not read yet, in one transfer that waits for the device: every
        ``read_every`` optimizer steps, at an epoch's first and last step and before a checkpoint,
        not after every step (on a GPU each read stalls the queue of work). The step time is
        measured between reads."""
        if not self.unread:
            return
        import torch

        st = self.state
        values = torch.stack([loss.float() for _, loss in self.unread]).tolist()
        now = time.perf_counter()
        if self.times.first is None:
            self.times.first = now - self.epoch_start
        self.times.mark(now, st.epoch_tokens, steps=max(1, self.steps_since_read()))
        logged: dict[int, float] = {}
        for (step, _), value in zip(self.unread, values):
            st.add_loss(value)
            logged[step] = value  # a step's last micro-batch, as before
        self.unread.clear()
        self.read_at_step = st.step
        rate = st.epoch_examples / max(1e-9, time.perf_counter() - self.epoch_start)
        self.bar.set_postfix(epoch=epoch + 1, loss=f"{st.smooth_loss:.4f}", ex_per_s=format_rate(rate))
        if self.trackers:
            for step, value in logged.items():
                self.accelerator.log({"train/loss": value}, step=step)

    def steps_since_read(self) -> int:
        return self.state.step - self.read_at_step

    # -- after an epoch: validation and selection ------------------------------------------

    def validate(self, epoch: int, seconds: float) -> dict[str, float]:
        """Evaluate on validation after epoch ``epoch`` (0-based), record and report the epoch."""
        st, procs = self.state, self.procs
        val = self.evaluate("validation")
        # every process saw its share of each batch: the epoch's loss is the mean over all of them
        train_loss = gathered_sum(self.accelerator, st.epoch_loss) / procs / max(1, st.epoch_batches)
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            **{f"validation_{k}": v for k, v in val.items()},
            "epoch_seconds": seconds,
            "examples_per_second": st.epoch_examples / max(1e-9, seconds),
            "tokens_per_second": st.epoch_tokens / max(1e-9, seconds),
        }
        st.history.append(record)
        self.report_epoch(record, val)
        return val

    def report_epoch(self, record: dict[str, Any], val: dict[str, float]) -> None:
        """The epoch's line: in train.log, above the progress bar (or on stderr without one), and
        its figures to the trackers."""
        shown = ", ".join(f"{k} {val[k]:.4f}" for k in self.task.headline_metrics if k in val)
        line = (
            f"epoch {record['epoch']}/{self.hp.epochs}: train loss {record['train_loss']:.4f}, validation "
            f"{shown} ({record['epoch_seconds']:.1f} s, {format_rate(record['examples_per_second'])} examples/s)"
        )
        self.announce(line)
        if self.trackers:
            self.accelerator.log(
                {f"validation/{k}": v for k, v in val.items()} | {"train/epoch_loss": record["train_loss"]},
                step=self.state.step,
            )

    def announce(self, line: str) -> None:
        """A line for the user as well as train.log (an epoch's result, early stopping): to the
        ``peftkit`` logger (the command line prints it above the progress bar), once, from the main
        process."""
        self.log(line)
        if self.accelerator.is_local_main_process:
            PROGRESS.info(line)

    def select(self, epoch: int, val: dict[str, float]) -> bool:
        """Judge epoch ``epoch`` (0-based) against the best so far; True when training stops early."""
        best = self.state.best
        verdict = best.judge(
            epoch + 1,
            val,
            self.task.score(val),
            self.cfg.early_stopping_patience,
            snapshot=lambda: {k: v.detach().clone() for k, v in self.strategy.adapter_state(self.settled()).items()},
        )
        if verdict == "stop":  # on the console too: the run ends epochs before the user expects
            self.announce(
                f"early stopping after epoch {epoch + 1}/{self.hp.epochs}: no better validation "
                f"{self.task.selection_metric} for {best.epochs_without_gain} epochs "
                f"(best epoch {best.epoch})"
            )
            return True
        self.state.batches_done = 0
        return False

    # -- the end ---------------------------------------------------------------------------

    def restore_best(self) -> None:
        """Put the best epoch's adapter state back when a later epoch was trained."""
        st, metric = self.state, self.task.selection_metric
        if st.best.epoch != len(st.history):
            self.strategy.load_adapter_state(self.settled(), st.best.snapshot)
            self.log(f"restored the best epoch ({st.best.epoch}, validation {metric} {st.best.metrics[metric]:.4f})")

    def validation_correct(self) -> tuple[dict[str, float], list[int] | None]:
        """The validation split evaluated as the test split is (``Task.evaluate_test``): its metrics
        and, where the task can say, which examples were right, in the split's order. A tuning
        trial's best epoch against the defaults' is then judged example by example."""
        return self.measured(
            lambda after_batch: self.task.evaluate_test(
                self.strategy,
                self.model,
                self.loaders["validation"],
                self.accelerator,
                after_batch=after_batch,
                context=self.processor,
                data=self.data,
            )
        )

    def test(self) -> dict[str, float]:
        """The final evaluation, on test (which examples were right: ``test_correct``); ends the
        trackers' run."""
        test, self.test_correct = self.measured(
            lambda after_batch: self.task.evaluate_test(
                self.strategy,
                self.model,
                self.loaders["test"],
                self.accelerator,
                after_batch=after_batch,
                context=self.processor,
                data=self.data,
            )
        )
        self.log("test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        if self.trackers:
            self.accelerator.log({f"test/{k}": v for k, v in test.items()}, step=self.state.step)
            self.accelerator.end_training()
        return test

    def metrics(self, test: dict[str, float], resumed: bool) -> RunMetrics:
        """Everything the run measured (the run-level figures, adapter size and wall time, are
        the caller's to add)."""
        import torch

        cfg, hp, st, meter, peaks = self.cfg, self.hp, self.state, self.meter, self.state.peaks
        device = self.accelerator.device
        total_params = sum(logical_numel(p) for p in self.inner.parameters())  # 4-bit: not packed bytes
        steps = self.times
        return RunMetrics(
            strategy=self.strategy.name,
            model=cfg.model,
            dataset=cfg.dataset,
            seed=cfg.seed,
            epochs=hp.epochs,
            task=self.task.name,
            test=test,
            validation=st.best.metrics,
            best_epoch=st.best.epoch,
            epochs_run=len(st.history),
            trainable_params=st.max_trainable,
            total_params=total_params,
            trainable_percent=100.0 * st.max_trainable / max(1, total_params),
            train_seconds=st.train_seconds,
            eval_seconds=st.eval_seconds,
            train_examples=st.train_examples,
            samples_per_second=st.train_examples / max(1e-9, st.train_seconds),
            train_tokens=st.train_tokens,
            tokens_per_second=st.train_tokens / max(1e-9, st.train_seconds),  # real tokens, padding not counted
            step_seconds_median=statistics.median(steps.seconds) if steps.seconds else None,
            first_step_seconds=steps.first,
            steady_tokens_per_second=sum(steps.tokens) / sum(steps.seconds) if steps.seconds else None,
            batch_size=hp.batch_size,
            grad_accumulation=cfg.grad_accumulation,
            effective_batch_size=hp.batch_size * cfg.grad_accumulation,
            processes=self.procs,
            peak_memory_bytes=peaks.train,
            peak_memory_eval_bytes=peaks.eval,
            memory_loaded_bytes=self.memory_loaded,
            peak_memory_increase_bytes=peaks.train - self.memory_loaded,
            peak_reserved_bytes=peaks.train_reserved if meter.cuda else None,
            peak_reserved_eval_bytes=peaks.eval_reserved if meter.cuda else None,
            peak_memory_method=meter.method,
            heap_trims=self.heap_trims.count if self.heap_trims is not None else None,
            heap_trim_seconds=round(self.heap_trims.seconds, 3) if self.heap_trims is not None else None,
            memory_budget_bytes=self.budget,
            padding_fraction=padding_fraction(st.train_tokens, st.train_positions),
            packing=cfg.levers.packing,
            device=f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type,
            torch_threads=torch.get_num_threads(),
            precision=cfg.levers.precision,
            optimizer=cfg.levers.optimizer,
            quantize=cfg.levers.quantize,
            gradient_checkpointing=cfg.levers.gradient_checkpointing,
            loss=self.step_loss.kind,
            resumed=resumed,
            per_example_correct=bits(self.test_correct),
            optimizer_steps=st.step,
        )
