"""What each ``peft:`` method runs on, found by a tiny dry build (``peftkit list --peft``): every
method on 2-block, 256-wide models of each surveyed architecture and task, cached per peft and
transformers version, with peft's one line where a method does not apply."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ...errors import first_line
from ...files import write_json
from ...gguf_convert import cache_dir
from ...tasks import get_task
from . import EXCLUDED, MethodRefused, method_names, resolve

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

# The dry build (``survey``): the architectures and tasks peftkit's tests cover, each model two blocks
# deep and 256 wide, so that peft's default sizes fit (C3A's block_size 256, VB-LoRA's vector_length
# 256, WaveFT's 2,592 frequencies, MiSS's r 64): a refusal is then about the architecture or the
# task, not about a toy size
SURVEY_MODELS: dict[str, dict[str, Any]] = {
    "bert": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512},
    "roberta": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512},
    "distilbert": {"dim": 256, "n_layers": 2, "n_heads": 4, "hidden_dim": 512},
    "gpt2": {"n_embd": 256, "n_layer": 2, "n_head": 4},
    "llama": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 512,
    },
}
SURVEY_TASKS = {"sequence-classification": tuple(SURVEY_MODELS), "causal-lm": ("gpt2", "llama")}
_SURVEY_FORMAT = 2


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def survey_path() -> str:
    """Where the dry build's results are cached: one file per peft and transformers version."""
    name = f"survey-v{_SURVEY_FORMAT}-peft-{_version('peft')}-transformers-{_version('transformers')}.json"
    return os.path.join(cache_dir(), "peft-methods", name)


def cached_survey() -> dict[str, Any] | None:
    """The dry build's results for the installed peft and transformers, if made (no import of peft)."""
    try:
        with open(survey_path(), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("methods"), dict) else None


def survey(refresh: bool = False) -> dict[str, Any]:
    """Where each ``peft:`` method runs: built (``prepare``) on a tiny model of each architecture
    for each task, then one forward and backward pass of the task's loss. Per method: ``runs``
    (task -> architectures) and ``refused`` (task -> architecture -> what peft said, one line). Cached
    (``survey_path``; a cache that cannot be written costs the next call the build, nothing else)."""
    cached = None if refresh else cached_survey()
    if cached is not None:
        return cached
    import torch
    from transformers.utils import logging as hf_logging

    start, threads, verbosity = time.perf_counter(), torch.get_num_threads(), hf_logging.get_verbosity()
    # one thread: on models this small, threads synchronising on every op cost more than they
    # share (a 2-core AMD EPYC beside other jobs: 100 s with 2 threads, 10 s with 1). Quiet: the
    # tiny configs' warnings and some methods' progress bars (FRoD's) are not the user's
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            methods = _survey_methods()
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
    result = {
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "seconds": round(time.perf_counter() - start, 1),
        "models": {arch: "2 blocks, 256 wide" for arch in SURVEY_MODELS},
        "methods": methods,
        "not_offered": dict(EXCLUDED),
    }
    try:
        os.makedirs(os.path.dirname(survey_path()), exist_ok=True)
        write_json(survey_path(), result)
    except OSError:
        pass
    return result


def _survey_methods() -> dict[str, Any]:
    """``survey``'s per-method results: each method on each (task, architecture)."""
    bases = {(task, arch): _survey_base(task, arch) for task, archs in SURVEY_TASKS.items() for arch in archs}
    methods: dict[str, Any] = {}
    for method in method_names():
        runs: dict[str, list[str]] = {task: [] for task in SURVEY_TASKS}
        refused: dict[str, dict[str, str]] = {task: {} for task in SURVEY_TASKS}
        for (task, arch), base in bases.items():
            said = _survey_one(method, task, base)
            if said is None:
                runs[task].append(arch)
            else:
                refused[task][arch] = said
        methods[method] = {"runs": runs, "refused": {task: why for task, why in refused.items() if why}}
    return methods


def _survey_base(task: str, arch: str) -> nn.Module:
    """The tiny model the dry build adapts for ``task`` on ``arch`` (random weights, seed 0)."""
    import torch
    from transformers import AutoConfig

    # 66 positions: RoBERTa's start after the padding index; GPT-2 reads it as n_positions
    config = AutoConfig.for_model(
        arch, vocab_size=64, pad_token_id=0, max_position_embeddings=66, **SURVEY_MODELS[arch]
    )
    config.num_labels = 2
    torch.manual_seed(0)
    return get_task(task).model_from_config(config)


def _survey_one(method: str, task: str, base: nn.Module) -> str | None:
    """None where ``method`` trains on (a copy of) ``base`` for ``task``, else why not, in one line."""
    strategy = resolve(method)()
    spec_task = get_task(task)
    model = copy.deepcopy(base)
    try:
        model = strategy.prepare(model, spec_task.plan_spec(model, 2))
        batch = spec_task.dummy_batch(base.config, 2, 8, "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec_task.step_loss(strategy, model)(model, batch).backward()
    except MethodRefused as exc:
        return exc.said
    except Exception as exc:  # noqa: BLE001 - whatever fails at the first step is the answer, in one line
        return f"{type(exc).__name__} at the first training step: {first_line(exc)}"
    return None
