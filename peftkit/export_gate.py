"""The int8 gate of every export format (``peftkit export --quantize int8``: ONNX Runtime's
dynamic int8, OpenVINO's NNCF int8): whether an int8 model is kept, from its answers and PyTorch's
on the check examples, and its settings (``--max-accuracy-drop``, ``--min-agreement``).

Gated on what a user loses, accuracy: at most ``INT8_MAX_ACCURACY_DROP`` points below PyTorch's
fp32 model's, with the agreement with PyTorch's labels reported beside it and required only where
asked. Needs numpy only; nothing here knows a runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import PeftkitError

INT8_MAX_ACCURACY_DROP = 0.5
"""Points of accuracy on the check examples an int8 model may lose against PyTorch's fp32 model
(``--max-accuracy-drop``). Accuracy, not agreement, is what a user loses: the shipped LoRA
adapter's int8 flips 2% of the labels (most of them examples PyTorch puts within 0.05 of 0.5)
and loses 0.08 points; a 99% agreement gate refused it. Agreement is reported beside it, and
required only where asked (``--min-agreement``)."""

Echo = Callable[[str], None]


def check_gate_settings(quantize: str | None, min_agreement: float | None, max_accuracy_drop: float | None) -> None:
    """Refuse an int8 gate (``int8_gate``) that is no number in range, or one given without int8:
    an fp32 export must match PyTorch, not come close."""
    for flag, value in (("--max-accuracy-drop", max_accuracy_drop), ("--min-agreement", min_agreement)):
        if value is not None and quantize is None:
            raise PeftkitError(f"{flag} applies to --quantize int8 (an fp32 export must match PyTorch)")
    if max_accuracy_drop is not None and (
        isinstance(max_accuracy_drop, bool)
        or not isinstance(max_accuracy_drop, (int, float))
        or not 0 <= max_accuracy_drop <= 100
    ):
        raise PeftkitError(
            f"--max-accuracy-drop {max_accuracy_drop!r} is not a number of points; give one in [0, 100], e.g. 0.5"
        )
    if min_agreement is not None and (
        isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0 < min_agreement <= 1
    ):
        raise PeftkitError(f"--min-agreement {min_agreement!r} is not a fraction; give one in (0, 1], e.g. 0.98")


def echo_int8(check: dict[str, Any], engine: str, what: str, echo: Echo) -> None:
    """The int8 check's line (``int8_gate``'s figures): accuracy against PyTorch's where the check
    examples have labels, the agreement with PyTorch's labels always, and what was required.
    ``what``: the int8 model, in words."""
    agreement = (
        f"the same label as PyTorch on {check['agreed']:,} of {check['examples']:,} examples "
        f"({check['agreement']:.2%}"
        + (f"; required {check['min_agreement']:.1%})" if check["min_agreement"] is not None else ")")
    )
    if check["gated_on"] == "accuracy":
        echo(
            f"int8 check ({what}): accuracy {check[f'accuracy_{engine}']:.4f} vs "
            f"{check['accuracy_pytorch']:.4f} in PyTorch ({0.0 - check['accuracy_drop_points']:+.2f} points; "
            f"allowed -{check['max_accuracy_drop']:g}); {agreement}"
        )
    else:
        echo(
            f"int8 check ({what}): {agreement}, on unlabelled examples: at least "
            f"{check['agreement_required']:.1%} bounds the accuracy lost by {check['max_accuracy_drop']:g} points"
        )


def int8_gate(
    got: Any,
    reference: Any,
    labels: list[int] | None,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    engine: str,
) -> dict[str, Any]:
    """The int8 check of every export format: its figures (the ``check`` record), from the int8
    model's probabilities ``got`` and PyTorch's fp32 ``reference`` (numpy, examples x labels) on the
    check examples, whose ``labels`` are None where unlabelled. Refused in one line (nothing is
    written) where int8's accuracy is more than ``max_accuracy_drop`` points (default
    ``INT8_MAX_ACCURACY_DROP``) below PyTorch's, or, where ``min_agreement`` is given, it gives
    PyTorch's label on less than that share. Without labels accuracy cannot be measured; as each
    label that differs from PyTorch's costs at most one example's accuracy, PyTorch's label is then
    required on at least 1 - max_accuracy_drop / 100 of them, which bounds the loss whatever the
    labels are. ``engine`` names int8's accuracy in the record (``accuracy_onnx``)."""
    import numpy as np

    allowed = INT8_MAX_ACCURACY_DROP if max_accuracy_drop is None else float(max_accuracy_drop)
    same = got.argmax(-1) == reference.argmax(-1)
    n, agreed = len(same), int(same.sum())
    out: dict[str, Any] = {
        "examples": n,
        "agreed": agreed,
        "agreement": agreed / n,
        "min_agreement": min_agreement,
        "max_accuracy_drop": allowed,
        "int8_max_abs_diff": float(np.abs(got - reference).max()),
    }
    required = min_agreement
    if labels is not None:
        truth = np.asarray(labels)
        right_fp32, right_int8 = int((reference.argmax(-1) == truth).sum()), int((got.argmax(-1) == truth).sum())
        out |= {
            "gated_on": "accuracy",
            "accuracy_pytorch": right_fp32 / n,
            f"accuracy_{engine}": right_int8 / n,
            "accuracy_drop_points": 100 * (right_fp32 - right_int8) / n,
        }
        # counted in examples, not in rounded fractions: a drop of exactly the allowance passes
        if 100 * (right_fp32 - right_int8) > allowed * n + 1e-9:
            raise PeftkitError(_gate_refusal(out, engine, "accuracy"))
    else:
        required = max(min_agreement or 0.0, 1 - allowed / 100)
        out |= {"gated_on": "agreement (no labels)", "agreement_required": required}
    if required is not None and agreed < required * n - 1e-9:
        raise PeftkitError(_gate_refusal(out, engine, "agreement"))
    return out


def _gate_refusal(check: dict[str, Any], engine: str, failed: str) -> str:
    """``int8_gate``'s one-line refusal: what failed, the figures, what to do instead."""
    n = check["examples"]
    agreement = f"PyTorch's label on {check['agreed']:,} of {n:,} check examples ({check['agreement']:.2%})"
    if failed == "accuracy":
        said = (
            f"the int8 model's accuracy on the {n:,} check examples is {check[f'accuracy_{engine}']:.4f}, "
            f"{check['accuracy_drop_points']:.2f} points below PyTorch's {check['accuracy_pytorch']:.4f} "
            f"(allowed {check['max_accuracy_drop']:g}: --max-accuracy-drop); it gives {agreement}"
        )
    elif check["gated_on"] == "accuracy":
        said = (
            f"the int8 model gives {agreement}, under the required {check['min_agreement']:.1%} "
            f"(--min-agreement); accuracy {check[f'accuracy_{engine}']:.4f} vs "
            f"{check['accuracy_pytorch']:.4f} in PyTorch"
        )
    else:
        said = (
            f"the int8 model gives {agreement}, unlabelled, under the {check['agreement_required']:.1%} "
            f"required (--max-accuracy-drop {check['max_accuracy_drop']:g} without labels; --min-agreement)"
        )
    return f"{said}; nothing was written (export without --quantize for the fp32 model)"
