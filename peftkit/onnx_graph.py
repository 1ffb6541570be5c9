"""The ONNX graph of an export: written by PyTorch's exporter (``export_graph``), and for int8 the
fp32 graphs worth quantizing, fastest first (``int8_sources``: onnxscript's attention fusions, then
ONNX Runtime's transformer optimizer), and ONNX Runtime's dynamic quantization (``quantize_int8``).
Which graph is used is the exporter's check against PyTorch (``peftkit.exporter``); nothing here
knows a run or a strategy."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Any

from .errors import PeftkitError, debug_requested, first_line


def export_graph(module: Any, sample: dict[str, Any], axes: dict[int, str], opset: int, path: str) -> None:
    """``module`` (taking the tensors of ``sample`` by position) to an ONNX file at ``path``. The
    exporter's own chatter is kept, and shown only if it fails."""
    import torch
    from torch.export import Dim

    # torch.onnx logs a warning per torchvision operator it cannot register (torchvision is not a
    # dependency): through a handler that holds the real stderr, so the redirect below misses it
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    names = list(sample)
    dims = {position: Dim(name) for position, name in axes.items()}
    # one entry per parameter of forward: its *inputs, a tuple with one entry per tensor
    dynamic = (tuple({p: d for p, d in dims.items() if p < sample[n].dim()} for n in names),)
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said), warnings.catch_warnings():
            # "the axis name batch will not be used": the dims keep the exporter's own names; harmless
            warnings.simplefilter("ignore", UserWarning)
            program = torch.onnx.export(
                module,
                tuple(sample.values()),
                dynamo=True,
                input_names=names,
                output_names=["probabilities"],
                dynamic_shapes=dynamic,
                opset_version=opset,
                optimize=True,
                verify=False,
            )
            program.save(path)
    except Exception as exc:
        if debug_requested():
            sys.stderr.write(said.getvalue())
        raise PeftkitError(
            f"torch.onnx could not export this model: {first_line(exc)} (PEFTKIT_DEBUG=1 shows the exporter's report)"
        ) from exc


INT8_GRAPHS = ("attention fused, padding mask", "attention fused", "ONNX Runtime's transformer optimizer")
"""The fp32 graphs int8 quantizes, fastest first (``int8_sources``): the first that matches
PyTorch within ``FP32_TOLERANCE`` is quantized. On the shipped LoRA adapter (2-core Xeon,
AVX-512 VNNI, batches of 32, the three taking turns for 5 rounds) int8 made from them served 248,
208 and 179 examples/s, in this order."""


def fuse_attention(source: str, target: str, padding_mask: bool) -> bool:
    """onnxscript's transformer fusions on the fp32 graph at ``source``, written to ``target``:
    GELU with its bias, each layer norm with its residual add, and each attention into ONNX
    Runtime's ``MultiHeadAttention`` with its query, key and value projections left as MatMuls,
    which dynamic quantization then makes int8. onnxscript's further fusion into the packed
    ``Attention`` op is skipped on purpose: the quantizer leaves that op in fp32 where it declares
    its q/k/v sizes (as onnxscript's does), and its fp32 projections cost more than int8 saves.

    ``padding_mask``: each attention takes the 2-D ``attention_mask`` input as its key padding mask
    instead of the additive (batch, 1, seq, seq) bias the exporter computes from it on every call.
    That is the same function only for a bidirectional encoder; the caller's fp32 check against
    PyTorch decides, and a causal model fails it. Returns False, writing nothing, where there is
    no attention to fuse (or, with ``padding_mask``, no mask to hand it)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import ORT_PATTERN_REWRITE_RULES, shape_optimization
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    model = ir.load(source)
    # what onnxscript's optimize_for_ort does first: Gemm as MatMul + Add (a GPT-2 Conv1D is a Gemm
    # whose fused form ONNX Runtime refuses), shapes known, constants folded
    rewrite(model, [gemm_to_matmul_add_rule])
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    fuse_erfgelu(model)
    fuse_skip_layer_normalization(model)
    fuse_sdpa(model, apply_shape_inference=True)
    if fuse_mha1(model) + fuse_mha2(model) == 0:
        return False
    fuse_mha_scale(model)
    fuse_mha_bias(model)
    fuse_bias_gelu(model)
    if padding_mask and not _mask_as_key_padding(model):
        return False
    optimize(model)  # drops the bias computation nothing reads any more
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    common_passes.ShapeInferencePass()(model)
    ir.save(model, target)
    return True


def _mask_as_key_padding(model: Any) -> bool:
    """Hand every fused ``MultiHeadAttention`` of ``model`` (an onnx_ir model) the 2-D
    ``attention_mask`` input as its key padding mask, in place of the additive bias computed from
    it (see ``fuse_attention``). False, changing nothing, where there is no mask input or an
    attention's inputs are not the expected (bias, no padding mask, no cache)."""
    import onnx_ir as ir

    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    attentions = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    # inputs: query, key, value, bias, key_padding_mask, attention_bias, then a cache (none here)
    if mask is None or not all(
        len(n.inputs) >= 6 and n.inputs[4] is None and n.inputs[5] is not None and all(v is None for v in n.inputs[6:])
        for n in attentions
    ):
        return False
    cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32})
    model.graph.insert_before(attentions[0], cast)
    for node in attentions:
        node.replace_input_with(4, cast.outputs[0])
        node.replace_input_with(5, None)
    return True


def int8_sources(source: str, workdir: str) -> Any:
    """The fp32 graphs to quantize, fastest first (``INT8_GRAPHS``), each made from the exported
    graph at ``source`` into ``workdir``: yields (description, path). A fusion that does not match
    this model, or fails, is skipped; the last, ONNX Runtime's own transformer optimizer (layer
    norms with their residual add, the bias with GELU, attention where it recognises it), always
    comes. Each is a candidate only: the caller checks it against PyTorch before using it."""
    from onnxruntime.transformers.optimizer import optimize_model

    said = io.StringIO()
    for description, padding_mask in zip(INT8_GRAPHS[:2], (True, False)):
        path = os.path.join(workdir, f"int8-source-{int(padding_mask)}.onnx")
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                made = fuse_attention(source, path, padding_mask)
        except Exception:  # noqa: BLE001 - a pattern rewriter that trips on a graph is a fusion that does not apply
            made = False
        if made:
            yield description, path
    path = os.path.join(workdir, "int8-source-ort.onnx")
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        # num_heads / hidden_size 0: read from the graph; fusions that do not match are skipped
        optimize_model(source, model_type="bert", num_heads=0, hidden_size=0).save_model_to_file(path)
    yield INT8_GRAPHS[2], path


def quantize_int8(source: str, target: str) -> None:
    """ONNX Runtime's dynamic quantization of the fp32 graph at ``source`` into ``target``: weights
    int8 per output channel, activations quantized on the fly per call. Per channel, not per
    tensor, lifted the shipped LoRA adapter's agreement with PyTorch from 93.5% to 98%. The graph
    it quantizes uses ONNX Runtime's own operators (``int8_sources``), as dynamic quantization does
    anyway: the fp32 export stays standard ONNX."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
