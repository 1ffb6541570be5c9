"""``peftkit plan``: each strategy's peak training memory, predicted without training.

The peak is split the way it is spent:

- **weights**: every parameter at the precision it is stored in: 4 bytes, 2 for frozen weights
  under bf16/fp16, about 0.52 bytes for a 4-bit NF4 weight with double quantization (0.5 for the
  codes, one 8-bit block scale per 64 weights, one fp32 scale per 256 blocks), about 1 byte for an
  8-bit weight plus an fp32 scale per row;
- **gradients**: 4 bytes per trainable parameter (trainable parameters stay in fp32);
- **optimizer state**: AdamW's two moments, 8 bytes per trainable parameter, or about 2 for the
  8-bit AdamW (tensors under 4,096 elements keep 32-bit state, as bitsandbytes does);
- **activations**: what the forward and backward passes hold beyond the parameters. They depend on
  the strategy (a frozen backbone below the lowest trainable parameter keeps nothing for backward,
  prefix tuning needs the whole stack), the attention path, the precision and checkpointing, so they
  are *measured*, not guessed: the model is built from its config with random weights, the strategy
  prepares it exactly as a run does, and up to twelve training steps run on the device at the planned
  batch (the first at the full length, the rest at seeded random lengths, as a run's padded batches
  vary), stopping once four steps in a row moved the peak by under 1%. The peak increase over the
  prepared model, minus the gradients and optimizer state, is the activations. Strategies whose
  prepared models have the same parameters, trainable ones and forward pass (``full`` and
  ``gradual_unfreeze``) are measured once. Models up to 12 blocks and 150M parameters are measured whole (seconds);
  bigger ones
  at depth 2, and each further block adds its share: on a GPU depth 3's figure minus depth 2's, on
  CPU the bytes autograd saves for a block (there the resident set of depth 3 against depth 2 moves
  with the heap as much as with a block). With
  ``--device cuda`` on a machine without a GPU, activations are instead the bytes of every tensor
  autograd saves in one forward pass (``torch.autograd.graph.saved_tensors_hooks``) plus one block's
  worth of workspace (``workspace``).
- **runtime** (CPU only): the resident memory of a process that has imported torch, transformers
  and peft, measured in this process before any model exists, since on CPU the figure compared is
  the whole process's.

The whole model is built only on the meta device (no memory) unless it is small, so planning a 1B
model takes the memory of a 3-block one.
"""

from .arithmetic import parameter_memory, per_process_memory
from .estimate import Estimate, Plan, PlanSettings, resolve_settings
from .measure import (
    DIRECT_MAX_DEPTH,
    DIRECT_MAX_PARAMS,
    MAX_STEPS,
    keep_inputs_as_int8_matmul,
    measure_saved_activations,
    measure_step_increase,
    runtime_bytes,
    saved_activation_bytes,
    step_lengths,
)
from .plan import (
    bench_predictor,
    check_applicable,
    load_config,
    make_plan,
    plan_strategy,
    rough_run_seconds,
    structure_key,
)

__all__ = [
    "DIRECT_MAX_DEPTH",
    "DIRECT_MAX_PARAMS",
    "MAX_STEPS",
    "Estimate",
    "Plan",
    "PlanSettings",
    "bench_predictor",
    "check_applicable",
    "keep_inputs_as_int8_matmul",
    "load_config",
    "make_plan",
    "measure_saved_activations",
    "measure_step_increase",
    "parameter_memory",
    "per_process_memory",
    "plan_strategy",
    "resolve_settings",
    "rough_run_seconds",
    "runtime_bytes",
    "saved_activation_bytes",
    "step_lengths",
    "structure_key",
]
