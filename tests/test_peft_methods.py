"""The ``peft:`` strategies' contract, for every peft method on every tiny architecture and task.

Per method, architecture and task (sequence classification on BERT, RoBERTa, DistilBERT, GPT-2 and
Llama; causal LM on GPT-2 and Llama): the loop's own step (``peftkit.loop.train_step``) changes
only the method's parameters and the head; save -> load onto a fresh base gives identical logits;
plain peft (``PeftModel.from_pretrained``) loads the adapter and gives identical logits. A method
that does not apply is refused in one line naming the method, the model type and what peft said,
and must be one the table below expects. In-process, tiny models (32 wide), 1 step, batch 2,
length 8.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

import peftkit
from peftkit import registry
from peftkit.adapter_io import read_metadata, save_adapter
from peftkit.config import RunConfig
from peftkit.errors import PeftkitError
from peftkit.loop import make_accelerator, torch_param_groups, train_step
from peftkit.strategies.base import TaskSpec, options_from_dict
from peftkit.strategies.peft_methods import EXCLUDED, MethodRefused, method_names
from peftkit.tasks import get_task

from conftest import _build_tokenizer, _config

SEQ_CLS = TaskSpec(num_labels=2, label_names=("neg", "pos"))
SEQ_CLS_ARCHS = ("bert", "roberta", "distilbert", "gpt2", "llama")
# RoBERTa is BERT with another head (peft's tables name the same targets): slow-marked, run with -m slow
CASES = [
    pytest.param(
        "sequence-classification", arch, marks=[pytest.mark.slow] if arch == "roberta" else [], id=f"{arch}-cls"
    )
    for arch in SEQ_CLS_ARCHS
] + [pytest.param("causal-lm", arch, id=f"{arch}-lm") for arch in ("gpt2", "llama")]
METHODS = method_names()

# Sizes of peft's defaults that do not fit a 32-wide model (they fit 256 wide and up): the tiny
# models' own, so that the contract is checked on the method, not on a size peft refuses
SMALL = {
    "c3a": {"block_size": 8},
    "miss": {"r": 8},
    "shira": {"r": 4},
    "road": {"group_size": 8},
    "vblora": {"vector_length": 8},
    "waveft": {"n_frequency": 100},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
    "cartridge": {"num_virtual_tokens": 4},
}

# (method, architecture[, task]) peft refuses, with a word of what it says: any other refusal fails
CONV1D_REFUSED = "adamss beft boft c3a delora glora hra lily loha lokr miss oft peanut psoft road shira supertuning"
REFUSED = {
    **{(m, "gpt2"): "Conv1D" for m in CONV1D_REFUSED.split()},  # GPT-2's transposed linear layers
    ("osf", "gpt2"): "nothing to adapt",
    ("cartridge", "distilbert"): "past key values",
    # LLaMA-Adapter: peft's config cannot save a new head
    **{("adaption_prompt", a, "sequence-classification"): "no modules_to_save" for a in SEQ_CLS_ARCHS},
    **{("shadow", a): "decoder layers" for a in ("bert", "roberta", "distilbert")},
}


def _base(task: str, arch: str) -> torch.nn.Module:
    """A tiny model for ``task`` (random weights, seed 0, no dropout: two forwards must agree)."""
    tok = _build_tokenizer()
    config = _config(arch, len(tok), tok.pad_token_id)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob", "dropout", "attention_dropout"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    set_seed(0)
    if task == "causal-lm":
        config.tie_word_embeddings = True
        return AutoModelForCausalLM.from_config(config)
    config.num_labels = 2
    return AutoModelForSequenceClassification.from_config(config)


def _batch(task: str, vocab: int) -> dict[str, torch.Tensor]:
    """Batch 2, length 8; the second row padded on the left (as peftkit's causal-LM collate pads)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    if task == "sequence-classification":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    labels = ids.clone()
    labels[:, :5] = -100
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "logits_to_keep": 4,
        "use_cache": False,
    }


def _spec(task: str, model: torch.nn.Module) -> TaskSpec:
    return SEQ_CLS if task == "sequence-classification" else get_task("causal-lm").plan_spec(model, 0)


def _strategy(method: str):
    cls = registry.get_strategy(f"peft:{method}")
    return cls(options_from_dict(cls, SMALL.get(method, {})))


@functools.cache
def _accelerator():
    return make_accelerator(RunConfig(), None)[0]


def _logits(strategy, model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return strategy.forward(model, {k: v for k, v in batch.items() if k != "labels"})


@pytest.mark.parametrize("task,arch", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_peft_method_contract(method: str, task: str, arch: str, tmp_path) -> None:
    from peft import PeftModel

    base = _base(task, arch)
    pristine = copy.deepcopy(base)
    strategy = _strategy(method)
    spec = _spec(task, base)
    refused = REFUSED.get((method, arch, task)) or REFUSED.get((method, arch))
    try:
        model = strategy.prepare(base, spec)
    except MethodRefused as exc:
        assert refused is not None and refused in exc.said, f"peft:{method} on {arch}: {exc}"
        assert str(exc).startswith(f"strategy 'peft:{method}' does not apply to model type '{arch}' ({task}): ")
        assert "\n" not in str(exc)
        return
    assert refused is None, f"peft:{method} on {arch} ({task}) is no longer refused: update REFUSED"

    # one step of the loop's own training step, the strategy's hooks included
    declared = strategy.trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    accelerator = _accelerator()
    opt = torch.optim.AdamW(torch_param_groups(strategy.param_groups(model), 1e-2, 0.0), lr=1e-2)
    batch = _batch(task, base.config.vocab_size)
    step_loss = get_task(task).step_loss(strategy, model)
    model.train()
    train_step(
        accelerator, model, opt, strategy, step_loss, batch, step=0, total_steps=1, warmup_steps=0, max_grad_norm=1.0
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(declared), f"undeclared parameters changed: {sorted(changed - set(declared))[:3]}"
    heads = spec.heads(pristine)
    method_params = {n for n in changed if not any(f".{h}." in f".{n}" for h in heads)}
    assert method_params, f"peft:{method} on {arch}: nothing but the head changed"
    assert not heads or changed - method_params, f"peft:{method} on {arch}: the head did not train"

    # save -> load onto a fresh copy of the base: identical logits; nothing else in the directory
    directory = str(tmp_path / "adapter")
    save_adapter(directory, strategy, model, {"strategy": strategy.name})
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", "peftkit_adapter.json"]
    expected = _logits(strategy, model, batch)
    cls = type(strategy)  # the options as loading reads them back: from the adapter's metadata
    again = cls(options_from_dict(cls, read_metadata(directory)["strategy_options"]))
    fresh = again.prepare(copy.deepcopy(pristine), _spec(task, pristine))
    again.load_adapter(fresh, directory, read_metadata(directory))
    torch.testing.assert_close(_logits(again, fresh, batch), expected, rtol=0, atol=0)

    # plain peft loads it onto the base and computes the same
    plain = PeftModel.from_pretrained(copy.deepcopy(pristine), directory)
    torch.testing.assert_close(_logits(again, plain, batch), expected, rtol=0, atol=0)


def test_every_method_s_options_go_to_config_yaml_and_back() -> None:
    """A run writes its options to config.yaml and the adapter's metadata (JSON); both read back."""
    import yaml

    from peftkit.strategies.base import options_to_dict

    for method in METHODS:
        cls = registry.get_strategy(f"peft:{method}")
        written = options_to_dict(cls().options)
        assert options_to_dict(options_from_dict(cls, yaml.safe_load(yaml.safe_dump(written)))) == written, method
        assert options_to_dict(options_from_dict(cls, json.loads(json.dumps(written)))) == written, method


@pytest.mark.parametrize("method", sorted(EXCLUDED))
def test_excluded_methods_are_refused_with_the_reason(method: str) -> None:
    with pytest.raises(PeftkitError, match=rf"strategy 'peft:{method}' is not offered: .+"):
        registry.get_strategy(f"peft:{method}")


ADALORA_SHORT = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2}
"""AdaLoRA's schedule squeezed into 8 steps: ranks pruned from step 2, final at step 6."""


def _adalora(base: torch.nn.Module) -> tuple:
    """AdaLoRA (``ADALORA_SHORT``) prepared on ``base``, its AdamW at 1e-2, in training mode."""
    cls = registry.get_strategy("peft:adalora")
    strategy = cls(options_from_dict(cls, ADALORA_SHORT))
    model = strategy.prepare(base, SEQ_CLS)
    opt = torch.optim.AdamW(torch_param_groups(strategy.param_groups(model), 1e-2, 0.0), lr=1e-2)
    model.train()
    return strategy, model, opt


def _adalora_steps(strategy, model, opt, batch, start: int, stop: int) -> None:
    """The loop's own steps ``start`` .. ``stop - 1`` of an 8-step run on one batch."""
    step_loss = get_task("sequence-classification").step_loss(strategy, model)
    for step in range(start, stop):
        train_step(
            _accelerator(),
            model,
            opt,
            strategy,
            step_loss,
            batch,
            step=step,
            total_steps=8,
            warmup_steps=0,
            max_grad_norm=1.0,
        )


def test_adalora_allocates_ranks_through_the_hook_and_still_loads_identically(tmp_path) -> None:
    """Over a short run the hook sets the run's length as total_step and prunes ranks (their
    singular values masked to zero); the adapter, saved without the rank pattern, loads in
    peftkit and in plain peft to the very logits the trained model gives."""
    from peft import PeftModel

    base = _base("sequence-classification", "llama")
    pristine = copy.deepcopy(base)
    batch = _batch("sequence-classification", base.config.vocab_size)
    strategy, model, opt = _adalora(base)
    _adalora_steps(strategy, model, opt, batch, 0, 8)
    config = model.peft_config["default"]
    assert config.total_step == 8 and config.rank_pattern, "no rank was allocated"
    kept = [sum(bits) for bits in config.rank_pattern.values()]
    assert min(kept) < 6, f"no rank was pruned: {kept}"

    directory = str(tmp_path / "adapter")
    save_adapter(directory, strategy, model, {"strategy": strategy.name})
    expected = _logits(strategy, model, batch)
    cls = registry.get_strategy("peft:adalora")
    again = cls(options_from_dict(cls, ADALORA_SHORT))
    fresh = again.prepare(copy.deepcopy(pristine), SEQ_CLS)
    again.load_adapter(fresh, directory, {})
    torch.testing.assert_close(_logits(again, fresh, batch), expected, rtol=0, atol=0)
    plain = PeftModel.from_pretrained(copy.deepcopy(pristine), directory)
    torch.testing.assert_close(_logits(again, plain, batch), expected, rtol=0, atol=0)


def test_adalora_trains_with_peft_s_orthogonality_penalty() -> None:
    """The loop adds ``extra_loss`` to the task's loss: for AdaLoRA, the very penalty peft adds to
    a loss the model computes itself (labels given to it)."""
    import torch.nn.functional as F

    cls = registry.get_strategy("peft:adalora")
    strategy = cls(options_from_dict(cls, {"orth_reg_weight": 0.5}))
    model = strategy.prepare(_base("sequence-classification", "bert"), SEQ_CLS).train()
    batch = _batch("sequence-classification", model.config.vocab_size)
    with torch.no_grad():
        peft_loss = model(**batch).loss
        ours = F.cross_entropy(strategy.forward(model, batch), batch["labels"]) + strategy.extra_loss(model)
    torch.testing.assert_close(ours, peft_loss)
    assert strategy.extra_loss(model.eval()) is None and registry.get_strategy("lora")().extra_loss(model) is None


# -- the command line ---------------------------------------------------------------------------------


def test_run_with_a_peft_method_from_the_command_line(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """`peftkit run --strategy peft:ia3` end to end: options from --set, peft's files, and the
    adapter loads in peftkit (predict) and in plain peft with the same probabilities."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from peftkit.inference import load_adapter, predict_texts

    out = str(tmp_path / "run")
    args = ["run", "-s", "peft:ia3", "--model", tiny_model_dir("bert"), "--dataset", tiny_csv, "--output-dir", out]
    code, _, stderr = run_cli(
        *args, "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--set", "init_ia3_weights=true"
    )
    assert code == 0, stderr
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["strategy"] == "peft:ia3" and 0 < metrics["trainable_params"] < metrics["total_params"]
    adapter = os.path.join(out, "adapter")
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["peft_type"] == "IA3" and "classifier" in config["modules_to_save"]
    assert sorted(config["target_modules"]) == ["key", "output.dense", "value"]  # peft's table for BERT
    texts = ["a good and charming film", "dull boring plot"]
    ours = torch.tensor([r["probabilities"] for r in predict_texts(load_adapter(adapter), texts)])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("bert"))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"), num_labels=2)
    plain = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        theirs = torch.softmax(
            plain(**tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits, -1
        )
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)


def test_a_method_that_does_not_apply_is_one_line_and_writes_nothing(
    run_cli, tiny_model_dir, tiny_csv, tmp_path
) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        "run",
        "-s",
        "peft:loha",
        "--model",
        tiny_model_dir("gpt2"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        str(out),
        "--epochs",
        "1",
    )
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "strategy 'peft:loha' does not apply to model type 'gpt2' (sequence-classification): " in errors[0]
    assert "Conv1D" in errors[0]
    assert not out.exists() and [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_bad_options_and_names_are_one_line(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    common = ("--model", tiny_model_dir("bert"), "--dataset", tiny_csv, "--output-dir", str(tmp_path / "r"))
    code, _, stderr = run_cli("run", "-s", "peft:loha", *common, "--set", "alph=4")
    assert code == 2 and "unknown option 'alph' (did you mean 'alpha'?) for strategy 'peft:loha'; accepted: " in stderr
    code, _, stderr = run_cli(
        "run", "-s", "peft:boft", *common, "--set", "boft_block_size=4", "--set", "boft_block_num=4"
    )
    assert code == 2 and "strategy 'peft:boft': " in stderr and "boft_block_size" in stderr  # peft's own check
    code, _, stderr = run_cli("run", "-s", "peft:iaa3", *common)
    assert code == 2 and "unknown strategy 'peft:iaa3' (did you mean 'peft:ia3'?)" in stderr
    assert not (tmp_path / "r").exists()


def test_bench_takes_peft_methods_beside_the_others() -> None:
    from peftkit.benchmark.config import parse_strategies

    assert parse_strategies("lora,peft:ia3,peft:LoHa,peft:ia3") == ["lora", "peft:ia3", "peft:loha"]
    with pytest.raises(PeftkitError, match="strategy 'peft:lora' is not offered"):
        parse_strategies("lora,peft:lora")


def test_survey_builds_each_method_once_and_caches_it(monkeypatch, tmp_path) -> None:
    """The dry build behind `peftkit list --peft`, on two methods and two architectures: where each
    runs, peft's one line where not, cached per peft and transformers version."""
    from peftkit.strategies.peft_methods import survey as peft_methods

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(peft_methods, "method_names", lambda: ["ia3", "loha"])
    monkeypatch.setattr(
        peft_methods, "SURVEY_TASKS", {"sequence-classification": ("bert", "gpt2"), "causal-lm": ("gpt2",)}
    )
    assert peft_methods.cached_survey() is None
    found = peft_methods.survey()
    assert found["methods"]["ia3"] == {
        "runs": {"sequence-classification": ["bert", "gpt2"], "causal-lm": ["gpt2"]},
        "refused": {},
    }
    loha = found["methods"]["loha"]
    assert loha["runs"] == {"sequence-classification": ["bert"], "causal-lm": []}
    said = loha["refused"]["causal-lm"]["gpt2"]
    assert "Conv1D" in said and "\n" not in said and loha["refused"]["sequence-classification"]["gpt2"] == said
    assert os.path.dirname(peft_methods.survey_path()) == str(tmp_path / "peft-methods")
    monkeypatch.setattr(peft_methods, "_survey_methods", lambda: pytest.fail("the cache was not used"))
    assert peft_methods.survey() == found == peft_methods.cached_survey()


def test_list_shows_the_cached_survey_without_torch(tmp_path) -> None:
    """`peftkit list` shows where each method runs from the cache, and says how to get it without one."""
    import subprocess
    import sys

    from peftkit.strategies.peft_methods import survey as peft_methods

    env = {**os.environ, "PEFTKIT_CACHE": str(tmp_path)}
    code = (
        "import sys\nfrom peftkit.cli import main\ntry:\n    main(['list'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "peft:NAME" in shown.stdout and "`peftkit list --peft`" in shown.stdout
    survey = {
        "peft": "0.21.2",
        "transformers": "5.23.0",
        "methods": {
            "loha": {
                "runs": {"sequence-classification": ["bert"], "causal-lm": []},
                "refused": {"causal-lm": {"gpt2": "Conv1D is not supported"}},
            }
        },
        "not_offered": {"xlora": "mixes trained adapters"},
    }
    path = peft_methods.survey_path().replace(peft_methods.cache_dir(), str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as fh:
        json.dump(survey, fh)
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "peft:loha  sequence-classification: bert" in shown.stdout
    assert "not causal-lm: gpt2 (Conv1D is not supported)" in shown.stdout
    assert "not offered: peft:xlora: mixes trained adapters" in shown.stdout


def test_a_run_directory_of_a_family_strategy_has_no_colon() -> None:
    from peftkit.config import default_output_dir

    assert default_output_dir("peft:ia3").startswith(os.path.join("runs", "peft-ia3-"))


# -- merge ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ia3", "loha", "oft"])
def test_a_merged_method_computes_what_its_adapter_computes(method: str) -> None:
    """peft's merge folds the (moved) adapter and the trained head into a plain BERT classifier
    whose logits equal the adapter's; what ``peftkit merge`` writes and ``export`` serves."""
    base = _base("sequence-classification", "bert")
    strategy = _strategy(method)
    assert type(strategy).merges
    model = strategy.prepare(base, _spec("sequence-classification", base))
    torch.manual_seed(1)
    with torch.no_grad():  # away from the identity each method starts at, so the merge has work to do
        for p in strategy.trainable_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch("sequence-classification", base.config.vocab_size)
    expected = _logits(strategy, model, batch)
    merged = strategy.merge(model)
    assert type(merged) is type(base) and not any("default" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(strategy, merged, batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "shadow"])
def test_a_method_that_cannot_merge_says_why_in_one_line(method: str) -> None:
    cls = registry.get_strategy(f"peft:{method}")
    assert not cls.merges
    with pytest.raises(PeftkitError) as info:
        cls().merge(torch.nn.Linear(1, 1))
    message = str(info.value)
    assert message.startswith(f"strategy 'peft:{method}' cannot be merged into a plain model: ")
    assert "nothing to merge into them" in message and "modules of its own" not in message and "\n" not in message


# -- a plain peft adapter directory -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["ia3", "loha"])
def test_predict_and_inspect_take_a_plain_peft_adapter_of_a_method(method: str, tiny_model_dir, tmp_path) -> None:
    """An adapter peft wrote itself (no peftkit metadata) is matched to ``peft:NAME`` by its
    ``peft_type`` and predicts what peft's own model computes."""
    from peft import PeftModel, get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers import AutoTokenizer

    from peftkit.adapter_io import describe_adapter
    from peftkit.inference import load_adapter, predict_texts

    base_dir = tiny_model_dir("bert")
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[method.upper()]
    targets = {"target_modules": ["query", "value"]} | ({"feedforward_modules": []} if method == "ia3" else {})
    model = get_peft_model(base, config_cls(task_type="SEQ_CLS", **targets))
    with torch.no_grad():  # off the identity each starts at: the adapter must change the answers
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    directory = str(tmp_path / "plain")
    model.save_pretrained(directory)
    assert not os.path.exists(os.path.join(directory, "peftkit_adapter.json"))

    texts = ["a good and charming film", "dull boring plot"]
    loaded = load_adapter(directory, model=base_dir)
    assert loaded.metadata["strategy"] == f"peft:{method}"
    ours = torch.tensor([r["probabilities"] for r in predict_texts(loaded, texts)])
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2), directory
    ).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        theirs = torch.softmax(plain(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert describe_adapter(directory)["peft_type"] == method.upper()
    # inspect names the strategy peftkit loads it as
    assert peftkit.inspect(directory)["strategy"] == f"peft:{method}"


def test_list_verbose_says_whether_each_method_merges(run_cli, monkeypatch, tmp_path) -> None:
    from peftkit.strategies.peft_methods import survey as peft_methods

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    runs = {"runs": {"sequence-classification": ["bert"], "causal-lm": []}, "refused": {}}
    survey = {"peft": "x", "transformers": "y", "methods": {"loha": runs, "prompt_tuning": runs}}
    os.makedirs(os.path.dirname(peft_methods.survey_path()))
    with open(peft_methods.survey_path(), "w") as fh:
        json.dump(survey, fh)
    code, out, err = run_cli("list", "-v", "--peft")
    assert code == 0, err
    assert "merge: peft merge_and_unload" in out
    assert "merge: refused, a prompt method: what it trained (virtual tokens, a key/value prefix) is an input" in out


def test_adalora_resumed_from_its_extra_state_goes_on_as_an_uninterrupted_run() -> None:
    """A checkpoint keeps AdaLoRA's importance averages and rank pattern (``extra_state``): a copy
    given the trained weights, the optimizer's state and that extra state, after the 4th of 8 steps,
    prunes the same ranks and ends with the very logits of the run that was never stopped."""
    base = _base("sequence-classification", "llama")
    pristine = copy.deepcopy(base)
    batch = _batch("sequence-classification", base.config.vocab_size)
    strategy, model, opt = _adalora(base)
    _adalora_steps(strategy, model, opt, batch, 0, 4)
    extra = {k: v.clone() for k, v in strategy.extra_state(model).items()}
    assert any(k.startswith("exp_avg_ipt.") for k in extra), sorted(extra)[:3]
    again, resumed, resumed_opt = _adalora(copy.deepcopy(pristine))
    resumed.load_state_dict(model.state_dict())
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    again.load_extra_state(resumed, extra)
    _adalora_steps(strategy, model, opt, batch, 4, 6)
    _adalora_steps(again, resumed, resumed_opt, batch, 4, 6)
    # the averages went on where they were (peft resets them at the final allocation, step 6 of 8)
    ran, went_on = model.base_model.rankallocator, resumed.base_model.rankallocator
    for kind in ("exp_avg_ipt", "exp_avg_unc"):
        assert getattr(ran, kind) and getattr(went_on, kind).keys() == getattr(ran, kind).keys()
        for name, t in getattr(ran, kind).items():
            torch.testing.assert_close(getattr(went_on, kind)[name], t, rtol=0, atol=0)
    _adalora_steps(strategy, model, opt, batch, 6, 8)
    _adalora_steps(again, resumed, resumed_opt, batch, 6, 8)
    assert resumed.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    torch.testing.assert_close(_logits(again, resumed, batch), _logits(strategy, model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("method,option", [("c3a", "block_size"), ("vblora", "vector_length")])
@pytest.mark.parametrize("asked,used", [(None, 48), (32, 24), (16, 16)])
def test_a_size_that_must_divide_the_widths_is_fitted_to_them(method, option, asked, used, caplog) -> None:
    """peft's default 256 divides no 48-wide (or MiniLM's 384-wide) layer, and peft refuses the model:
    the largest divisor of the widths not above the value asked runs instead, and the run says so."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "bert", vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96
    )
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config)
    cls = registry.get_strategy(f"peft:{method}")
    strategy = cls(options_from_dict(cls, {} if asked is None else {option: asked}))
    with caplog.at_level("INFO", logger="peftkit"):
        peft_model = strategy.prepare(model, SEQ_CLS)
    assert getattr(peft_model.peft_config["default"], option) == used
    said = [r.getMessage() for r in caplog.records if option in r.getMessage()]
    assert said == (
        []
        if used == (asked or 256)
        else [f"peft:{method}: {option} {asked or 256} does not divide the targets' widths (48); using {used}"]
    )
