"""BitFit (Ben Zaken et al. 2021, https://arxiv.org/abs/2106.10199) as a peftkit plugin.

Only the bias terms of the pretrained model train, plus the new task head: about 0.1% of the
parameters of a BERT-style model. Everything else (optimizer, schedule, saving, loading) comes
from peftkit's defaults for the Strategy interface.
"""

from __future__ import annotations

from peftkit import Strategy, TrainingDefaults


class BitFit(Strategy):
    name = "bitfit"
    description = "BitFit (plugin): only bias terms and the new head train."
    # biases are few and start pretrained: a large step, like the other parameter-efficient methods
    defaults = TrainingDefaults(lr=1e-3, epochs=1, batch_size=32)

    @classmethod
    def search_space(cls, trial, defaults):
        """``peftkit tune``'s space: the shared training settings, with the learning rate over
        1e-4..1e-2 (the paper searched 1e-4..1e-3 on BERT; biases of a small model take larger steps)."""
        return cls.training_space(trial, defaults, lr_range=(1e-4, 1e-2))

    def prepare(self, model, task):
        head = set(task.heads(model))
        for name, param in model.named_parameters():
            # a bias is the one-dimensional parameter of a module that also has a weight; norms'
            # biases count too, as in the paper
            is_bias = name.rsplit(".", 1)[-1] == "bias"
            param.requires_grad_(is_bias or name.split(".", 1)[0] in head)
        return model
