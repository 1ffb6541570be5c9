"""Shared fixtures: tiny models built from a config in milliseconds, a tiny tokenizer, small data.

The hub is never reached: HF_HUB_OFFLINE makes any accidental hub access fail at once instead of
waiting for a network that is not there.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for the tiny models that carry most tests, in this process and every process a
# test starts (set before torch is first imported, and inherited): a 32-wide layer is microseconds
# of work, and two OpenMP threads synchronising on every op cost more than they share. Measured on
# a 2-core AMD EPYC with other jobs beside it, tests/test_resume.py::test_resume_refusals plus the
# causal-LM strategy matrix took 46-65 s with 2 threads and 15-19 s with 1. The tests marked real
# get their share of the machine's threads back (``_real_models_use_every_core``): their MiniLM /
# SmolLM2 layers are big enough to share.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def real_model_threads() -> int:
    """The threads a test marked ``real`` runs on: the machine's cores, shared among pytest-xdist's
    workers. The README's ``-n auto`` starts a worker per core, each busy with tests of its own, so
    more threads than a worker's share only wait on each other: on a 2-core AMD EPYC with other jobs
    beside it, SmolLM2-135M's 16 greedy tokens took PyTorch 9.7 s on 2 threads and 2.4 s on 1,
    llama.cpp 13.7 s and 2.3 s."""
    return max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def _real_models_use_every_core(request, monkeypatch):
    """A test marked ``real`` runs with torch's default threads (the machine's cores), in this
    process and in those it starts, as it would for a user, unless pytest-xdist's workers share the
    cores (``real_model_threads``); the others keep one (see above)."""
    threads = real_model_threads()
    if request.node.get_closest_marker("real") is None or os.environ.get("OMP_NUM_THREADS") != "1" or threads == 1:
        yield
        return
    import torch

    if threads == CORES:
        monkeypatch.delenv("OMP_NUM_THREADS")
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ARCHITECTURES = ("bert", "roberta", "distilbert", "gpt2", "llama")

POSITIVE = ["good", "great", "wonderful", "moving", "brilliant", "fun", "charming", "superb"]
NEGATIVE = ["bad", "dull", "awful", "boring", "tedious", "weak", "clumsy", "lifeless"]
FILLER = ["the", "film", "movie", "plot", "story", "is", "was", "a", "and", "very", "quite", "acting"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Sentences whose label is given by which sentiment words they hold (learnable, not trivial)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + POSITIVE + NEGATIVE + FILLER)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )


def _config(arch: str, vocab_size: int, pad_id: int):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, pad_token_id=pad_id)
    if arch == "bert":
        return AutoConfig.for_model(
            "bert",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    if arch == "roberta":
        return AutoConfig.for_model(
            "roberta",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=70,
            **common,
        )
    if arch == "distilbert":
        return AutoConfig.for_model(
            "distilbert", dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=64, **common
        )
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)
    if arch == "llama":
        return AutoConfig.for_model(
            "llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    raise ValueError(arch)


def save_quietly(model, path) -> None:
    """``model.save_pretrained(path)`` without transformers' "Writing model shards" bar: a
    session fixture first built inside a test would put that bar in the test's captured stderr
    (a test reading stderr's first line then failed when it ran alone)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` -> a local model directory (random weights + tokenizer), cached."""
    cache: dict[str, str] = {}

    def build(arch: str = "bert") -> str:
        if arch not in cache:
            import torch
            from transformers import AutoModel

            torch.manual_seed(0)
            tok = _build_tokenizer()
            model = AutoModel.from_config(_config(arch, len(tok), tok.pad_token_id))
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_quietly(model, path)
            tok.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return build


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory) -> str:
    """A tiny Llama-style causal LM (tied input/output embeddings, like SmolLM2) + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = _build_tokenizer()
    config = _config("llama", len(tok), tok.pad_token_id)
    config.tie_word_embeddings = True
    config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("tiny-causal")
    save_quietly(AutoModelForCausalLM.from_config(config), path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> str:
    """A tiny ViT (16x16 RGB images, random weights) and its image processor."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    path = tmp_path_factory.mktemp("tiny-vit")
    save_quietly(ViTModel(config, add_pooling_layer=False), path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> str:
    """A 200-row CSV with text and string labels (pos / neg)."""
    import csv

    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(make_rows(200))
    return str(path)


@pytest.fixture(scope="session")
def pairs_csv(tmp_path_factory) -> str:
    """Prompt / response pairs: the answer is "good" for positive sentences, "bad" otherwise."""
    import csv

    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        writer.writeheader()
        for row in make_rows(200, seed=1):
            writer.writerow({"prompt": row["text"], "response": "good" if row["label"] == "pos" else "bad"})
    return str(path)


def fake_plugin_env(tmp_path, module_source: str, entry: str, group: str = "peftkit.strategies") -> dict[str, str]:
    """An environment with a fake installed distribution on PYTHONPATH: ``module_source`` as
    ``fake_plugin_mod`` and ``entry`` (``name = fake_plugin_mod:Attr``) in entry-point ``group``."""
    import textwrap

    (tmp_path / "fake_plugin_mod.py").write_text(textwrap.dedent(module_source))
    dist = tmp_path / "fake_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PEFTKIT_DISABLE_PLUGINS", None)
    return env


@pytest.fixture
def example_plugin() -> None:
    """Skip unless plugins/peftkit-bitfit (a separate distribution install.sh installs) is
    installed and plugins are on."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("peftkit-bitfit")
    except PackageNotFoundError:
        pytest.skip("plugins/peftkit-bitfit is not installed (install.sh installs it)")
    if os.environ.get("PEFTKIT_DISABLE_PLUGINS"):
        pytest.skip("plugins disabled by PEFTKIT_DISABLE_PLUGINS")


@pytest.fixture
def run_cli(capsys):
    """Run ``peftkit ARGS`` in-process; return (exit code, stdout, stderr)."""
    from peftkit.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def kill_after_checkpoint(command: list[str], stage: str, min_step: int, env: dict[str, str]) -> None:
    """Start ``command`` (a run with --checkpoint-every, whose staging directory is ``stage``) and
    SIGKILL it, with every process it started, as soon as a checkpoint at or after ``min_step``
    exists (often while it writes the next one). torchrun starts its workers in sessions of their
    own, so the whole tree is killed, not a process group."""
    import signal
    import subprocess
    import time

    import psutil
    import pytest

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 200
    root = os.path.join(stage, "checkpoints")
    try:
        while time.time() < deadline:
            done = [d for d in os.listdir(root) if d.startswith("step-")] if os.path.isdir(root) else []
            if any(int(d.split("-")[1]) >= min_step for d in done):
                for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                    p.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}")
            time.sleep(0.002)
        else:
            pytest.fail("no checkpoint appeared")
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
