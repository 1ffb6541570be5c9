"""peft's other methods as strategies: ``--strategy peft:NAME`` (``peft:ia3``, ``peft:loha``, ...).

One generic class (``PeftMethod``) makes a strategy of each peft type that can train from scratch
on one task (``method_names``; those that cannot are in ``EXCLUDED``, with the reason). The
registry resolves a ``peft:`` name when it is first asked for (``registry.register_strategy_family``),
so ``import peftkit`` and ``peftkit list`` never import peft.

- **Options** are the peft config's own dataclass fields (``--set KEY=VALUE``, YAML
  ``strategy_options``), with peft's defaults, minus those peftkit sets (the task type, the head,
  the sizes peft reads from the model); an unknown key is refused with "did you mean" and the
  accepted keys, a bad value with peft's own message, before any model loads.
- **Targets**: peft's default table for the architecture where it has one; otherwise found by
  structure, as ``lora`` does (the linear layers in attention blocks; IA3's feed-forward output
  projections; LN tuning's norms).
- **The head** trains alongside (peft's ``modules_to_save``, as ``lora``), and the adapter is saved
  in peft's own format: ``PeftModel.from_pretrained(base, dir)`` loads it without peftkit.
- **A method that does not apply** to a model or task is refused in one line naming the method,
  the model type, the task and what peft said (``MethodRefused``), before anything is written.
- **Merge** is peft's ``merge_and_unload`` where the method can merge (``merges``); the prompt
  methods and the few peft cannot merge are refused with the reason (``_NOT_MERGED``). **Tune**
  searches the training settings and the method's own size option (``search_space``).

``survey`` builds every method on tiny models of each architecture once (cached per peft and
transformers version) for ``peftkit list --peft``. The default learning rates of the methods in
``SWEPT`` come from a measured sweep on the embedded default; the others' are provisional.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import inspect
import math
import typing
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

from ...adapter_io import read_peft_config
from ...env import to_log
from ...errors import PeftkitError, did_you_mean, first_line
from ...registry import register_strategy_family
from ...structure import sublayer_outputs, transformer_blocks
from ..base import TaskSpec, TrainingDefaults
from ..lora import attention_linear_names
from ..peft_common import ADAPTER_NAME, PeftStrategy

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

PREFIX = "peft:"

# peft types that get no ``peft:`` strategy, and why (``resolve`` says it to whoever asks for one)
EXCLUDED: dict[str, str] = {
    "lora": "peftkit's own strategy 'lora' is peft's LoRA (with use_rslora and use_dora); use --strategy lora",
    "prefix_tuning": "peftkit's own strategy 'prefix' is peft's prefix tuning, saved in its format; "
    "use --strategy prefix",
    "xlora": "it mixes LoRA adapters trained before (another run's adapters); it trains nothing from scratch",
    "poly": "a multi-task method: every batch needs a task id (task_ids), which one task's data has not",
    "multitask_prompt_tuning": "a multi-task method: every batch needs a task id (task_ids), and it starts "
    "from prompts trained on source tasks",
    "cpt": "its prompt is built from the training examples' own tokens (cpt_token_ids, cpt_mask, "
    "cpt_tokens_type_mask), not learned from scratch",
    "trainable_tokens": "it trains the embeddings of token ids it is given (tokens added to the vocabulary), "
    "which a task does not name",
}

# Training defaults per method; a method not named trains as lora does (2e-3, 1 epoch).
# The learning rates of the methods in SWEPT were chosen by a measured sweep on the embedded default
# (benchmarks/peft_sweep.py: rates a factor 4 apart around the earlier default, 1,500 training
# examples, chosen on validation accuracy; table in benchmarks/results/peft_sweep_cpu.md). Where the
# best rate was the largest tried ("edge"), the optimum may lie higher. The epochs were not swept:
# every best epoch of the sweep came within 188 optimizer steps (cartridge's 282), under one epoch of the whole
# training set (319), so the sweep gives no reason to change them. Every method that applies to the
# embedded default is swept; the two that do not (LLaMA-Adapter: no head for classification;
# ShadowPEFT: decoder blocks only) are PROVISIONAL, from their papers and peft's examples.
LORA_LIKE = TrainingDefaults(lr=2e-3, epochs=1, batch_size=32)
DEFAULTS: dict[str, TrainingDefaults] = {
    # IA3 learns one scale per activation (started at 1). Swept: 5e-3 0.785, 2e-2 0.780, 1.25e-3 nothing
    "ia3": TrainingDefaults(lr=5e-3, epochs=2, batch_size=32),
    # swept: 2e-3 0.783, 8e-3 0.770, 5e-4 nothing (as LoRA's)
    "loha": TrainingDefaults(lr=2e-3, epochs=1, batch_size=32),
    # swept: 8e-3 0.765, 3.2e-2 0.738, 2e-3 0.652 (was 2e-3)
    "lokr": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    # AdaLoRA prunes ranks as it goes and starts slowly. Swept: 3.2e-2 0.772 (edge), 8e-3 0.723, 2e-3 nothing
    "adalora": TrainingDefaults(lr=3.2e-2, epochs=1, batch_size=32),
    # VeRA trains two scaling vectors per layer on frozen random projections. Swept: 2e-2 0.752 (edge),
    # 5e-3 0.670 (was 5e-3)
    "vera": TrainingDefaults(lr=2e-2, epochs=2, batch_size=32),
    # FourierFT learns a few spectral coefficients (scaled by 150). Swept: 0.12 0.772 (edge), 3e-2 0.760
    "fourierft": TrainingDefaults(lr=0.12, epochs=2, batch_size=32),
    # LN tuning trains the norms' scales and shifts. Swept: 8e-3 0.790 (edge), 2e-3 0.767
    "ln_tuning": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    # soft prompts move slowly: prompt tuning's paper trained at 0.3. Swept: 0.12 0.663 (edge), 3e-2 0.608
    # and 7.5e-3 nothing (was 3e-2): the slowest learner of the twelve on this small encoder
    "prompt_tuning": TrainingDefaults(lr=0.12, epochs=3, batch_size=32, weight_decay=0.0),
    # P-tuning trains a prompt encoder (an MLP). Swept: 1.2e-2 0.715, 4.8e-2 0.710, 3e-3 and 7.5e-4
    # nothing (was 3e-3, from peft's P-tuning example's 1e-3)
    "p_tuning": TrainingDefaults(lr=0.012, epochs=3, batch_size=32, weight_decay=0.0),
    # a trained key/value cache. Swept, prefix's 1e-2 kept: 0.752 (4e-2 0.743, 2.5e-3 nothing); it needs
    # 300 steps (7 epochs of the sweep's 1,500 examples) where the others learn in 150
    "cartridge": TrainingDefaults(lr=1e-2, epochs=1, batch_size=32, weight_decay=0.0, min_steps=300, max_epochs=40),
    # PROVISIONAL (it does not apply to the embedded default): LLaMA-Adapter's paper, 9e-3 with
    # zero-initialised gates
    "adaption_prompt": TrainingDefaults(lr=9e-3, epochs=2, batch_size=32, weight_decay=0.0),
    # orthogonal transforms of whole weights. Swept: 1e-3 0.793, 4e-3 0.780, 2.5e-4 nothing
    "oft": TrainingDefaults(lr=1e-3, epochs=1, batch_size=32),
    # butterfly-factored OFT. Swept: 4e-3 0.793 (edge), 1e-3 and 2.5e-4 nothing (was 1e-3)
    "boft": TrainingDefaults(lr=4e-3, epochs=1, batch_size=32),
    # OSF trains the low singular subspace of the whole weights. Swept: 8e-4 0.780, 3.2e-3 0.750, 2e-4
    # 0.743, 5e-5 nothing (was 2e-4)
    "osf": TrainingDefaults(lr=8e-4, epochs=1, batch_size=32),
    # swept, LoRA-like defaults kept: MiSS 2e-3 0.800 (8e-3 nothing), SHiRA 2e-3 0.800, GraLoRA 2e-3
    # 0.795 (8e-3 nothing)
    "miss": LORA_LIKE,
    "shira": LORA_LIKE,
    "gralora": LORA_LIKE,
    # HiRA's Hadamard product with the frozen weight makes small updates. Swept: 8e-3 0.783 (edge),
    # 2e-3 0.738, 5e-4 nothing (was 2e-3)
    "hira": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    # RandLoRA's full-rank update from shared random bases. Swept: 5e-4 0.777 (edge), 2e-3 0.760, 8e-3
    # nothing (was 2e-3)
    "randlora": TrainingDefaults(lr=5e-4, epochs=1, batch_size=32),
    # DeLoRA bounds the update's norm. Swept: 5e-4 0.775 (edge), 2e-3 0.767, 8e-3 0.765 (was 2e-3)
    "delora": TrainingDefaults(lr=5e-4, epochs=1, batch_size=32),
    # DEFT: swept, 2e-3 0.767 (5e-4 0.762, 8e-3 0.767)
    "deft": LORA_LIKE,
    # few parameters each, slow at LoRA's rate; swept, each best at the grid's top (edge), 2e-3 and 5e-4
    # learned nothing unless said: RoAd 0.795, FRoD 0.803 (2e-3 0.780), BEFT 0.750, TinyLoRA 0.670,
    # PVeRA 0.645 (all were 2e-3)
    "road": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    "frod": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    "beft": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    "tinylora": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    "pvera": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    # UniLoRA trains 1,026 parameters. Swept: 0.128 0.730 (edge), 3.2e-2 0.723; 8e-3 and below learned
    # nothing (was 8e-3)
    "unilora": TrainingDefaults(lr=0.128, epochs=1, batch_size=32),
    # WaveFT's wavelet coefficients. Swept: 5e-4 0.803, 2e-3 0.767, 8e-3 0.678, 1.25e-4 nothing (was 2e-3)
    "waveft": TrainingDefaults(lr=5e-4, epochs=1, batch_size=32),
    # swept, LoRA's 2e-3 kept: Lily 0.790 (5e-4 0.785, 8e-3 0.755), GLoRA 0.798 (5e-4 0.770, 8e-3
    # 0.728), PEANuT 0.783 (5e-4 tied, 8e-3 nothing)
    "lily": LORA_LIKE,
    "glora": LORA_LIKE,
    "peanut": LORA_LIKE,
    # swept, each best at 8e-3 (was 2e-3): PSOFT 0.752 (3.2e-2 0.723, 2e-3 0.725), SuperTuning 0.788
    # (3.2e-2 0.777, 2e-3 nothing), AdaMSS 0.790 (3.2e-2 0.755, 2e-3 0.760)
    "psoft": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    "supertuning": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    "adamss": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    # C3A divides its circular convolution's output by the input width (384 on MiniLM), so Adam's steps
    # move its output that much less: it learns only at rates far above the others'. Swept from 5e-4 up:
    # 2.048 0.780, 8.2 0.772, 0.512 0.760, 0.128 0.733, 8e-3 0.623, 2e-3 nothing (was 2e-3)
    "c3a": TrainingDefaults(lr=2.048, epochs=1, batch_size=32),
    # HRA's Householder reflections. Swept: 8e-3 0.788, 3.2e-2 0.785, 2e-3 0.757, 5e-4 nothing (was 2e-3)
    "hra": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
    # VBLoRA's shared vector bank. Swept: 8e-3 0.790, 2e-3 0.777, 3.2e-2 0.680, 5e-4 nothing (was 2e-3)
    "vblora": TrainingDefaults(lr=8e-3, epochs=1, batch_size=32),
}
# the methods whose learning rate the sweep chose (``peftkit list -v --peft`` says which)
SWEPT = frozenset(
    {
        *("ia3", "loha", "lokr", "adalora", "oft", "boft", "vera", "fourierft", "ln_tuning", "prompt_tuning"),
        *("p_tuning", "miss", "shira", "hira", "randlora", "gralora", "delora"),
        *("deft", "road", "frod", "beft", "tinylora", "pvera"),
        *("unilora", "waveft", "lily", "glora", "peanut", "psoft", "supertuning", "adamss", "osf"),
        *("cartridge", "vblora", "c3a", "hra"),
    }
)


def defaults_origin(method: str) -> str:
    """Where ``method``'s default learning rate comes from, in a few words."""
    return "swept: benchmarks/results/peft_sweep_cpu.md" if method in SWEPT else "provisional"


# ``peftkit tune``: the option that sizes each method, where it is not ``r`` (a method with neither
# searches the training settings alone: IA3, LN tuning, BEFT, OSF...); searched at half, once and
# twice its default (capacity moves by factors; powers of two keep dividing the layers' widths)
_SIZE_OPTION = {
    "oft": "oft_block_size",  # OFT's r is 0 (sized by its blocks)
    "boft": "boft_block_size",
    "fourierft": "n_frequency",
    "waveft": "n_frequency",
    "road": "group_size",
    "c3a": "block_size",
    "adalora": "target_r",  # AdaLoRA's r is unused: it prunes from init_r down to target_r
    "prompt_tuning": "num_virtual_tokens",
    "p_tuning": "num_virtual_tokens",
    "cartridge": "num_virtual_tokens",
    "adaption_prompt": "adapter_len",
}
# where twice the default is not valid: AdaLoRA's target_r stays under its init_r (12); C3A's block
# (256) must divide the widths, which 512 does not in a 768-wide model
_SIZE_CHOICES = {"adalora": (4, 8, 12), "c3a": (64, 128, 256)}

# Fields of peft's configs that peftkit sets itself (or peft reads from the model), never options
_MANAGED = frozenset(
    {
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "modules_to_save",
        "fan_in_fan_out",  # set where a target is a GPT-2 style Conv1D (weights stored transposed)
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
    }
)
# Required fields peft leaves unset (None) that peftkit gives a default: 20 virtual tokens (prompt
# tuning's paper found 20 close to 100 at base size), LLaMA-Adapter's 10 adaption tokens
_FILLED = {"num_virtual_tokens": 20, "adapter_len": 10}

# Methods whose targets are not the attention linears when peft has no table for the model:
# layer norms (LN tuning); peft's own choice (whole decoder blocks, attention modules)
_NORM_TARGETS = frozenset({"ln_tuning"})
_PEFT_CHOOSES_TARGETS = frozenset({"shadow", "adaption_prompt"})
# Methods that hand the model a trained key/value prefix (``past_key_values``)
_KV_PREFIX_METHODS = frozenset({"cartridge"})

# Why a method's adapter cannot be folded into the base's weights (``peftkit merge``; the prompt
# methods' reason is ``_PROMPT_NOT_MERGED``). Every other method merges through peft's
# ``merge_and_unload``, checked on tiny BERT and Llama: the merged model's logits equal the
# adapter's (within 2e-7)
_NOT_MERGED = {
    "adaption_prompt": "LLaMA-Adapter adds gated attention over learned adaption prompts, an input to "
    "attention, not a change to the weights: there is nothing to merge into them",
    "lily": "peft does not merge Lily (its low-rank adapters are shared across layers by a router): "
    "'This method is not supported for Lily'",
    "shadow": "ShadowPEFT's adaptation depends on the input (a trajectory through the layers), not a "
    "static change to the weights: there is nothing to merge into them",
}
_PROMPT_NOT_MERGED = (
    "a prompt method: what it trained (virtual tokens, a key/value prefix) is an input to the model, "
    "not a change to its weights: there is nothing to merge into them"
)


class MethodRefused(PeftkitError):
    """A ``peft:`` method that does not apply to a model or task; ``said`` is peft's one line."""

    def __init__(self, message: str, said: str) -> None:
        super().__init__(message)
        self.said = said


def _peft_catalogue() -> dict[str, Any]:
    """peft's config class of every peft type, by lower-case name (``ia3`` -> ``IA3Config``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(t, "value", t)).lower(): cls for t, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def method_names() -> list[str]:
    """The peft methods that get a ``peft:`` strategy, sorted (peft's types less ``EXCLUDED``)."""
    return sorted(n for n in _peft_catalogue() if n not in EXCLUDED)


# -- options ----------------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    """Whether ``value`` is data a YAML file or ``--set`` can give (and config.yaml can keep)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, enum.Enum)
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _option_fields(config_cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type hint, default) of each option: the config's fields less the managed ones and
    those whose default is not plain data (nested configs: peft's defaults stand for them). An
    enum default becomes its value (peft takes either); a required field peft leaves None gets
    peftkit's default (``_FILLED``)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - a hint peft cannot resolve is typed Any: values pass to peft as given
        hints = {}
    fields = []
    for f in dataclasses.fields(config_cls):
        if f.name in _MANAGED or not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if isinstance(default, enum.Enum):
            default = default.value
        if default is None and f.name in _FILLED:
            default = _FILLED[f.name]
        hint = hints.get(f.name, Any)
        if default is None and hint is not Any and type(None) not in typing.get_args(hint):
            hint = hint | None  # peft annotates some None defaults as plain `str` or `int`
        if _plain(default):
            fields.append((f.name, hint, default))
    return fields


def _options_class(method: str, config_cls: type) -> type:
    """A dataclass of ``method``'s options, whose ``__post_init__`` lets peft's config check the
    values at once (a bad value is refused before any model loads)."""

    def post_init(self: Any) -> None:
        try:
            config_cls(**_config_kwargs(dataclasses.asdict(self)))
        except (ValueError, TypeError) as exc:
            raise PeftkitError(f"strategy '{PREFIX}{method}': {first_line(exc)}") from None

    spec = [
        (name, hint, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default)))
        if isinstance(default, (list, dict))
        else (name, hint, dataclasses.field(default=default))
        for name, hint, default in _option_fields(config_cls)
    ]
    title = "".join(part.capitalize() for part in method.split("_"))
    options = dataclasses.make_dataclass(f"Peft{title}Options", spec, namespace={"__post_init__": post_init})
    options.__module__ = __name__
    return options


def _config_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The options as peft's config takes them: ``all-linear`` (a list of one from ``--set``, whose
    lists split on commas) is the string peft expects; AdaLoRA's unset ``total_step`` (the run's
    steps, set by ``after_optimizer_step``) is a placeholder that passes peft's check."""
    kwargs = dict(options)
    if kwargs.get("target_modules") == ["all-linear"]:
        kwargs["target_modules"] = "all-linear"
    if "total_step" in kwargs and kwargs["total_step"] is None:
        kwargs["total_step"] = kwargs.get("tinit", 0) + kwargs.get("tfinal", 0) + 1
    return kwargs


# -- targets -----------------------------------------------------------------------------------


def _norm_names(model: nn.Module) -> list[str]:
    """Names of the layer norms inside the transformer blocks (LN tuning, where peft has no table)."""
    found = transformer_blocks(model)
    names = {
        name.rsplit(".", 1)[-1]
        for block in (found[1] if found else [])
        for name, module in block.named_modules()
        if name and "norm" in type(module).__name__.lower()
    }
    return sorted(names)


def _feedforward_outputs(model: nn.Module) -> list[str]:
    """Names (within a block) of the projections that end the blocks' feed-forward sub-layers."""
    found = transformer_blocks(model)
    hidden = getattr(model.config, "hidden_size", None)
    if found is None or hidden is None:
        return []
    return sorted({name for block in found[1] for name in [sublayer_outputs(block, hidden)[1]] if name})


def _default_targets(method: str, tuner: Any, model: nn.Module) -> list[str] | None:
    """Targets where the user named none: peft's table for the architecture, else by structure
    (None: peft's own choice)."""
    if method in _PEFT_CHOOSES_TARGETS:
        return None
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_TABLE

    table = IA3_TABLE if method == "ia3" else getattr(tuner, "target_module_mapping", None) or {}
    listed = table.get(getattr(model.config, "model_type", ""))
    if listed:
        return [listed] if isinstance(listed, str) else list(listed)
    if method in _NORM_TARGETS:
        return _norm_names(model)
    if method == "ia3":  # IA3 scales the feed-forward output projections' inputs too
        return sorted({*attention_linear_names(model), *_feedforward_outputs(model)})
    return attention_linear_names(model)


def _ia3_feedforward(model: nn.Module, targets: Any) -> list[str]:
    """IA3's feed-forward modules: peft's table for the architecture, else the blocks' feed-forward
    output projections among the targets."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as TABLE

    listed = TABLE.get(getattr(model.config, "model_type", ""))
    if listed:
        return list(listed)
    wanted = set(targets) if isinstance(targets, (list, set, tuple)) else set()
    return [name for name in _feedforward_outputs(model) if name in wanted]


def _is_conv1d_target(model: nn.Module, targets: Any) -> bool:
    """Whether a target is a GPT-2 style Conv1D, whose weight is stored transposed (fan_in_fan_out)."""
    if not isinstance(targets, (list, set, tuple)):
        return any(type(m).__name__ == "Conv1D" for m in model.modules())
    return any(
        type(m).__name__ == "Conv1D" and any(name == t or name.endswith("." + t) for t in targets)
        for name, m in model.named_modules()
    )


# -- the strategy --------------------------------------------------------------------------------


class PeftMethod(PeftStrategy):
    """One of peft's methods through ``get_peft_model``; ``resolve`` makes a subclass per method."""

    method: ClassVar[str] = ""  # peft's name, lower case (``ia3``)
    config_class: ClassVar[Any] = None  # peft's config class (``IA3Config``)
    tuner_class: ClassVar[Any] = None  # peft's tuner (``IA3Model``), for its target table

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> Any:
        """This method's options from a peft ``adapter_config.json``: the fields it has."""
        names = {f.name for f in dataclasses.fields(cls.Options)}
        values = {k: v for k, v in config.items() if k in names}
        if isinstance(values.get("target_modules"), (list, set)):
            values["target_modules"] = sorted(values["target_modules"])
        return cls.Options(**values)

    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The training settings (the learning rate a decade either side of this method's default,
        ``Strategy.training_space``) and the method's own size option, where it has one
        (``_SIZE_OPTION``, else ``r``): half, once and twice its default."""
        space = cls.training_space(trial, defaults)
        sized = _size_choices(cls.method, cls.Options)
        if sized is not None:
            name, choices = sized
            space[name] = trial.suggest_categorical(name, list(choices))
        return space

    def peft_config(self, model: nn.Module, task: TaskSpec) -> Any:
        """peft's config for ``model``: the options, the task, the head, the targets (where the
        options name none) and the sizes peft cannot read from every model's config."""
        fields = {f.name for f in dataclasses.fields(self.config_class)}
        kwargs = _config_kwargs(dataclasses.asdict(self.options))
        if "target_modules" in fields and kwargs.get("target_modules") is None:
            kwargs["target_modules"] = _default_targets(self.method, self.tuner_class, model)
        if "feedforward_modules" in fields and kwargs.get("feedforward_modules") is None:
            kwargs["feedforward_modules"] = _ia3_feedforward(model, kwargs.get("target_modules"))
        if "fan_in_fan_out" in fields and kwargs.get("target_modules") is not None:
            kwargs["fan_in_fan_out"] = _is_conv1d_target(model, kwargs["target_modules"])
        kwargs.update(_model_sizes(model, fields, kwargs))
        kwargs.update(_fit_to_widths(self.method, model, kwargs))
        heads = task.heads(model)
        if "modules_to_save" in fields:
            kwargs["modules_to_save"] = heads or None
        elif heads:  # LLaMA-Adapter's config: the new head would neither train nor be saved
            raise self.refusal(model, task, f"{self.config_class.__name__} has no modules_to_save for the new head")
        return self.config_class(**kwargs, task_type=task.peft_task_type)

    def merge(self, model: nn.Module) -> nn.Module:
        """The adapter folded into the base's weights by peft (``merge_and_unload``), the trained
        head in place: a plain transformers model, as lora's. Refused in one line where the method
        cannot merge, or peft refuses this model (BEFT's bias adapter on a base without biases)."""
        why = not_merged(self.method, self.config_class)
        if why is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # peft's notes on merging (rounding) are not the user's
                    return model.merge_and_unload()
            except Exception as exc:  # noqa: BLE001 - peft refuses with ValueError, NotImplementedError...
                why = f"peft could not merge it: {first_line(exc)}"
        raise PeftkitError(
            f"strategy {self.name!r} cannot be merged into a plain model: {why}; "
            "ship its adapter with the base model instead"
        )

    def not_merged_reason(self) -> str:
        return not_merged(self.method, self.config_class) or "peft does not merge it"

    def refusal(self, model: nn.Module, task: TaskSpec, said: str) -> MethodRefused:
        """The one-line refusal of this method on ``model`` for ``task``, with peft's words."""
        model_type = getattr(model.config, "model_type", type(model).__name__)
        return MethodRefused(
            f"strategy {self.name!r} does not apply to model type {model_type!r} ({task.kind}): {said}", said
        )

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        from peft import get_peft_model

        heads = set(task.heads(model))
        if self.method in _KV_PREFIX_METHODS and not _takes_past_key_values(model):
            # peft would only say so at the first forward pass
            raise self.refusal(
                model, task, "Model does not support past key values which are required for prefix tuning."
            )
        # SHiRA's forward builds a sparse tensor each step, and torch warns (once, from C++) that
        # it does not check its invariants: peft's choice, not the user's, so not shown to them
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        try:
            config = self.peft_config(model, task)
            with warnings.catch_warnings():
                # peft 0.21's PeftModel reads transformers 5's deprecated `is_gradient_checkpointing`,
                # and methods warn of what the user cannot change here; neither is for our users
                warnings.simplefilter("ignore")
                peft_model = get_peft_model(model, config)
        except PeftkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - peft refuses with ValueError, TypeError, AttributeError...
            raise self.refusal(model, task, first_line(exc)) from None
        trains = [n for n, p in peft_model.named_parameters() if p.requires_grad and not _in_head(n, heads)]
        if not trains:
            raise self.refusal(
                peft_model, task, "peft found nothing to adapt (no trainable parameter besides the head)"
            )
        return peft_model

    def load_adapter(self, model: nn.Module, directory: str, metadata: dict[str, Any]) -> None:
        """An adapter loads for inference: a prompt method's saved embeddings are its encoder's output
        (P-tuning's MLP was run at the save), which peft's inference mode uses as they are."""
        from peft import PromptLearningConfig

        config = model.peft_config[ADAPTER_NAME]
        if isinstance(config, PromptLearningConfig):
            config.inference_mode = True
        super().load_adapter(model, directory, metadata)


def _size_choices(method: str, options: type) -> tuple[str, tuple[int, ...]] | None:
    """The option that sizes ``method`` and the values a tune tries (its default among them); None
    where the method has none, or its default is not a positive integer (peft derives it)."""
    name = _SIZE_OPTION.get(method, "r")
    default = {f.name: f.default for f in dataclasses.fields(options)}.get(name)
    if not isinstance(default, int) or isinstance(default, bool) or default < 1:
        return None
    choices = _SIZE_CHOICES.get(method) or tuple(sorted({max(1, default // 2), default, default * 2}))
    return name, choices


def _takes_past_key_values(model: nn.Module) -> bool:
    """Whether the model's forward, or its backbone's (which peft calls for a classifier), takes
    ``past_key_values``: a key/value prefix needs it."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone) if m is not None)


def _in_head(name: str, heads: set[str]) -> bool:
    """Whether parameter ``name`` (of a peft model) belongs to one of the head modules."""
    return any(f".{head}." in f".{name}" for head in heads)


def _model_sizes(model: nn.Module, fields: set[str], kwargs: dict[str, Any]) -> dict[str, Any]:
    """What prompt-learning configs need of the model where peft finds no key for it (DistilBERT
    names its width ``dim``), read through transformers' own names (``hidden_size``); P-tuning's
    and LLaMA-Adapter's sizes left unset: the model's width, every block."""
    config = model.config
    found: dict[str, Any] = {}
    for field, attribute in (("token_dim", "hidden_size"), ("num_attention_heads", "num_attention_heads")):
        if field in fields and kwargs.get(field) is None and getattr(config, attribute, None) is not None:
            found[field] = getattr(config, attribute)
    if "encoder_hidden_size" in fields and kwargs.get("encoder_hidden_size") is None:
        found["encoder_hidden_size"] = getattr(config, "hidden_size", None)
    if "adapter_layers" in fields and kwargs.get("adapter_layers") is None:
        blocks = transformer_blocks(model)
        found["adapter_layers"] = len(blocks[1]) if blocks else None
    return {k: v for k, v in found.items() if v is not None}


# Options that must divide each target's input and output width (peft refuses the model otherwise)
# and whose peft default, 256, does not divide every common width (MiniLM's 384). Where the value
# asked does not divide them, the method gets the largest divisor of the targets' widths' greatest
# common divisor not above it (peft's own advice for C3A: "set it to the greatest common divisor of
# all input & output sizes"): 192 on MiniLM. The run says so; the saved adapter's config has it.
_DIVIDES_WIDTHS = {"c3a": "block_size", "vblora": "vector_length"}


def _fit_to_widths(method: str, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``method``'s width-dividing option (``_DIVIDES_WIDTHS``) fitted to the targets' widths,
    where the value asked does not divide them all; nothing where it does, or the targets are not a
    list of module names (a pattern: peft checks it)."""
    option = _DIVIDES_WIDTHS.get(method)
    targets = kwargs.get("target_modules")
    asked = kwargs.get(option) if option else None
    if not isinstance(asked, int) or asked < 1 or not isinstance(targets, (list, tuple, set)):
        return {}
    widths = {
        width
        for name, module in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
        for width in (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if isinstance(width, int)
    }
    common = math.gcd(*widths) if widths else 0
    if common == 0 or common % asked == 0:
        return {}
    fitted = max(d for d in range(1, min(asked, common) + 1) if common % d == 0)
    listed = ", ".join(map(str, sorted(widths)))
    to_log(f"{PREFIX}{method}: {option} {asked} does not divide the targets' widths ({listed}); using {fitted}")
    return {option: fitted}


class AdaLoraMethod(PeftMethod):
    """AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget is reallocated during
    training by importance (``update_and_allocate``, after each optimizer step, while the step's
    gradients are there), trained with an orthogonality penalty (``extra_loss``). ``total_step``
    left unset is the run's optimizer steps."""

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        tuner = model.base_model
        config = model.peft_config[ADAPTER_NAME]
        if self.options.total_step is None and config.total_step != total_steps:
            config.total_step = total_steps
            tuner.rankallocator.set_total_step(total_steps)
        tuner.update_and_allocate(step - 1)  # peft counts steps from 0 (its example: enumerate's index)

    # what a checkpoint keeps of the rank allocator: its importance and its two moving averages,
    # per parameter, and (once the budget is final) the rank pattern that masks the pruned ranks
    _ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The rank allocator's state, so that a resumed run prunes the ranks an uninterrupted one
        would (a fresh allocator would start its importance averages from nothing)."""
        import torch

        allocator = model.base_model.rankallocator
        state = {f"{kind}.{name}": t for kind in self._ALLOCATOR_STATE for name, t in getattr(allocator, kind).items()}
        pattern = model.peft_config[ADAPTER_NAME].rank_pattern or {}
        state.update({f"rank_pattern.{name}": torch.tensor(keep, dtype=torch.bool) for name, keep in pattern.items()})
        return state

    def load_extra_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        allocator = model.base_model.rankallocator
        allocator.reset_ipt()
        devices = {name: p.device for name, p in model.named_parameters()}
        pattern = {}
        for key, t in tensors.items():
            kind, name = key.split(".", 1)
            if kind == "rank_pattern":
                pattern[name] = t.tolist()
            elif kind in self._ALLOCATOR_STATE:
                getattr(allocator, kind)[name] = t.to(devices.get(name, t.device))
        if pattern:
            model.peft_config[ADAPTER_NAME].rank_pattern = pattern

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """AdaLoRA's orthogonality penalty on P (lora_A) and Q (lora_B), as peft's AdaLoraModel adds
        it to a loss the model computes: ``orth_reg_weight`` times the mean over those matrices of
        ``||P P^T - I||_F`` (``||Q^T Q - I||_F``), which keeps the SVD form's factors orthogonal."""
        import torch

        weight = model.peft_config[ADAPTER_NAME].orth_reg_weight
        if weight <= 0 or not model.training:
            return None
        terms = []
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and ADAPTER_NAME in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
        return weight * torch.stack(terms).mean() if terms else None

    def save_adapter(self, model: nn.Module, directory: str, base_digests: dict[str, str]) -> dict[str, Any]:
        """peft's format without the rank pattern: peft's loader would resize each layer to its kept
        ranks and so rescale it (its ``ranknum``), computing another function than the one trained;
        the pruned ranks are saved as the zeros they are, and load as they ran."""
        config = model.peft_config[ADAPTER_NAME]
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            return super().save_adapter(model, directory, base_digests)
        finally:
            config.rank_pattern = pattern

    def load_adapter(self, model: nn.Module, directory: str, metadata: dict[str, Any]) -> None:
        """A plain peft AdaLoRA adapter may hold a rank pattern: the layers are resized to it first,
        as peft's loader does."""
        pattern = (read_peft_config(directory) or {}).get("rank_pattern")
        if pattern:
            model.peft_config[ADAPTER_NAME].rank_pattern = pattern
        super().load_adapter(model, directory, metadata)


# methods with more than the generic class: AdaLoRA's step hook and save
_CLASSES: dict[str, type[PeftMethod]] = {"adalora": AdaLoraMethod}


@functools.cache
def _strategy_class(method: str) -> type[PeftMethod]:
    """The strategy class of ``method`` (made once)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    config_cls = _peft_catalogue()[method]
    tuners = {str(getattr(k, "value", k)).lower(): t for k, t in PEFT_TYPE_TO_TUNER_MAPPING.items()}
    base = _CLASSES.get(method, PeftMethod)
    title = "".join(part.capitalize() for part in method.split("_"))
    return type(
        f"Peft{title}",
        (base,),
        {
            "name": PREFIX + method,
            "description": f"peft's {config_cls.__name__.removesuffix('Config')} via peft; the task's head trains too.",
            "Options": _options_class(method, config_cls),
            "defaults": DEFAULTS.get(method, LORA_LIKE),
            # what ``peftkit merge`` and ``export`` read before loading anything: peft's own merge
            "merges": not_merged(method, config_cls) is None,
            "peft_type": method.upper(),
            "method": method,
            "config_class": config_cls,
            "tuner_class": tuners.get(method),
            "__module__": __name__,
        },
    )


def not_merged(method: str, config_cls: type) -> str | None:
    """Why ``method`` can never be merged into a plain model (a prompt method, or one in
    ``_NOT_MERGED``); None where peft merges it."""
    from peft import PromptLearningConfig

    return _PROMPT_NOT_MERGED if issubclass(config_cls, PromptLearningConfig) else _NOT_MERGED.get(method)


def resolve(name: str) -> type[PeftMethod]:
    """The strategy of ``peft:NAME`` (``name`` is what follows ``peft:``; ``-`` and ``_`` alike)."""
    method = name.strip().lower().replace("-", "_")
    if method in EXCLUDED:
        raise PeftkitError(f"strategy '{PREFIX}{method}' is not offered: {EXCLUDED[method]}")
    names = method_names()
    if method not in names:
        hint = did_you_mean(PREFIX + method, [PREFIX + n for n in names])
        raise PeftkitError(
            f"unknown strategy '{PREFIX}{name}'{hint}; peft's methods: {', '.join(PREFIX + n for n in names)}"
        )
    return _strategy_class(method)


# -- where each method runs: the dry build of ``peftkit list --peft`` ----------------------------


register_strategy_family(PREFIX, resolve, "each of peft's methods: `peftkit list --peft`")
