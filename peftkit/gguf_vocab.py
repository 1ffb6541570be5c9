"""A byte-level BPE tokenizer as llama.cpp's converter writes it into a GGUF file.

``convert_hf_to_gguf.py`` writes a Llama model's GPT-2 style tokenizer (``LlamaModel.set_vocab``,
``TextModel._set_vocab_gpt2``) as:

- ``tokenizer.ggml.model`` ``gpt2`` and ``tokenizer.ggml.pre``: the pre-tokenizer's name, decided
  by hashing the ids the tokenizer gives ``CHECK_TEXT`` (``peftkit.gguf_pretokenizers``); without
  it llama.cpp warns "missing pre-tokenizer type" and splits prompts by its default rules, which
  turn " $" and " (" into other tokens than transformers does;
- the token list, each token's type (special or special-looking added tokens control, other added
  tokens user-defined, missing ids ``[PADn]`` unused);
- what ``gguf.SpecialVocab`` (llama.cpp's own gguf-py, which the converter calls) reads from the
  tokenizer's files: the merges, the special token ids (bos, eos, unk, sep, pad, ...), whether
  bos/eos are added, the chat template;
- ``tokenizer.ggml.add_space_prefix`` where the tokenizer says whether it adds one.

Here the same keys come from the tokenizer in memory: it is saved with the model's config into a
temporary directory, read back by ``gguf.SpecialVocab`` exactly as the converter reads a model
directory. Where the files do not say whether bos is added, what the tokenizer does is written, so
llama.cpp tokenizes as transformers does (the converter writes it only for some vocabularies).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from .errors import PeftkitError
from .gguf_pretokenizers import CHECK_TEXT, PRE_TOKENIZERS

PRE_FLAG = "--gguf-pre"
# the names a user would most likely force, for the refusal's example
_EXAMPLES = ("gpt-2", "llama-bpe", "smollm", "qwen2")
# llama.cpp's token types (gguf.TokenType): normal, unused, control, user-defined
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4


def known_pre_tokenizers() -> list[str]:
    """Every ``tokenizer.ggml.pre`` name llama.cpp's converter writes (and "default")."""
    return sorted({*PRE_TOKENIZERS.values(), "default"})


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """The converter's ``chkhsh``: sha256 of ``str(tokenizer.encode(CHECK_TEXT))`` (special tokens
    added as the tokenizer adds them, as the converter calls it)."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def decide_pre_tokenizer(tokenizer: Any, forced: str | None = None) -> dict[str, Any]:
    """``tokenizer.ggml.pre`` for ``tokenizer`` as llama.cpp's converter decides it: ``name``,
    ``hash``, ``recognised`` (the hash is in the converter's table) and ``forced``. ``forced``
    (``--gguf-pre``) is taken instead when it is a name llama.cpp knows; a tokenizer whose hash is
    not in the table is refused in one line without it."""
    digest = pre_tokenizer_hash(tokenizer)
    found = PRE_TOKENIZERS.get(digest)
    if forced is not None:
        if forced not in known_pre_tokenizers():
            raise PeftkitError(
                f"{PRE_FLAG} {forced!r} is not a pre-tokenizer llama.cpp knows; give one of its "
                f"{len(known_pre_tokenizers())} names, e.g. {', '.join(_EXAMPLES)}"
            )
        return {"name": forced, "hash": digest, "recognised": found is not None, "forced": True, "detected": found}
    if found is None:
        raise PeftkitError(
            f"llama.cpp would not recognise this tokenizer's pre-tokenizer (its converter's check "
            f"hash {digest[:16]}... is not in its table), so it would split prompts otherwise; "
            f"if you know which it is, name it with {PRE_FLAG} NAME (e.g. {', '.join(_EXAMPLES)})"
        )
    return {"name": found, "hash": digest, "recognised": True, "forced": False, "detected": found}


def _looks_special(token: str) -> bool:
    """The converter's ``does_token_look_special`` for byte-level BPE vocabularies: ``<|...|>``
    and a few known names, which it marks control even where the tokenizer does not say special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """The token strings (byte-level BPE's own spelling, ``Ġthe``) and llama.cpp token types for
    ids 0 to ``vocab_size`` - 1, as the converter's ``get_vocab_base`` lists them: ids the
    tokenizer lacks (embeddings padded past its vocabulary) as unused ``[PADn]``."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(CONTROL if added[i].special or _looks_special(reverse[i]) else USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(NORMAL)
    return tokens, types


def check_bpe(tokenizer: Any, vocab_size: int) -> None:
    """Refuse in one line a tokenizer llama.cpp's ``gpt2`` model cannot hold: one that is not
    byte-level BPE with merges, or one with more tokens than the model has embeddings."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise PeftkitError(
            f"GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 model); this one is {model.get('type')!r}"
        )
    if len(tokenizer) > vocab_size:
        raise PeftkitError(
            f"the tokenizer has {len(tokenizer):,} tokens and the model {vocab_size:,} embeddings; "
            "llama.cpp needs an embedding for every token"
        )


def _space_prefix(tokenizer: Any) -> bool | None:
    """Whether the tokenizer's byte-level pre-tokenizer adds a space before the text (what
    ``add_prefix_space`` in tokenizer_config.json says, which the converter writes as
    ``add_space_prefix``); None where it has no byte-level step."""
    node = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    for step in node.get("pretokenizers", [node]):
        if step.get("type") == "ByteLevel":
            return bool(step.get("add_prefix_space", False))
    return None


def _adds(tokenizer: Any) -> dict[str, bool]:
    """Whether the tokenizer puts its bos token first and its eos token last (on a plain word)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[:1] == [bos], "eos": eos is not None and ids[-1:] == [eos]}


def add_tokenizer(writer: Any, tokenizer: Any, config: Any, pre: str) -> None:
    """Write ``tokenizer`` (for a model with ``config``) as llama.cpp's converter writes a Llama
    model's byte-level BPE tokenizer, with ``pre`` as ``tokenizer.ggml.pre`` (see the module's
    docstring)."""
    import gguf

    check_bpe(tokenizer, config.vocab_size)
    space_prefix = _space_prefix(tokenizer)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    tokens, types = token_list(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="peftkit-gguf-vocab-") as directory:
        tokenizer.save_pretrained(directory)
        config.to_json_file(os.path.join(directory, "config.json"))
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config.vocab_size)
    adds = _adds(tokenizer)
    special.add_special_token.setdefault("bos", adds["bos"])
    if adds["eos"]:  # llama.cpp adds no eos unless told: the key is written only to say it does
        special.add_special_token.setdefault("eos", True)
    special.add_to_gguf(writer, quiet=True)
