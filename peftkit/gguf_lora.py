"""``peftkit export --format gguf --lora-only``: a LoRA adapter alone, as the LoRA GGUF file that
llama.cpp's ``convert_lora_to_gguf.py`` writes, beside its base model's GGUF, for
``llama-cli -m base.gguf --lora lora.gguf`` (or ``llama-server ... --lora``): the adapter stays a
few MiB, applies to any GGUF of the same base (a quantized one too) and can be switched at run
time.

``OUTPUT/lora.gguf`` is what the converter writes for a PEFT LoRA adapter on a Llama model:

- ``general.architecture`` llama, ``general.type`` adapter, ``adapter.type`` lora,
  ``adapter.lora.alpha`` (float32), ``general.name``, ``general.quantization_version``; no
  tokenizer or ``llama.*`` keys (they are the base's);
- for each adapted linear layer, two float32 tensors named after the base tensor in llama.cpp:
  ``blk.N.attn_q.weight.lora_a`` (A: rank x in; GGUF's reversed dimensions [in, rank]) and
  ``.lora_b`` (B: out x rank; [rank, out]); llama.cpp adds ``alpha / rank * B @ A @ x``;
- the query and key projections permuted as in the base file: the converter permutes the rows
  of ``W = B @ A`` by permuting B's rows (A unchanged).

Where PEFT's scale of a layer is not ``alpha / rank`` (rsLoRA's ``alpha / sqrt(rank)``, a
per-module rank or alpha) the difference is folded into that layer's B, so llama.cpp computes what
PEFT computes (the converter writes such adapters as if the scale were ``alpha / rank``).
``OUTPUT/base.gguf`` is the base model as ``peftkit.gguf_export`` writes a model (with the
tokenizer, float32).

Checked by llama.cpp itself loading both (``gguf_check``: the prompts' ids, greedy tokens and
their probabilities against transformers' base + adapter, unmerged; no warning); without the
``xllamacpp`` wheel nothing else can read a LoRA GGUF, so the export is refused. Refused in one
line: a strategy that is not LoRA, a LoRA variant (DoRA, ...), bias or fully trained modules,
LoRA on the embeddings or on an output layer tied to them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from .errors import PeftkitError
from .exporter import EXPORT_EXTRA, EXPORT_METADATA, ExportResult
from .gguf_check import check_prompts, greedy_reference, llamacpp_check
from .gguf_export import ARCHITECTURES, gguf_record, permute_rows, write_gguf
from .gguf_vocab import decide_pre_tokenizer
from .inference import adapter_task, load_adapter
from .llamacpp import available as llamacpp_available
from .rundir import check_output_dir, staged_dir

LORA_FILE = "lora.gguf"
BASE_FILE = "base.gguf"

Echo = Callable[[str], None]


def export_lora_gguf(
    adapter_dir: str,
    output: str,
    model: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    pre: str | None = None,
    echo: Echo = lambda _: None,
) -> ExportResult:
    """Write the LoRA adapter in ``adapter_dir`` as ``output/lora.gguf`` beside its base (or
    ``model``) as ``output/base.gguf``, with ``peftkit_export.json``, checked by llama.cpp as the
    module's docstring says (``pre``: ``--gguf-pre``). Nothing is written where it is refused."""
    if not llamacpp_available():
        raise PeftkitError(f"--lora-only is checked by llama.cpp itself; xllamacpp is not installed: {EXPORT_EXTRA}")
    check_output_dir(output, overwrite, flag="--output")
    task, loaded = _lora_adapter(adapter_dir, model, force, echo)
    meta, tokenizer, peft_model = loaded.metadata, loaded.tokenizer, loaded.model.float().eval()
    pre_tokenizer = decide_pre_tokenizer(tokenizer, pre)
    config = peft_model.get_base_model().config
    tensors, alpha, lora = lora_tensors(peft_model)
    prompts, clock = check_prompts(meta), time.perf_counter()
    seconds: dict[str, float] = {}
    reference = greedy_reference(peft_model, tokenizer, prompts)
    base = peft_model.unload()  # the base's own weights, the LoRA layers taken out (not merged)
    with staged_dir(output, overwrite, flag="--output") as stage:
        lora_path, base_path = os.path.join(stage, LORA_FILE), os.path.join(stage, BASE_FILE)
        echo(f"writing the lora adapter as a llama.cpp LoRA GGUF and its base {meta['base_model']!r} (float32) ...")
        write_lora_gguf(lora_path, tensors, alpha, f"{config.name_or_path or 'peftkit'} LoRA")
        write_gguf(base, tokenizer, base_path, pre_tokenizer["name"])
        seconds["write"] = time.perf_counter() - clock
        clock = time.perf_counter()
        echo(f"checking: llama.cpp reads the base with the LoRA applied; {len(prompts)} prompts ...")
        context = config.max_position_embeddings
        check = llamacpp_check(base_path, prompts, reference, tokenizer, context, lora_path, echo)
        seconds["check"] = time.perf_counter() - clock
        check.update(pre_tokenizer=pre_tokenizer, lora=lora, files={"lora": LORA_FILE, "base": BASE_FILE})
        with open(os.path.join(stage, EXPORT_METADATA), "w") as f:
            json.dump(gguf_record(adapter_dir, task.name, meta, check, merged=False), f, indent=2)
        size = os.path.getsize(lora_path)
    out = os.path.join
    return ExportResult(
        *(output, "gguf", meta["strategy"], meta["base_model"], False, None, 0, size, check, seconds),
        files=[LORA_FILE, BASE_FILE],
        usage=f"llama-cli -m {out(output, BASE_FILE)} --lora {out(output, LORA_FILE)}",
    )


def _lora_adapter(adapter_dir: str, model: str | None, force: bool, echo: Echo) -> tuple[Any, Any]:
    """The adapter's task and the loaded adapter, refused in one line where it is not a causal-LM
    LoRA adapter on a Llama-architecture base."""
    task = adapter_task(adapter_dir)
    if not task.generates:
        raise PeftkitError(
            f"--format gguf exports language models (causal-lm adapters); this adapter is a "
            f"{task.name} adapter: use --format onnx"
        )
    echo(f"loading adapter {adapter_dir!r} ...")
    loaded = load_adapter(adapter_dir, model, force=force)
    strategy = loaded.strategy
    if getattr(strategy, "peft_type", "") != "LORA":
        raise PeftkitError(
            f"--lora-only: this adapter's strategy is {strategy.name!r}, and only lora adapters have a "
            "llama.cpp LoRA format; export it merged with --format gguf (without --lora-only)"
        )
    kind = getattr(loaded.model.config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise PeftkitError(
            f"--format gguf writes llama.cpp's Llama architecture; the base {loaded.metadata['base_model']!r} "
            f"is a {kind!r} model (supported: {', '.join(ARCHITECTURES)})"
        )
    return task, loaded


def _refuse_unsupported(config: Any) -> None:
    """Refuse in one line what llama.cpp's LoRA format cannot hold: DoRA, trained biases, modules
    trained in full. (``config``: the adapter's peft ``LoraConfig``.)"""
    merged = "; export it merged with --format gguf (without --lora-only)"
    if getattr(config, "use_dora", False):
        raise PeftkitError(f"--lora-only: llama.cpp's LoRA format has no place for DoRA's magnitude vectors{merged}")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        raise PeftkitError(f"--lora-only: llama.cpp's LoRA format has no place for trained biases{merged}")
    if getattr(config, "modules_to_save", None):
        raise PeftkitError(
            f"--lora-only: the adapter trains {', '.join(config.modules_to_save)} in full, which llama.cpp's "
            f"LoRA format cannot hold{merged}"
        )


def lora_tensors(peft_model: Any) -> tuple[list[tuple[str, Any]], float, dict[str, Any]]:
    """The ``.lora_a`` / ``.lora_b`` tensors of ``peft_model``'s one adapter (float32 numpy, under
    llama.cpp's names, query and key permuted, any scale other than alpha / rank folded into B),
    its ``adapter.lora.alpha`` and a summary for the export record; refused in one line where
    llama.cpp's format cannot hold the adapter (``_refuse_unsupported``, embeddings, tied output)."""
    import gguf
    from peft.tuners.lora import LoraLayer

    (adapter,) = list(peft_model.peft_config)
    _refuse_unsupported(peft_model.peft_config[adapter])
    alpha = float(peft_model.peft_config[adapter].lora_alpha)
    model = peft_model.get_base_model()
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors, ranks, folded = [], set(), 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            if isinstance(module, LoraLayer) and adapter in module.lora_embedding_A:
                raise PeftkitError(f"--lora-only: LoRA on the embeddings ({name}) is not written; export it merged")
            continue
        if module.lora_variant.get(adapter) is not None:
            raise PeftkitError(f"--lora-only: {name} is a LoRA variant llama.cpp cannot hold; export it merged")
        if name == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise PeftkitError("--lora-only: LoRA on an output layer tied to the embeddings; export it merged")
        target = names.get_name(name + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise PeftkitError(f"--lora-only: llama.cpp has no place for LoRA on {name!r}")
        a, b, factor = _lora_pair(module, adapter, alpha)
        folded += factor != 1.0
        if name.endswith("q_proj"):
            b = permute_rows(b, config.num_attention_heads)
        elif name.endswith("k_proj"):
            b = permute_rows(b, config.num_key_value_heads or config.num_attention_heads)
        tensors += [(target + ".lora_a", a), (target + ".lora_b", b)]
        ranks.add(a.shape[0])
    if not tensors:
        raise PeftkitError("--lora-only: the adapter has no LoRA layers to write")
    summary = {"alpha": alpha, "ranks": sorted(ranks), "layers": len(tensors) // 2, "scale_folded_into_lora_b": folded}
    return tensors, alpha, summary


def _lora_pair(module: Any, adapter: str, alpha: float) -> tuple[Any, Any, float]:
    """A peft LoRA layer's A (rank x in) and B (out x rank) as float32 numpy, B multiplied by the
    factor (returned) that makes llama.cpp's ``alpha / rank`` PEFT's own scale of the layer."""
    import numpy as np

    a = module.lora_A[adapter].weight.detach().float().cpu().numpy()
    b = module.lora_B[adapter].weight.detach().float().cpu().numpy()
    factor = float(module.scaling[adapter]) * a.shape[0] / alpha
    if abs(factor - 1.0) > 1e-6:
        b = b * np.float32(factor)
    else:
        factor = 1.0
    return a, b, factor


def write_lora_gguf(path: str, tensors: list[tuple[str, Any]], alpha: float, name: str) -> None:
    """Write the LoRA ``tensors`` (``lora_tensors``') with ``alpha`` to ``path`` as llama.cpp's
    ``convert_lora_to_gguf.py`` writes an adapter of a Llama model (float32)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
