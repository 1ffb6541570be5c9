"""What strategies built on peft share: saving and loading in peft's own format.

Their adapters are written exactly as peft writes them (``adapter_config.json`` +
``adapter_model.safetensors``, peft's key names), so ``peft.PeftModel.from_pretrained(base, dir)``
loads them without peftkit. Unlike peft's loader, which only warns when keys do not match (and the
adapter then silently does nothing: peft#577, #1678, #2438), loading here is strict.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, ClassVar

from ..adapter_io import PEFT_TENSORS_FILE, read_peft_adapter, write_safetensors
from ..errors import PeftkitError
from .base import Strategy, check_tensors_match

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

ADAPTER_NAME = "default"


def _peft_state(model: nn.Module) -> dict[str, Any]:
    """The adapter's tensors under peft's saved key names. ``save_embedding_layers=False``: our
    strategies never train embeddings, and "auto" makes peft look the base model up on the hub."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)


class PeftStrategy(Strategy):
    """Base for strategies that ``prepare`` with ``peft.get_peft_model``."""

    #: peft's ``peft_type`` of adapters this strategy writes (``LORA``, ``PREFIX_TUNING``); a plain
    #: peft adapter directory is matched to its strategy by it.
    peft_type: ClassVar[str] = ""

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> Any:
        """This strategy's options from a peft ``adapter_config.json`` (for plain peft adapters)."""
        raise NotImplementedError

    def save_adapter(self, model: nn.Module, directory: str, base_digests: dict[str, str]) -> dict[str, Any]:
        config = model.peft_config[ADAPTER_NAME]
        # peft appends its own guesses ("classifier", "score") to ours: record each name once (a
        # config without the field, LLaMA-Adapter's, has no head to save)
        if hasattr(config, "modules_to_save"):
            config.modules_to_save = list(dict.fromkeys(config.modules_to_save or [])) or None
        # the tensors first, in training mode: a prompt encoder's output is what ships (P-tuning's
        # MLP is run once here), and the model keeps computing as it trained after the save
        tensors = _peft_state(model)
        mode, config.inference_mode = config.inference_mode, True
        try:
            config.save_pretrained(directory)
        finally:
            config.inference_mode = mode
        write_safetensors(tensors, os.path.join(directory, PEFT_TENSORS_FILE))
        return {"format": "peft", "peft_type": self.peft_type}

    def load_adapter(self, model: nn.Module, directory: str, metadata: dict[str, Any]) -> None:
        import torch
        from peft import set_peft_model_state_dict

        tensors = read_peft_adapter(directory, self.name, self.peft_type)
        expected = _peft_state(model)
        check_tensors_match(expected, tensors, what=f"adapter (strategy {self.name!r})")
        set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER_NAME)
        # peft reports mismatches only as warnings: read the weights back to be sure they landed
        loaded = _peft_state(model)
        for key, value in tensors.items():
            if not torch.equal(loaded[key].to("cpu", value.dtype), value):
                raise PeftkitError(f"the {self.name} adapter did not load: {key!r} kept its old value")
