"""``peftkit export --format gguf``: a causal-LM adapter merged into its Llama-architecture base and
written as one GGUF file, the format llama.cpp and Ollama load (``--lora-only``, the adapter alone
as a llama.cpp LoRA file: ``peftkit.gguf_lora``).

The file is what llama.cpp's own converter (``convert_hf_to_gguf.py``) writes for a Llama model,
through the ``gguf`` package that ships with llama.cpp (already peftkit's dependency, for reading
the embedded SmolLM2):

- tensors renamed by ``gguf``'s name map for the Llama architecture (``model.layers.0.self_attn.q_proj``
  -> ``blk.0.attn_q``), the query and key projections permuted as llama.cpp's rotary embedding
  expects them (its convention pairs dimension i with i + head_dim / 2 by interleaving);
  an output layer tied to the embeddings is left out, as llama.cpp reads it from ``token_embd``;
- the config as ``llama.*`` keys (context length, sizes, heads, rope base, RMS-norm epsilon);
- the tokenizer as the converter writes it (``peftkit.gguf_vocab``): its pre-tokenizer's name
  (``tokenizer.ggml.pre``, decided as the converter decides it; a tokenizer llama.cpp would not
  recognise is refused unless ``--gguf-pre`` names one), vocabulary, token types, merges, special
  token ids, whether bos is added, the chat template;
- weights in float32: the exported model computes what PyTorch computes (quantize with llama.cpp's
  ``llama-quantize`` afterwards).

It is checked before it is kept, by llama.cpp itself where the ``xllamacpp`` wheel is installed
(``peftkit.gguf_check``: the prompts' token ids, 16 greedy tokens and their probabilities against
PyTorch, no warning in llama.cpp's log); without it, by transformers' own GGUF reader (the same
comparison, and the logits, but blind to ``tokenizer.ggml.pre``, which transformers ignores). An
export that fails leaves nothing.
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
from .gguf_check import CHECK_NEW_TOKENS, check_prompts, greedy_reference, llamacpp_check
from .gguf_vocab import add_tokenizer, decide_pre_tokenizer
from .inference import adapter_task, load_adapter
from .llamacpp import available as llamacpp_available
from .registry import available
from .rundir import check_output_dir, staged_dir

GGUF_FILE = "model.gguf"
ARCHITECTURES = ("llama",)
"""Model types written (``config.model_type``): what llama.cpp's conventions here are known to fit."""
LOGIT_TOLERANCE = 1e-3
"""Largest difference in any logit of the prompts between the file read back by transformers and
PyTorch (the check without llama.cpp): the same float32 weights give the same logits up to kernel
order (~1e-5); a misplaced tensor moves them by far more, even where a greedy continuation happens
not to change."""
NO_LLAMACPP = (
    "xllamacpp is not installed, so llama.cpp cannot check the file itself: checking with transformers' "
    "GGUF reader instead, which ignores tokenizer.ggml.pre (pip install 'peftkit[export]' for llama.cpp's check)"
)

Echo = Callable[[str], None]


def permute_rows(weight: Any, heads: int) -> Any:
    """llama.cpp's order of a query or key projection's rows for ``heads`` heads (its converter's
    ``LlamaModel.permute``): within each head, the two rotary halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model: Any, tokenizer: Any, path: str, pre: str) -> None:
    """Write the Llama-architecture causal LM ``model`` (float32) and its ``tokenizer`` to ``path``
    as llama.cpp's converter writes them, ``pre`` as the tokenizer's ``tokenizer.ggml.pre``
    (``gguf_vocab.decide_pre_tokenizer``)."""
    import gguf

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(str(getattr(config, "_name_or_path", "") or "peftkit export"))
    add_llama_parameters(writer, config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, config, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    _add_tensors(writer, model, names, tied, heads, kv_heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_llama_parameters(writer: Any, config: Any) -> None:
    """The ``llama.*`` keys of ``config``, as the converter's ``LlamaModel.set_gguf_parameters``
    writes them (the head size as key and value length where the config names one)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_freq_base(
        float(
            getattr(config, "rope_theta", None)
            or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        )
    )
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


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
            data = permute_rows(data, heads)
        elif name.endswith("k_proj.weight"):
            data = permute_rows(data, kv_heads)
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
    pre: str | None = None,
    echo: Echo = lambda _: None,
) -> Any:
    """Merge the causal-LM adapter in ``adapter_dir`` into its base (or ``model``) and write it as
    ``output/model.gguf`` with ``peftkit_export.json``, checked as the module's docstring says.
    ``pre``: the ``tokenizer.ggml.pre`` to write instead of the one decided (``--gguf-pre``).
    Refused in one line: an adapter of another task, a strategy that cannot be merged, a base that
    is not a Llama-architecture model, a tokenizer llama.cpp would not recognise, an existing
    ``output`` (unless ``overwrite``), a failed check."""
    check_output_dir(output, overwrite, flag="--output")
    task, loaded, merged = _merged_llama(adapter_dir, model, force, echo)
    meta, tokenizer = loaded.metadata, loaded.tokenizer
    pre_tokenizer = decide_pre_tokenizer(tokenizer, pre)
    prompts = check_prompts(meta)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    by_llamacpp = llamacpp_available()
    reference: Any = (greedy_reference if by_llamacpp else _greedy)(merged, tokenizer, prompts)
    with staged_dir(output, overwrite, flag="--output") as stage:
        path = os.path.join(stage, GGUF_FILE)
        echo(f"writing {meta['strategy']} merged into {meta['base_model']!r} as GGUF (float32) ...")
        write_gguf(merged, tokenizer, path, pre_tokenizer["name"])
        seconds["write"] = time.perf_counter() - clock
        clock = time.perf_counter()
        if by_llamacpp:
            echo(f"checking: llama.cpp reads it; token ids and greedy tokens of {len(prompts)} prompts ...")
            context = merged.config.max_position_embeddings
            check = llamacpp_check(path, prompts, reference, tokenizer, context, echo=echo)
        else:
            echo(NO_LLAMACPP)
            check = _compare(prompts, reference, _read_back_greedy(stage, prompts), tokenizer, echo)
        seconds["check"] = time.perf_counter() - clock
        check["pre_tokenizer"] = pre_tokenizer
        size = os.path.getsize(path)
        with open(os.path.join(stage, EXPORT_METADATA), "w") as f:
            json.dump(gguf_record(adapter_dir, task.name, meta, check, merged=True), f, indent=2)
    return ExportResult(
        *(output, "gguf", meta["strategy"], meta["base_model"], True, None, 0, size, check, seconds),
        files=[GGUF_FILE],
        usage=f"llama-cli -m {os.path.join(output, GGUF_FILE)}",
    )


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
            f"strategy {strategy.name!r} cannot be merged into a plain model, which a GGUF file holds: "
            f"{strategy.not_merged_reason()}; these can: {able}, and the peft: methods peft merges (not the "
            "prompt methods)"
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
        "reader": "transformers' GGUF reader (llama.cpp not installed)",
        "prompts": prompts,
        "new_tokens": CHECK_NEW_TOKENS,
        "max_abs_logit_diff": diff,
        "logit_tolerance": LOGIT_TOLERANCE,
        "generations": [{"prompt": p, "completion": tokenizer.decode(o)} for p, o in zip(prompts, reference_out)],
    }


def gguf_record(
    adapter_dir: str, task: str, meta: dict[str, Any], check: dict[str, Any], merged: bool
) -> dict[str, Any]:
    """What ``peftkit_export.json`` says of a GGUF export (``merged``: one model file; else a LoRA
    file and its base's, ``check`` naming them)."""
    return {
        "format": "gguf",
        "architecture": "llama",
        "tensor_type": "F32",
        "task": task,
        "strategy": meta["strategy"],
        "merged": merged,
        "base_model": meta["base_model"],
        "base_fingerprint": meta.get("base_fingerprint"),
        "adapter": os.path.abspath(adapter_dir),
        "check": check,
        "versions": package_versions(("torch", "transformers", "peft", "gguf", "xllamacpp")),
    }
