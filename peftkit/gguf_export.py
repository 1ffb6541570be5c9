"""``peftkit export --format gguf``: a causal-LM adapter merged into its Llama-architecture base and
written as one GGUF file, the format llama.cpp and Ollama load.

The file follows llama.cpp's own converter (``convert_hf_to_gguf.py``) for Llama models, through the
``gguf`` package that ships with llama.cpp (already peftkit's dependency, for reading the embedded
SmolLM2):

- tensors renamed by ``gguf``'s name map for the Llama architecture (``model.layers.0.self_attn.q_proj``
  -> ``blk.0.attn_q``), the query and key projections permuted as llama.cpp's rotary embedding
  expects them (its convention pairs dimension i with i + head_dim / 2 by interleaving);
  an output layer tied to the embeddings is left out, as llama.cpp reads it from ``token_embd``;
- the config as ``llama.*`` keys (context length, sizes, heads, rope base, RMS-norm epsilon);
- the tokenizer as ``tokenizer.ggml.*`` keys: byte-level BPE (``gpt2``) vocabulary, merges, token
  types (special tokens as control), the special token ids, and the chat template;
- weights in float32: the exported model computes what PyTorch computes (quantize with llama.cpp's
  ``llama-quantize`` afterwards).

It is checked before it is kept: transformers' own GGUF loader reads it back (model and tokenizer),
and greedy generations of a few prompts must be token for token PyTorch's, as must the prompts'
tokenization. An export that fails leaves nothing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from .env import package_versions
from .errors import PeftkitError
from .exporter import EXPORT_METADATA, ExportResult
from .inference import adapter_task, load_adapter
from .registry import available
from .rundir import check_output_dir, staged_dir

GGUF_FILE = "model.gguf"
ARCHITECTURES = ("llama",)
"""Model types written (``config.model_type``): what llama.cpp's conventions here are known to fit."""
CHECK_PROMPTS = ("The capital of France is", "Once upon a time,", "def fibonacci(n):")
CHECK_NEW_TOKENS = 12
LOGIT_TOLERANCE = 1e-3
"""Largest difference in any logit of the prompts between the file read back and PyTorch: the same
float32 weights give the same logits up to kernel order (~1e-5); a misplaced tensor moves them by
far more, even where a greedy continuation happens not to change."""

Echo = Callable[[str], None]


def _permute(weight: Any, heads: int) -> Any:
    """llama.cpp's order of a query or key projection's rows for ``heads`` heads (its converter's
    ``LlamaModel.permute``): within each head, the two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_fields(tokenizer: Any) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE tokenizer (refused: any other kind)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise PeftkitError(
            f"GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 model); this one is {model.get('type')!r}"
        )
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    types = [3 if t in special else 4 if t in added else 1 for t in tokens]  # control, user-defined, normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_gguf(model: Any, tokenizer: Any, path: str) -> None:
    """Write the Llama-architecture causal LM ``model`` (float32) and its ``tokenizer`` to ``path``."""
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    fields = _tokenizer_fields(tokenizer)
    if len(fields["tokens"]) != config.vocab_size:
        raise PeftkitError(
            f"the tokenizer has {len(fields['tokens']):,} tokens and the model {config.vocab_size:,} "
            "embeddings; llama.cpp needs them equal"
        )
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "peftkit export"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(
        float(
            getattr(config, "rope_theta", None)
            or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        )
    )
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, tokenizer, fields)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    _add_tensors(writer, model, names, tied, heads, kv_heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: Any, tokenizer: Any, fields: dict[str, Any]) -> None:
    """The tokenizer's GGUF keys: its byte-level BPE vocabulary (``fields``, from
    ``_tokenizer_fields``), the special tokens' ids and the chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for add, token in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token is not None:
            add(int(token))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _add_tensors(writer: Any, model: Any, names: Any, tied: bool, heads: int, kv_heads: int) -> None:
    """Every tensor of ``model`` under its llama.cpp name (``names``: gguf's map), float32, the query
    and key projections permuted as llama.cpp's rotary embedding reads them; a tied output layer
    left out."""
    import numpy as np

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reads a missing output layer from the token embeddings
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise PeftkitError(f"GGUF export does not know where tensor {name!r} goes in a llama.cpp model")
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))


def _greedy(model: Any, tokenizer: Any, prompts: list[str]) -> tuple[list[list[int]], list[list[int]], list[Any]]:
    """Each prompt's token ids, its greedy continuation (``CHECK_NEW_TOKENS`` tokens) and the
    logits over the prompt."""
    import torch

    encoded, generated, logits = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            logits.append(model(**ids).logits[0].float())
            out = model.generate(
                **ids,
                max_new_tokens=CHECK_NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            encoded.append(ids["input_ids"][0].tolist())
            generated.append(out[0, ids["input_ids"].shape[1] :].tolist())
    return encoded, generated, logits


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """transformers' GGUF reader draws its "Converting and de-quantizing GGUF tensors..." bar with
    tqdm directly, past its own ``disable_progress_bar`` switch, and without a terminal its carriage
    returns land in the user's log: the bar is built disabled while the check reads the file back."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # another layout of transformers: its bar shows, nothing else changes
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def export_gguf(
    adapter_dir: str,
    output: str,
    model: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    echo: Echo = lambda _: None,
) -> Any:
    """Merge the causal-LM adapter in ``adapter_dir`` into its base (or ``model``) and write it as
    ``output/model.gguf`` with ``peftkit_export.json``, checked as the module's docstring says.
    Refused in one line: an adapter of another task, a strategy that cannot be merged, a base that
    is not a Llama-architecture model, an existing ``output`` (unless ``overwrite``), a failed check."""
    check_output_dir(output, overwrite, flag="--output")
    task, loaded, merged = _merged_llama(adapter_dir, model, force, echo)
    meta = loaded.metadata
    template = meta.get("prompt_template")
    prompts = list(CHECK_PROMPTS) + ([template.format(text="A quietly devastating film.")] if template else [])
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    reference = _greedy(merged, loaded.tokenizer, prompts)
    with staged_dir(output, overwrite, flag="--output") as stage:
        path = os.path.join(stage, GGUF_FILE)
        echo(f"writing {meta['strategy']} merged into {meta['base_model']!r} as GGUF (float32) ...")
        write_gguf(merged, loaded.tokenizer, path)
        seconds["write"] = time.perf_counter() - clock
        clock = time.perf_counter()
        echo(f"checking: transformers reads it back; greedy generations of {len(prompts)} prompts ...")
        got = _read_back_greedy(stage, prompts)
        seconds["check"] = time.perf_counter() - clock
        check = _compare(prompts, reference, got, loaded.tokenizer, echo)
        size = os.path.getsize(path)
        with open(os.path.join(stage, EXPORT_METADATA), "w") as f:
            json.dump(_gguf_record(adapter_dir, task.name, meta, check), f, indent=2)
    return ExportResult(output, "gguf", meta["strategy"], meta["base_model"], True, None, 0, size, check, seconds)


def _merged_llama(adapter_dir: str, model: str | None, force: bool, echo: Echo) -> tuple[Any, Any, Any]:
    """The adapter's task, the loaded adapter and its strategy's serving model merged into the base
    (float32, eval mode); refused in one line for an adapter of another task, a strategy that
    cannot be merged and a base of another architecture than ``ARCHITECTURES``."""
    task = adapter_task(adapter_dir)
    if not task.generates:
        raise PeftkitError(
            f"--format gguf exports language models (causal-lm adapters); this adapter is a "
            f"{task.name} adapter: use --format onnx"
        )
    echo(f"loading adapter {adapter_dir!r} ...")
    loaded = load_adapter(adapter_dir, model, force=force)
    strategy, meta = loaded.strategy, loaded.metadata
    if not strategy.merges:
        able = ", ".join(sorted(name for name, cls in available().items() if cls.merges))
        raise PeftkitError(
            f"strategy {strategy.name!r} cannot be merged into a plain model, which a GGUF file holds; "
            f"these can: {able}"
        )
    merged = strategy.serving_model(loaded.model).float().eval()
    kind = getattr(merged.config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise PeftkitError(
            f"--format gguf writes llama.cpp's Llama architecture; the base {meta['base_model']!r} is "
            f"a {kind!r} model (supported: {', '.join(ARCHITECTURES)})"
        )
    return task, loaded, merged


def _read_back_greedy(stage: str, prompts: list[str]) -> tuple[list[list[int]], list[list[int]], list[Any]]:
    """The GGUF file in ``stage`` read back by transformers (model and tokenizer), and its greedy
    generations of ``prompts`` (``_greedy``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_gguf_progress_bar():
        back = AutoModelForCausalLM.from_pretrained(stage, gguf_file=GGUF_FILE, dtype="float32").eval()
        back_tokenizer = AutoTokenizer.from_pretrained(stage, gguf_file=GGUF_FILE)
    return _greedy(back, back_tokenizer, prompts)


def _compare(
    prompts: list[str],
    reference: tuple[list[list[int]], list[list[int]], list[Any]],
    got: tuple[list[list[int]], list[list[int]], list[Any]],
    tokenizer: Any,
    echo: Echo,
) -> dict[str, Any]:
    """The file read back against PyTorch (token ids, greedy tokens, logits, each ``_greedy``'s):
    the export's ``check`` record, or refused (nothing written) where any differs."""
    reference_ids, reference_out, reference_logits = reference
    got_ids, got_out, got_logits = got
    same_tokens = sum(a == b for a, b in zip(got_ids, reference_ids))
    same_out = sum(a == b for a, b in zip(got_out, reference_out))
    diff = max(
        (float((a - b).abs().max()) if a.shape == b.shape else float("inf"))
        for a, b in zip(got_logits, reference_logits)
    )
    if same_tokens < len(prompts) or same_out < len(prompts) or not diff <= LOGIT_TOLERANCE:
        raise PeftkitError(
            f"the GGUF file read back differs from PyTorch: {len(prompts) - same_tokens} of "
            f"{len(prompts)} prompts tokenized otherwise, {len(prompts) - same_out} generated "
            f"otherwise, logits up to {diff:.2e} apart (allowed {LOGIT_TOLERANCE:g}); nothing "
            "was written"
        )
    echo(
        f"check: tokenization and {CHECK_NEW_TOKENS} greedy tokens the same as PyTorch's on all "
        f"{len(prompts)} prompts; logits within {diff:.1e}"
    )
    return {
        "prompts": prompts,
        "new_tokens": CHECK_NEW_TOKENS,
        "max_abs_logit_diff": diff,
        "logit_tolerance": LOGIT_TOLERANCE,
        "generations": [{"prompt": p, "completion": tokenizer.decode(o)} for p, o in zip(prompts, reference_out)],
    }


def _gguf_record(adapter_dir: str, task: str, meta: dict[str, Any], check: dict[str, Any]) -> dict[str, Any]:
    """What ``peftkit_export.json`` says of a GGUF export."""
    return {
        "format": "gguf",
        "architecture": "llama",
        "tensor_type": "F32",
        "task": task,
        "strategy": meta["strategy"],
        "merged": True,
        "base_model": meta["base_model"],
        "base_fingerprint": meta.get("base_fingerprint"),
        "adapter": os.path.abspath(adapter_dir),
        "check": check,
        "versions": package_versions(("torch", "transformers", "peft", "gguf")),
    }
