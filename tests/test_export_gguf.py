"""`peftkit export --format gguf` (issue 17): a causal-LM LoRA adapter merged into a tiny Llama with a
byte-level BPE tokenizer, written as GGUF and read back by transformers' GGUF loader with the same
tokens and greedy generations; refusals in one line."""

from __future__ import annotations

import json
import os

import pytest

from conftest import make_rows


@pytest.fixture(scope="module")
def tiny_bpe_llama(tmp_path_factory) -> str:
    """A tiny Llama causal LM (tied embeddings, grouped-query attention) with a byte-level BPE
    tokenizer trained on the test sentences: what a GGUF file can hold."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

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
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bpe-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _causal_adapter(base_dir: str, directory, strategy: str = "lora") -> str:
    import torch

    import peftkit
    from peftkit.tasks import TaskData, get_task

    task = get_task("causal-lm")
    tok = task.load_processor(base_dir)
    base = task.load_model(base_dir, TaskData(None, None, {}), tok, None, "fp32")
    chosen = peftkit.get_strategy(strategy)()
    model = chosen.prepare(base, task.spec(base, TaskData(None, None, {})))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # the adapter must change the answers
    path = str(directory / strategy)
    peftkit.save_adapter(path, chosen, model)
    return path


def test_a_lora_adapter_round_trips_through_gguf(tiny_bpe_llama, run_cli, tmp_path) -> None:
    import gguf

    adapter, out = _causal_adapter(tiny_bpe_llama, tmp_path), str(tmp_path / "gguf")
    code, stdout, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--output", out)
    assert code == 0, err
    assert "greedy tokens the same as PyTorch's on all 3 prompts" in err and "model.gguf" in stdout
    assert "de-quantizing" not in err and "\r" not in err  # issue 32 (8): no library bar in a log
    assert sorted(os.listdir(out)) == ["model.gguf", "peftkit_export.json"]
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        meta = json.load(fh)
    assert meta["format"] == "gguf" and meta["merged"] is True and len(meta["check"]["generations"]) == 3
    reader = gguf.GGUFReader(os.path.join(out, "model.gguf"))
    names = {t.name for t in reader.tensors}
    # llama.cpp's names; the tied output layer is left out; no LoRA tensors (merged)
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert "output.weight" not in names and not any("lora" in n for n in names)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    # the check can fail: a file whose query rows are not permuted generates otherwise (here: refused)
    import peftkit.gguf_export as ge

    real = ge._permute
    try:
        ge._permute = lambda weight, heads: weight
        code, _, err = run_cli("export", "--adapter", adapter, "--format", "gguf", "--output", str(tmp_path / "bad"))
    finally:
        ge._permute = real
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "differs from PyTorch" in errors[0], err
    assert not (tmp_path / "bad").exists()


def test_gguf_refusals_are_one_line(tiny_bpe_llama, tiny_causal_dir, tiny_model_dir, run_cli, tmp_path) -> None:
    from test_export import _adapter

    head = _causal_adapter(tiny_bpe_llama, tmp_path, "head_only")
    (tmp_path / "classifier").mkdir()
    classifier = _adapter(tiny_model_dir, tmp_path / "classifier", "lora")
    lora = _causal_adapter(tiny_bpe_llama, tmp_path)
    out = str(tmp_path / "out")
    cases = [
        ((head,), "strategy 'head_only' cannot be merged into a plain model, which a GGUF file holds"),
        (
            (classifier,),
            "--format gguf exports language models (causal-lm adapters); this adapter is a "
            "sequence-classification adapter: use --format onnx",
        ),
        ((lora, "--quantize", "int8"), "--quantize: for --format onnx or openvino only"),
        (
            (lora, "--dataset", "rotten_tomatoes"),
            "--dataset, --text-column, --label-column: for --format onnx or openvino only",
        ),
    ]
    for args, expected in cases:
        code, _, err = run_cli("export", "--format", "gguf", "--output", out, "--adapter", *args)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], (args, err)
    assert not os.path.exists(out)
