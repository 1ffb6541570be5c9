"""``peftkit export --format openvino``: a trained classifier adapter as OpenVINO IR, and
``peftkit predict --openvino``: serving it.

The graph is the ONNX export's (``peftkit.exporter``: the strategy's serving model ending in the
label probabilities, by PyTorch's own exporter, batch and sequence dynamic), converted by
``openvino.convert_model`` and saved by ``openvino.save_model`` with its weights kept in float32
(``save_model`` makes them fp16 unless told not to, which moves probabilities by ~1e-3). Going
through ONNX rather than converting the PyTorch module directly reuses the one trace every
strategy is tested with. Checked before anything is written, as an ONNX export is:

- fp32: OpenVINO's probabilities within ``FP32_TOLERANCE`` of PyTorch's on the first check
  examples, computed in f32 (``INFERENCE_PRECISION_HINT``). OpenVINO's own default precision is
  bf16 on a CPU with AVX512-BF16 or AMX, whose probabilities differ by ~1e-2: an fp32 export is
  served in f32, as checked, and what OpenVINO's default would be is recorded beside it.
- int8 (``--quantize int8``): NNCF's post-training quantization (weights and activations int8,
  ``ModelType.TRANSFORMER``: SmoothQuant, bias correction), calibrated on examples of the
  validation split of the adapter's own data, never on the test split it is checked on; then
  served at OpenVINO's default precision (the int8 layers in int8, the rest in bf16 where the CPU
  has it) and kept only if ``int8_gate`` passes it on every check example.

The directory holds ``model.xml`` and ``model.bin``, the tokenizer (or image processor), the model
config and ``peftkit_export.json`` (the ONNX export's record, with ``format`` "openvino", the
precision it computes in, and for int8 the calibration). Staged and renamed into place only once
every check passed: a failed check leaves nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from .adapter_io import read_metadata, resolve_adapter_dir
from .env import package_versions
from .errors import PeftkitError, debug_requested, first_line
from .export_gate import echo_int8, int8_gate
from .exporter import (
    DEFAULT_OPSET,
    EXPORT_EXTRA,
    FP32_CHECK_EXAMPLES,
    MODEL_FILES,
    CheckData,
    Echo,
    ExportResult,
    batches,
    check_data,
    check_export_settings,
    classifier_task,
    data_config,
    export_record,
    export_versions,
    fp32_verdict,
    pytorch_probabilities,
    read_export_metadata,
    serving_module,
    write_beside,
)
from .inference import load_adapter
from .onnx_graph import export_graph
from .rundir import check_output_dir, staged_dir
from .tasks import get_task

OPENVINO_FILE = MODEL_FILES["openvino"]
CALIBRATION_EXAMPLES = 1500
"""Validation examples NNCF calibrates int8 on, at most, one per call. More than NNCF's default
subset (300): on the shipped LoRA adapter, all 1,275 of its validation split gave int8 PyTorch's
label on 98.4% of the test split, against 97.8% with 300 (accuracy -0.31 against -0.47 points),
for ~4x the calibration time (1 minute on 2 quiet cores)."""
F32 = "f32"


def require_openvino(quantize: str | None, serving: bool = False) -> None:
    """Refuse in one line, before anything loads, where the libraries an OpenVINO export needs
    (PyTorch's ONNX exporter, OpenVINO, and for int8 NNCF) are not installed; ``serving``: what
    ``predict --openvino`` needs (OpenVINO alone)."""
    needed = ("openvino",) if serving else ("onnx", "onnxscript", "openvino") + (("nncf",) if quantize else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        what = "predict --openvino" if serving else "OpenVINO export"
        raise PeftkitError(f"{what} needs {', '.join(missing)}, which is not installed: {EXPORT_EXTRA}")


def export_openvino(
    adapter_dir: str,
    output: str,
    model: str | None = None,
    quantize: str | None = None,
    dataset: str | None = None,
    columns: tuple[str | None, str | None] = (None, None),
    force: bool = False,
    overwrite: bool = False,
    gate: tuple[float | None, float | None] = (None, None),
    echo: Echo = lambda _: None,
) -> ExportResult:
    """Export the adapter in ``adapter_dir`` (on its base, or ``model``) to OpenVINO IR in the
    directory ``output``, checked against PyTorch on ``dataset`` (read with ``columns``: its text
    and label column; default: the adapter's own test split); see the module's docstring.
    ``gate``: ``int8_gate``'s ``max_accuracy_drop`` and ``min_agreement``. Refused in one line: a
    task that is no classifier, missing libraries, int8 for an adapter that records no dataset
    to calibrate on, an existing ``output`` (unless ``overwrite``), a failed check (nothing written)."""
    task = _refusals(adapter_dir, output, overwrite, quantize, gate)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    echo(f"loading adapter {adapter_dir!r} ...")
    loaded = load_adapter(adapter_dir, model, force=force)
    meta = loaded.metadata
    data = check_data(task, meta, dataset, *columns)
    calibration, calibrated_on = _calibration_inputs(task, meta, columns) if quantize else ([], "")
    checked = data.inputs if quantize else data.inputs[:FP32_CHECK_EXAMPLES]
    echo(f"checking on {len(checked):,} examples of {data.described}: PyTorch's answers ...")
    reference = pytorch_probabilities(task, loaded, checked)
    seconds["load_and_reference"] = time.perf_counter() - clock

    clock = time.perf_counter()
    serving, sample, module = serving_module(
        task, loaded, data.inputs[:FP32_CHECK_EXAMPLES], f"OpenVINO IR (through ONNX opset {DEFAULT_OPSET})", echo
    )
    with staged_dir(output, overwrite, flag="--output") as stage:
        with tempfile.TemporaryDirectory(dir=stage) as work:
            fp32_path = os.path.join(work if quantize else stage, OPENVINO_FILE)
            _write_ir(module, sample, task.serving_axes, work, fp32_path)
            seconds["export"] = time.perf_counter() - clock
            clock = time.perf_counter()
            check = _check_fp32(fp32_path, loaded, data, reference, echo)
            if quantize:
                calibration_set = (calibration, calibrated_on)
                check |= _quantize_and_gate(fp32_path, stage, loaded, data, calibration_set, reference, gate, echo)
        seconds["check"] = time.perf_counter() - clock
        path = os.path.join(stage, OPENVINO_FILE)
        size = os.path.getsize(path) + os.path.getsize(path[: -len(".xml")] + ".bin")
        merged = bool(loaded.strategy.merges)
        record = export_record(
            "openvino", adapter_dir, DEFAULT_OPSET, quantize, task, loaded, merged, list(sample), check
        )
        record |= {"inference_precision": check["inference_precision"], "versions": openvino_versions()}
        write_beside(stage, loaded, serving, record)
    return ExportResult(
        *(output, "openvino", meta["strategy"], meta["base_model"], merged, quantize, DEFAULT_OPSET),
        *(size, check, seconds),
        model_file=OPENVINO_FILE,  # by name: ExportResult's later fields (files, usage) are GGUF's
    )


def _refusals(
    adapter_dir: str, output: str, overwrite: bool, quantize: str | None, gate: tuple[float | None, float | None]
) -> Any:
    """What ``export_openvino`` refuses before loading anything: the settings, missing libraries,
    an existing ``output``, a task that is no classifier, and int8 where the adapter records no
    dataset whose validation split it could be calibrated on. Returns the adapter's task."""
    check_export_settings("openvino", quantize, None, gate[1], gate[0])
    require_openvino(quantize)
    check_output_dir(output, overwrite, flag="--output")
    task = classifier_task(adapter_dir, "openvino")
    if quantize and not (read_metadata(resolve_adapter_dir(adapter_dir)) or {}).get("dataset"):
        raise PeftkitError(
            "--format openvino --quantize int8 calibrates on the validation split of the adapter's own "
            "dataset, and this adapter records none (export it in fp32, or with --format onnx "
            "--quantize int8, whose dynamic quantization needs no calibration)"
        )
    return task


def _calibration_inputs(
    task: Any, metadata: dict[str, Any], columns: tuple[str | None, str | None]
) -> tuple[list[Any], str]:
    """Up to ``CALIBRATION_EXAMPLES`` inputs of the validation split of the adapter's recorded
    dataset, split as its run split it (never the test split an export is checked on), and that
    split in words."""
    recorded = metadata["dataset"]  # _refusals: recorded
    try:
        split = task.load_data(data_config(task, metadata, recorded, *columns)).splits["validation"]
    except PeftkitError as exc:
        raise PeftkitError(
            f"cannot load the adapter's dataset {recorded!r} to calibrate int8 on its validation split ({exc})"
        ) from None
    if len(split) == 0:
        raise PeftkitError(f"the validation split of {recorded!r} is empty: nothing to calibrate int8 on")
    seed = int((metadata.get("split") or {}).get("seed") or 0)
    inputs = list(split.select(range(min(len(split), CALIBRATION_EXAMPLES)))[task.input_field])
    return inputs, f"the validation split of {recorded!r} (seed {seed})"


def _write_ir(module: Any, sample: dict[str, Any], axes: dict[int, str], work: str, path: str) -> None:
    """The module's graph as OpenVINO IR at ``path`` (and its ``.bin``), through an ONNX file in
    ``work``, its weights in float32."""
    import openvino as ov

    onnx_path = os.path.join(work, MODEL_FILES["onnx"])
    export_graph(module, sample, axes, DEFAULT_OPSET, onnx_path)
    ov.save_model(ov.convert_model(onnx_path), path, compress_to_fp16=False)


def compile_model(path: str, threads: int | None = None, precision: str | None = None) -> Any:
    """The IR at ``path`` compiled for the CPU: ``precision`` an ``INFERENCE_PRECISION_HINT``
    ("f32", "bf16"; None: OpenVINO's default for this CPU), on ``threads`` threads (None: its
    default, every core)."""
    import openvino as ov

    config: dict[str, Any] = {}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(path, "CPU", config)


def inference_precision(compiled: Any) -> str:
    """The precision a compiled model computes in ("f32", "bf16", "f16"), as OpenVINO reports it."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def openvino_probabilities(
    compiled: Any, task: Any, processor: Any, metadata: dict[str, Any], inputs: list[Any]
) -> Any:
    """Label probabilities (numpy, examples x labels) of a compiled model for ``inputs``."""
    import numpy as np

    return np.concatenate([_infer(compiled, b) for b in batches(task, processor, metadata, inputs)])


def _infer(compiled: Any, batch: dict[str, Any]) -> Any:
    """One batch through a compiled model; its one output, the probabilities, copied out of
    OpenVINO's buffer (a compiled model's call copies unless told to share)."""
    return compiled(_feed(compiled, batch))[0]


def _feed(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A model batch as OpenVINO takes it: numpy arrays, only the inputs ``model`` (compiled or
    not) has; the tokenizer may give more."""
    names = {name for port in model.inputs for name in port.get_names()}
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items() if k in names}


def _check_fp32(path: str, loaded: Any, data: CheckData, reference: Any, echo: Echo) -> dict[str, Any]:
    """The fp32 IR at ``path``, computed in f32, against PyTorch's ``reference`` on the first check
    examples (``fp32_verdict``), with the precision OpenVINO would pick itself on this CPU."""
    inputs = data.inputs[:FP32_CHECK_EXAMPLES]
    got = openvino_probabilities(
        compile_model(path, precision=F32), loaded.task, loaded.tokenizer, loaded.metadata, inputs
    )
    check = fp32_verdict(float(abs(got - reference[: len(inputs)]).max()), data, echo, " (OpenVINO, f32)")
    default = inference_precision(compile_model(path))
    if default != F32:
        echo(f"OpenVINO's default precision on this CPU is {default}: an fp32 export is served in f32, as checked")
    return check | {"inference_precision": F32, "default_precision": default}


def _quantize_and_gate(
    fp32_path: str,
    stage: str,
    loaded: Any,
    data: CheckData,
    calibration_set: tuple[list[Any], str],
    reference: Any,
    gate: tuple[float | None, float | None],
    echo: Echo,
) -> dict[str, Any]:
    """NNCF int8 of the checked fp32 IR at ``fp32_path``, calibrated on ``calibration_set``
    (validation inputs, one per call, and where they come from, in words), written to ``stage`` and
    gated by ``int8_gate`` on every check example, served as ``predict --openvino`` serves it: at
    OpenVINO's default precision."""
    import openvino as ov

    task, processor, meta = loaded.task, loaded.tokenizer, loaded.metadata
    calibration, calibrated_on = calibration_set
    echo(f"int8: NNCF post-training quantization, calibrated on {len(calibration):,} examples of {calibrated_on} ...")
    clock = time.perf_counter()
    path = os.path.join(stage, OPENVINO_FILE)
    ov.save_model(_nncf_int8(ov.Core().read_model(fp32_path), calibration, loaded), path)
    calibrated = time.perf_counter() - clock
    compiled = compile_model(path)
    got = openvino_probabilities(compiled, task, processor, meta, data.inputs)
    precision = inference_precision(compiled)
    what = f"NNCF, the rest in {precision}"
    check = int8_gate(got, reference, data.labels, *gate, "openvino") | {
        "int8_graph": what,
        "inference_precision": precision,
        "calibration": {
            "split": calibrated_on,
            "examples": len(calibration),
            "seconds": calibrated,
        },
    }
    echo_int8(check, "openvino", what, echo)
    return check


def _nncf_int8(model: Any, calibration: list[Any], loaded: Any) -> Any:
    """NNCF's int8 of the OpenVINO ``model``, calibrated on ``calibration`` (inputs, one example a
    call: no padding in the statistics). Its progress bars and log lines are kept, and shown only
    if it fails (``PEFTKIT_DEBUG=1``)."""
    import nncf

    def feed(example: Any) -> dict[str, Any]:
        return _feed(model, loaded.task.serving_batch(loaded.tokenizer, loaded.metadata, [example]))

    said = io.StringIO()
    logger = logging.getLogger("nncf")
    handlers, logger.handlers = logger.handlers, [logging.StreamHandler(said)]  # it logs to stdout
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):  # rich's bars: stdout
            return nncf.quantize(
                model,
                nncf.Dataset(calibration, feed),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(calibration),
            )
    except Exception as exc:
        if debug_requested():
            sys.stderr.write(said.getvalue())
        raise PeftkitError(
            f"NNCF could not quantize this model: {first_line(exc)} (PEFTKIT_DEBUG=1 shows its report)"
        ) from exc
    finally:
        logger.handlers = handlers


def openvino_versions() -> dict[str, str]:
    """``export_versions()`` with OpenVINO's and NNCF's."""
    extra = {k: v for k, v in package_versions(("openvino", "nncf")).items() if k != "python"}
    return export_versions() | extra


# -- serving an export: peftkit predict --openvino --------------------------------------------------
@dataclass
class OpenVinoModel:
    """An OpenVINO export compiled for the CPU; answers ``Task.predict`` as an adapter on its base
    does (``label_names``, ``metadata``, ``tokenizer``, ``probabilities``)."""

    compiled: Any
    tokenizer: Any  # the task's processor, as on a LoadedAdapter
    metadata: dict[str, Any]
    task: Any

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata["label_names"])

    @property
    def precision(self) -> str:
        """The precision OpenVINO computes in ("f32", "bf16")."""
        return inference_precision(self.compiled)

    def probabilities(self, batch: dict[str, Any]) -> Any:
        return _infer(self.compiled, batch)


def load_openvino(directory: str, threads: int | None = None, precision: str | None = None) -> OpenVinoModel:
    """The export in ``directory`` (``peftkit export --format openvino --output``) compiled for the
    CPU on ``threads`` threads (None: OpenVINO's default), with its processor, ready for
    ``Task.predict``. ``precision`` None: as the export was checked (f32 for an fp32 export;
    OpenVINO's default for int8); "default": OpenVINO's default for this CPU; or a hint ("f32")."""
    require_openvino(None, serving=True)
    meta = read_export_metadata(directory, "openvino")
    if precision is None:
        precision = F32 if meta.get("inference_precision") == F32 else "default"
    task = get_task(meta.get("task") or "sequence-classification")
    processor = task.load_processor(directory)
    hint = None if precision == "default" else precision
    return OpenVinoModel(compile_model(os.path.join(directory, OPENVINO_FILE), threads, hint), processor, meta, task)
