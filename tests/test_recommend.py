"""``peftkit recommend``: the search (successive halving over strategy x configuration within a time
budget), the decision (the cheaper of two a paired test cannot tell apart), continuing and
interrupting, and the refusals. Most tests run the real search and bench rows with a stand-in
worker (``runner``) whose figures follow a known rule, on a clock the stand-in advances, so a
search of dozens of runs takes a second; one slow test runs real workers end to end."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from peftkit.benchmark.worker import Attempt
from peftkit.errors import PeftkitError, RunInterrupted
from peftkit.recommendation import search as search_mod
from peftkit.recommendation.config import RecommendConfig
from peftkit.recommendation.decide import decide
from peftkit.recommendation.run import check_recommend, run_recommend
from peftkit.recommendation.search import rung_sizes

# the stand-in's accuracy of each strategy at its best learning rate, its cost per example and memory
QUALITY = {"head_only": 0.70, "lora": 0.86, "adapter": 0.85, "full": 0.87}
PACE = {"head_only": 0.002, "lora": 0.01, "adapter": 0.009, "full": 0.03}
MEMORY = {"head_only": 0.5e9, "lora": 1.0e9, "adapter": 0.8e9, "full": 2.0e9}


class FakeWorld:
    """A stand-in worker and the clock it advances: a run's accuracy rises with its training
    examples and falls with its learning rate's distance (in decades) from the strategy's default;
    its time is its pace times the examples, plus 5 s of start-up."""

    def __init__(self, interrupt_at: int | None = None, test_noise: bool = False) -> None:
        self.time = 0.0
        self.calls: list[tuple[str, int, float, int]] = []
        self.interrupt_at = interrupt_at
        self.test_noise = test_noise

    def now(self) -> float:
        return self.time

    def __call__(self, cfg, log_path: str) -> Attempt:
        from peftkit.registry import get_strategy

        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        strategy, size = cfg.strategy, cfg.max_train_samples
        default_lr = get_strategy(strategy).defaults.lr
        lr = cfg.lr or default_lr
        self.calls.append((strategy, size, lr, cfg.seed))
        q = QUALITY[strategy] - 0.08 * abs(math.log10(lr / default_lr)) + 0.03 * math.log2(size / 160)
        q = max(0.5, min(0.97, q))
        rng = random.Random(f"{strategy}-{cfg.seed}-{size}-{lr}")
        n = 400
        correct = "".join("1" if rng.random() < q else "0" for _ in range(n))
        train_seconds = PACE[strategy] * size * 3
        self.time += train_seconds + 5.0
        os.makedirs(os.path.join(cfg.output_dir, "adapter"), exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as fh:
            fh.write(f"strategy: {strategy}\noutput_dir: {cfg.output_dir}\nlr: {lr}\n")
        metrics = {
            "task": "sequence-classification",
            "validation_accuracy": q,
            "test_accuracy": correct.count("1") / n,
            "test_f1_macro": correct.count("1") / n,
            "per_example_correct": correct,
            "train_seconds": train_seconds,
            "epochs_run": 3,
            "peak_memory_bytes": MEMORY[strategy],
            "trainable_params": 10,
            "total_params": 100,
            "trainable_percent": 10.0,
            "samples_per_second": size * 3 / train_seconds,
            "batch_size": cfg.batch_size,
            "grad_accumulation": cfg.grad_accumulation,
            "peak_memory_eval_bytes": MEMORY[strategy],
            "memory_loaded_bytes": MEMORY[strategy] / 2,
            "peak_memory_increase_bytes": MEMORY[strategy] / 2,
            "adapter_bytes": 1000,
            "device": "cpu",
            "history": [
                {"epoch": e, "train_loss": 0.5, "validation_accuracy": q, "epoch_seconds": train_seconds / 3}
                for e in (1, 2, 3)
            ],
            "versions": {"peftkit": "test"},
        }
        return Attempt("ok", cfg.batch_size, metrics=metrics, seconds=train_seconds + 5.0)


@pytest.fixture
def small_rungs(monkeypatch):
    """Rungs down to 40 examples, so the 160 training examples of tiny_csv make three; at most 4
    configurations a strategy (each stand-in run still writes the study: keep the tests quick)."""
    from peftkit.recommendation import run as run_mod

    monkeypatch.setattr(search_mod, "RUNG_MIN_EXAMPLES", 40)
    monkeypatch.setattr(search_mod, "MAX_CONFIGS", 4)
    # the stand-in's runs cost what their examples do: no raised epochs to make a small rung dear
    monkeypatch.setattr(run_mod, "rung_sizes", lambda whole, eta, work=None: rung_sizes(whole, eta))


def _config(tiny_model_dir, tiny_csv, tmp_path, **changes) -> RecommendConfig:
    settings = {
        "strategies": ["head_only", "lora", "adapter"],
        "model": tiny_model_dir("bert"),
        "dataset": tiny_csv,
        "max_length": 16,
        "time_budget": "20m",
        "eta": 2,
        "output_dir": str(tmp_path / "rec"),
        **changes,
    }
    return check_recommend(RecommendConfig(**settings))


def test_rung_sizes():
    assert rung_sizes(10_201, 3) == [1133, 3400, 10_201]
    assert rung_sizes(2000, 3) == [666, 2000]
    assert rung_sizes(600, 3) == [600]
    # a smaller rung only where it costs at most half the one above: below 4,800 examples a plain
    # run trains at least 150 steps of 32 whatever its size, so 1,000 and 333 examples cost the same
    steps = lambda size: max(150 * 32, size)  # noqa: E731
    assert rung_sizes(10_201, 3, steps) == [3400, 10_201]
    assert rung_sizes(2000, 3, steps) == [2000]


def test_search_halves_selects_on_validation_and_decides(tiny_model_dir, tiny_csv, tmp_path, small_rungs):
    world = FakeWorld()
    result = run_recommend(_config(tiny_model_dir, tiny_csv, tmp_path), lambda m: None, runner=world, now=world.now)
    search = result.results["search"]
    assert search["rung_sizes"] == [40, 80, 160]
    runs = search["runs"]
    by_size = {z: [r for r in runs if r["train_size"] == z] for z in search["rung_sizes"]}
    # rung 0: every strategy's defaults first, then more configurations; each later rung keeps the
    # best 1/eta by validation (plus the best of each finalist strategy), never one from outside
    assert [r["strategy"] for r in runs[:3]] == ["head_only", "lora", "adapter"]
    assert all(r["configuration"] == 0 for r in runs[:3])
    assert len(by_size[40]) > 3
    for low, high in ((40, 80), (80, 160)):
        ranked = sorted(by_size[low], key=lambda r: -r["validation"])
        promoted = {(r["strategy"], r["configuration"]) for r in by_size[high]}
        top = {(r["strategy"], r["configuration"]) for r in ranked[: math.ceil(len(ranked) / 2)]}
        assert top <= promoted
        assert promoted <= {(r["strategy"], r["configuration"]) for r in by_size[low]}
    # within the budget, by the stand-in's clock
    assert search["seconds"] <= 20 * 60
    rec = result.results["recommendation"]
    assert rec["strategy"] in ("lora", "adapter")  # head_only is 15 points lower
    assert "head_only" in result.decision.paragraph
    out = tmp_path / "rec"
    for name in ("recommend.md", "results.json", "search.png", "best/adapter", "best/config.yaml"):
        assert (out / name).exists(), name
    assert "output_dir" not in (out / "best" / "config.yaml").read_text()
    assert (out / "recommend.md").read_text().splitlines()[2] == result.decision.paragraph


def test_budget_bounds_the_search(tiny_model_dir, tiny_csv, tmp_path, small_rungs):
    """A budget that pays for little: fewer configurations, nothing started past it."""
    world = FakeWorld()
    cfg = _config(tiny_model_dir, tiny_csv, tmp_path, time_budget="1m")
    result = run_recommend(cfg, lambda m: None, runner=world, now=world.now)
    assert result.results["search"]["seconds"] <= 60
    big = FakeWorld()
    run_recommend(
        _config(tiny_model_dir, tiny_csv, tmp_path / "big", time_budget="20m"), lambda m: None, runner=big, now=big.now
    )
    assert len(world.calls) < len(big.calls)


def test_continue_reruns_nothing_recorded(tiny_model_dir, tiny_csv, tmp_path, small_rungs):
    cfg = _config(tiny_model_dir, tiny_csv, tmp_path, time_budget="5m")
    first = FakeWorld()
    done = run_recommend(cfg, lambda m: None, runner=first, now=first.now)
    again = FakeWorld()
    redone = run_recommend(cfg, lambda m: None, runner=again, now=again.now)
    assert again.calls == []  # the budget was spent and every run is recorded
    assert redone.results["recommendation"]["strategy"] == done.results["recommendation"]["strategy"]
    # the history read back lists the runs in the order they ran, as the first call did
    key = lambda r: (r["strategy"], r["configuration"], r["train_size"], r["seed"])  # noqa: E731
    assert [key(r) for r in redone.results["search"]["runs"]] == [key(r) for r in done.results["search"]["runs"]]


def test_interrupt_keeps_runs_and_continues(tiny_model_dir, tiny_csv, tmp_path, small_rungs):
    cfg = _config(tiny_model_dir, tiny_csv, tmp_path)
    stopped = FakeWorld(interrupt_at=4)
    with pytest.raises(RunInterrupted, match="run the same peftkit recommend command"):
        run_recommend(cfg, lambda m: None, runner=stopped, now=stopped.now)
    assert not (tmp_path / "rec" / "recommend.md").exists()
    resumed = FakeWorld()
    resumed.time = stopped.time
    result = run_recommend(cfg, lambda m: None, runner=resumed, now=resumed.now)
    # the four finished runs are not run again
    assert not set(stopped.calls) & set(resumed.calls)
    assert len(result.results["search"]["runs"]) == len(stopped.calls) + len(resumed.calls)


def test_memory_budget_drops_what_cannot_fit(tiny_model_dir, tiny_csv, tmp_path, monkeypatch, small_rungs):
    from peftkit.recommendation import run as run_mod

    real = run_mod.load_once

    def with_planner(bench, echo):
        bench, _predict, baselines, whole = real(bench, echo)
        return (
            bench,
            lambda strategy, levers, micro: int(MEMORY[strategy] * (4 if strategy == "full" else 1)),
            (baselines),
            whole,
        )

    monkeypatch.setattr(run_mod, "load_once", with_planner)
    world = FakeWorld()
    cfg = _config(tiny_model_dir, tiny_csv, tmp_path, strategies=["full", "lora", "adapter"], memory_budget="3GB")
    result = run_recommend(cfg, lambda m: None, runner=world, now=world.now)
    assert "full" in result.results["search"]["dropped"]
    said = result.results["search"]["dropped"]["full"]["error"]
    assert said.startswith("planned 7.45 GiB at micro-batch 1 with no lever (the least of "), said
    assert not any(s == "full" for s, *_ in world.calls)
    assert "full does not fit 3GB (planned 7.45 GiB)" in result.decision.paragraph


def test_tiny_budget_refused_before_anything(tiny_model_dir, tiny_csv, tmp_path):
    cfg = _config(tiny_model_dir, tiny_csv, tmp_path, time_budget="1s")
    world = FakeWorld()
    with pytest.raises(PeftkitError, match=r"--time-budget 1s is too small .* give at least"):
        run_recommend(cfg, lambda m: None, runner=world, now=world.now)
    assert world.calls == []
    assert not (tmp_path / "rec").exists()


def _summary(acc: float, memory: float, seconds: float) -> dict:
    return {"test_accuracy_mean": acc, "seeds": [0], "peak_memory_bytes": memory, "train_seconds_mean": seconds}


def _results(best: str, summary: dict, verdicts: dict) -> dict:
    return {
        "summary": summary,
        "quality": ("test_accuracy", "test accuracy", True),
        "comparison": {
            "best": best,
            "strategies": {
                n: {"verdict": v, "p_value": p, "difference": d, "examples": 1000} for n, (v, p, d) in verdicts.items()
            },
        },
    }


@pytest.mark.parametrize("sizes", [(1000,), (333, 1000)])
def test_search_plot_shows_every_configuration(tmp_path, monkeypatch, sizes):
    """One rung (a small budget): validation per strategy, so equal values do not hide each other on
    a one-point axis; several rungs: a line per configuration over the rungs."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt

    from peftkit.recommendation.report import _search_plot

    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    runs = [
        SimpleNamespace(strategy=s, number=n, size=size, seed=0, value=v)
        for s, n, v in (("adapter", 0, 0.743), ("head_only", 0, 0.743), ("lora", 0, 0.767), ("lora", 1, 0.79))
        for size in sizes
    ]
    search = SimpleNamespace(
        ledger=SimpleNamespace(runs=runs),
        config=SimpleNamespace(seeds=[0]),
        candidates=["adapter", "head_only", "lora", "prefix"],
    )
    assert _search_plot(search, str(tmp_path / "search.png"))
    assert (tmp_path / "search.png").stat().st_size > 0
    ax = drawn[0].axes[0]
    if len(sizes) == 1:  # the strategies that ran, each configuration a marker at its strategy
        assert [t.get_text() for t in ax.get_xticklabels()] == ["adapter", "head_only", "lora"]
        assert sorted(tuple(c.get_offsets()[0]) for c in ax.collections) == [
            (0.0, 0.743),
            (1.0, 0.743),
            (2.0, 0.767),
            (2.0, 0.79),
        ]
    else:
        assert ax.get_xscale() == "log"
        assert len([line for line in ax.get_lines() if len(line.get_xdata())]) == 4


def test_decide_recommends_the_cheaper_of_two_alike():
    results = _results(
        "full",
        {"full": _summary(0.84, 2e9, 300), "lora": _summary(0.83, 1e9, 100), "prefix": _summary(0.76, 0.9e9, 90)},
        {"lora": ("not distinguishable", 0.41, -0.01), "prefix": ("distinguishable", 0.0001, -0.08)},
    )
    d = decide(results, {"lora": "defaults, 1 epoch"}, [])
    assert (d.strategy, d.best) == ("lora", "full")
    assert d.paragraph.startswith("Use lora (defaults, 1 epoch): 0.830 (1 seed) test accuracy")
    assert "not distinguishable from it (p = 0.41" in d.paragraph
    assert "uses 50% less memory and is 67% faster per epoch" in d.paragraph
    assert "prefix is 8.0 points lower (p < 0.001)" in d.paragraph


def test_decide_keeps_the_best_when_the_alike_one_costs_more_somewhere():
    """Faster but heavier is not cheaper: it is named as also fine, the best stays."""
    results = _results(
        "lora",
        {"lora": _summary(0.83, 1e9, 100), "adapter": _summary(0.83, 1.2e9, 80)},
        {"adapter": ("not distinguishable", 0.6, 0.0)},
    )
    d = decide(results, {}, ["full does not fit 1GiB (planned 2 GiB)."])
    assert d.strategy == "lora"
    assert d.also_fine == ["adapter"]
    assert "adapter is not distinguishable (p = 0.6) and is 20% faster per epoch: also fine." in d.paragraph
    assert d.paragraph.endswith("full does not fit 1GiB (planned 2 GiB).")


def test_decide_keeps_the_best_when_the_cheaper_may_be_worse_by_more_than_the_margin():
    """Not distinguishable is not as good: a cheaper finalist whose interval allows a loss of more
    than 2 points is named with that loss, and the best stays; one within the margin wins."""
    summary = {"lora": _summary(0.781, 1e9, 20), "head_only": _summary(0.753, 0.8e9, 0.17)}
    results = _results("lora", summary, {"head_only": ("not distinguishable", 0.061, -0.028)})
    results["comparison"]["strategies"]["head_only"]["ci95"] = [-0.054, 0.001]
    d = decide(results, {}, [])
    assert d.strategy == "lora" and d.also_fine == []
    assert d.paragraph.startswith("Use lora: 0.781 (1 seed) test accuracy, 954 MiB, 20 s/epoch.")
    assert (
        "head_only is not distinguishable (p = 0.061) but may be as much as 5.4 points lower (95% interval), "
        "more than the margin of 2.0 points; it uses 20% less memory and is 99% faster per epoch."
    ) in d.paragraph
    results["comparison"]["strategies"]["head_only"]["ci95"] = [-0.015, 0.02]
    d = decide(results, {}, [])
    assert d.strategy == "head_only" and "0.17 s/epoch" in d.paragraph
    assert "(p = 0.061, paired test on the same 1,000 test examples; at worst 1.5 points lower)" in d.paragraph


def test_cli_refusals(run_cli, tiny_model_dir, tiny_csv, tmp_path):
    code, _out, err = run_cli("recommend", "--strategies", "lora")
    assert code == 2 and "--time-budget" in err
    code, _out, err = run_cli("recommend", "--time-budget", "soon")
    assert code != 0 and "--time-budget 'soon' is not a duration" in err and "Traceback" not in err
    code, _out, err = run_cli("recommend", "--time-budget", "5m", "--eta", "1")
    assert code != 0 and "--eta must be an integer of at least 2" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, _out, err = run_cli(
        "recommend",
        "--time-budget",
        "5m",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--strategies",
        "head_only",
        "--output-dir",
        str(other),
    )
    assert code != 0 and "holds no peftkit recommend" in err
    assert (other / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_end_to_end_real_workers(run_cli, tiny_model_dir, tiny_csv, tmp_path):
    """Real workers on a tiny model: the answer, best/ and config.yaml that peftkit run takes."""
    out = tmp_path / "rec"
    code, stdout, err = run_cli(
        "recommend",
        "--time-budget",
        "4m",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--max-length",
        "16",
        "--strategies",
        "head_only,lora",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    assert stdout.strip().splitlines()[0].startswith("Use ")
    results = json.loads((out / "results.json").read_text())
    assert results["recommendation"]["strategy"] in ("head_only", "lora")
    again = str(tmp_path / "again")
    code, _o, err = run_cli("run", "--config", str(out / "best" / "config.yaml"), "--output-dir", again)
    assert code == 0, err
