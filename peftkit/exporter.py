"""``peftkit export``: a trained adapter as a model that serves without PyTorch (ONNX).

The adapter is applied to its base exactly as ``peftkit predict`` applies it, then:

1. the strategy's serving model (``Strategy.serving_model``: merged where the strategy ``merges``,
   LoRA, full, gradual unfreezing; otherwise with its own modules, the bottlenecks, prefixes or
   pooled head, in the graph) is wrapped so the graph ends in the label probabilities;
2. it is exported by PyTorch's own exporter (``torch.onnx.export`` with ``dynamo=True``: the
   maintained path, which reads the graph through ``torch.export`` and writes it with onnxscript),
   with the batch (and for text the sequence) as dynamic axes;
3. ONNX Runtime runs the file on real examples, and the export is kept only if it agrees with
   PyTorch: fp32 within ``FP32_TOLERANCE`` on every probability; int8 (ONNX Runtime's dynamic
   quantization) by ``int8_gate``: its accuracy on the check examples at most
   ``INT8_MAX_ACCURACY_DROP`` points below PyTorch's (and, where asked, the same label on a
   given share of them).

Why not Optimum's exporter: it is not in our lock, it exports a plain transformers model by
architecture, and half of our strategies are not plain transformers models (a bottleneck adapter,
injected prefixes); ``torch.onnx`` traces whatever ``forward`` computes, adapters included.

The directory holds ``model.onnx``, the tokenizer (or image processor) and model config, and
``peftkit_export.json`` (labels, max length, the base's fingerprint, what was checked and the
versions). It is written to a staging directory and renamed into place only once the check
passed: an export that fails it leaves nothing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import RunConfig
from .env import package_versions
from .errors import PeftkitError, first_line
from .export_gate import check_gate_settings, echo_int8, int8_gate
from .inference import adapter_task, load_adapter
from .onnx_graph import export_graph, int8_sources, quantize_int8
from .rundir import check_output_dir, staged_dir
from .settings import EXPORT_FORMATS, EXPORT_QUANTIZATIONS
from .tasks import get_task

ONNX_FILE = "model.onnx"
MODEL_FILES = {"onnx": ONNX_FILE, "openvino": "model.xml"}
"""The model file of an export, by format (OpenVINO's weights are beside it, in model.bin)."""
EXPORT_METADATA = "peftkit_export.json"
# the closed sets of --format and --quantize, defined with the settings
FORMATS = EXPORT_FORMATS  # gguf: peftkit.gguf_export, openvino: peftkit.openvino_export
QUANTIZATIONS = EXPORT_QUANTIZATIONS
DEFAULT_OPSET = 18
# torch's dynamo exporter writes opset 18 and newer; older opsets go through a converter that
# fails on the ops transformers' attention uses. 23: the newest ONNX Runtime 1.32 runs.
OPSETS = range(18, 24)
FP32_TOLERANCE = 1e-4
"""Largest difference in any probability between ONNX Runtime (fp32) and PyTorch: float32 kernels
in another order differ by ~1e-7; 1e-4 catches a wrong graph while allowing any kernel order."""
FP32_CHECK_EXAMPLES = 64
"""Examples the fp32 export is checked on (int8: every example of the check data, up to
``MAX_CHECK_EXAMPLES``): fp32 either computes the same function or is plainly wrong."""
MAX_CHECK_EXAMPLES = 5000
BATCH = 64
EXPORT_EXTRA = "pip install 'peftkit[export]' (install.sh installs it)"

Echo = Callable[[str], None]


@dataclass
class ExportResult:
    """What ``peftkit export`` wrote and what its check measured."""

    output_dir: str
    format: str
    strategy: str
    base_model: str
    merged: bool
    """The strategy's weights were folded into the base (no adapter modules in the graph)."""
    quantize: str | None
    opset: int
    onnx_bytes: int
    check: dict[str, Any] = field(default_factory=dict)
    """``checked_on`` (words), ``examples``; fp32: ``max_abs_diff``; int8: ``agreement``,
    ``agreed``; with labels: ``accuracy_pytorch`` and ``accuracy_onnx``."""
    seconds: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    """What was written in ``output_dir`` besides peftkit_export.json, the model first (GGUF)."""
    usage: str = ""
    """A command line that serves the export, where one is worth printing (llama.cpp's, for GGUF)."""
    model_file: str | None = None
    """The model's file in ``output_dir`` (None: ``model.FORMAT``); ``onnx_bytes`` is its size
    (OpenVINO: model.xml with its weights, model.bin)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_onnx() -> None:
    """Refuse in one line, before anything loads, where the export libraries are not installed."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise PeftkitError(f"ONNX export needs {', '.join(missing)}, which is not installed: {EXPORT_EXTRA}")


def check_export_settings(
    fmt: str,
    quantize: str | None,
    opset: int | None,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
) -> None:
    """Refuse a format, quantization, opset or int8 gate the exporter does not take, naming what it
    does. ``opset`` None: the default."""
    if fmt not in FORMATS:
        raise PeftkitError(f"--format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    if fmt == "gguf":
        given = [
            flag
            for flag, value in (
                ("--quantize", quantize),
                ("--opset", opset),
                ("--min-agreement", min_agreement),
                ("--max-accuracy-drop", max_accuracy_drop),
            )
            if value is not None
        ]
        if given:
            raise PeftkitError(
                f"{', '.join(given)}: for --format onnx or openvino only (a GGUF file is written in "
                "float32; quantize it with llama.cpp's llama-quantize)"
            )
        return
    if fmt == "openvino" and opset is not None:
        raise PeftkitError(
            "--opset: for --format onnx only (OpenVINO IR has no opset; its graph goes through ONNX "
            f"opset {DEFAULT_OPSET})"
        )
    opset = DEFAULT_OPSET if opset is None else opset
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise PeftkitError(f"--quantize {quantize!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise PeftkitError(f"--opset {opset!r} is not supported; accepted: {OPSETS.start} to {OPSETS.stop - 1}")
    check_gate_settings(quantize, min_agreement, max_accuracy_drop)


def probabilities_module(strategy: Any, model: Any, input_names: list[str]) -> Any:
    """The module that is exported: the strategy's forward on ``model``, then a softmax, so the
    graph's one output is what ``predict`` reports (``probabilities``, batch x labels). It takes
    the tensors named ``input_names`` by position (the names vary with the model: token type ids)."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            batch = dict(zip(input_names, inputs))
            return torch.softmax(strategy.forward(self.model, batch).float(), dim=-1)

    return Probabilities().eval()


@dataclass
class CheckData:
    """The examples an export is checked on: their inputs, labels where known, and in words."""

    inputs: list[Any]
    labels: list[int] | None
    described: str


def check_data(
    task: Any, metadata: dict[str, Any], dataset: str | None, text_column: str | None, label_column: str | None
) -> CheckData:
    """The test split the adapter was evaluated on (its recorded dataset, split with its recorded
    seed), or every example of ``dataset``, its labels matched to the adapter's. At most
    ``MAX_CHECK_EXAMPLES``."""
    seed = int((metadata.get("split") or {}).get("seed") or 0)
    recorded = metadata.get("dataset")
    source = dataset or recorded
    if not source:
        raise PeftkitError(
            "the adapter records no dataset to check the export on; give --dataset FILE (labelled "
            "examples of the kind it was trained on)"
        )
    cfg = data_config(task, metadata, source, text_column, label_column)
    if dataset is None:
        try:
            split = task.load_data(cfg).splits["test"]
        except PeftkitError as exc:
            raise PeftkitError(
                f"cannot load the adapter's dataset {recorded!r} to check the export on ({exc}); give --dataset FILE"
            ) from None
        described = f"the test split of {recorded!r} (seed {seed})"
    else:
        split = task.evaluation_data(cfg, metadata).splits["test"]
        described = f"{dataset!r}"
    n = min(len(split), MAX_CHECK_EXAMPLES)
    if n == 0:
        raise PeftkitError(f"{described} has no examples to check the export on; give --dataset FILE")
    split = split.select(range(n))
    labels = [int(x) for x in split["label"]] if "label" in split.column_names else None
    return CheckData(list(split[task.input_field]), labels, described)


def data_config(
    task: Any, metadata: dict[str, Any], source: str, text_column: str | None, label_column: str | None
) -> RunConfig:
    """The config that loads ``source`` as the adapter's run loaded its data: its task, base,
    maximum length and split seed (``task.load_data(cfg).splits``: train, validation, test)."""
    return RunConfig(
        strategy=metadata["strategy"],
        task=task.name,
        model=metadata.get("base_model"),
        dataset=source,
        text_column=text_column,
        label_column=label_column,
        seed=int((metadata.get("split") or {}).get("seed") or 0),
        max_length=metadata.get("max_length") or task.default_max_length,
    )


def batches(task: Any, processor: Any, metadata: dict[str, Any], inputs: list[Any]) -> Any:
    for start in range(0, len(inputs), BATCH):
        yield task.serving_batch(processor, metadata, inputs[start : start + BATCH])


def _onnx_feed(session: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """A model batch as ONNX Runtime takes it: numpy arrays, only the inputs the graph has."""
    names = {i.name for i in session.get_inputs()}
    return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items() if k in names}


def _session(path: str, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(session: Any, task: Any, processor: Any, metadata: dict[str, Any], inputs: list[Any]) -> Any:
    """Label probabilities (numpy, examples x labels) of an ONNX Runtime ``session`` for ``inputs``."""
    import numpy as np

    return np.concatenate(
        [session.run(None, _onnx_feed(session, b))[0] for b in batches(task, processor, metadata, inputs)]
    )


def export_onnx(
    adapter_dir: str,
    output: str,
    model: str | None = None,
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    dataset: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    min_agreement: float | None = None,
    max_accuracy_drop: float | None = None,
    echo: Echo = lambda _: None,
) -> ExportResult:
    """Export the adapter in ``adapter_dir`` (on its base, or ``model``) to ONNX in the directory
    ``output``, checked against PyTorch on ``dataset`` (default: the adapter's own test split);
    see the module's docstring. int8 is gated by ``int8_gate`` (``max_accuracy_drop``,
    ``min_agreement``). Refused in one line: a task that is not a classifier, missing libraries,
    an existing ``output`` (unless ``overwrite``), a failed check (nothing written)."""

    gate = (max_accuracy_drop, min_agreement)
    task = _refusals(adapter_dir, output, overwrite, quantize, opset, gate)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    echo(f"loading adapter {adapter_dir!r} ...")
    loaded = load_adapter(adapter_dir, model, force=force)
    meta, strategy = loaded.metadata, loaded.strategy
    data = check_data(task, meta, dataset, text_column, label_column)
    fp32_inputs = data.inputs[:FP32_CHECK_EXAMPLES]
    checked = data.inputs if quantize else fp32_inputs
    echo(f"checking on {len(checked):,} examples of {data.described}: PyTorch's answers ...")
    reference = pytorch_probabilities(task, loaded, checked)
    seconds["load_and_reference"] = time.perf_counter() - clock

    clock = time.perf_counter()
    serving, sample, module = serving_module(task, loaded, fp32_inputs, f"ONNX opset {opset}", echo)
    merged = strategy.merges
    with staged_dir(output, overwrite, flag="--output") as stage:
        path = os.path.join(stage, ONNX_FILE)
        export_graph(module, sample, task.serving_axes, opset, path)
        seconds["export"] = time.perf_counter() - clock

        clock = time.perf_counter()
        check = _check_fp32(path, task, loaded, data, reference, echo)
        if quantize:
            check.update(_check_int8(path, task, loaded, data, reference, gate, echo))
            echo_int8(check, "onnx", check["int8_graph"], echo)
        seconds["check"] = time.perf_counter() - clock
        size = os.path.getsize(path)
        record = export_record("onnx", adapter_dir, opset, quantize, task, loaded, merged, list(sample), check)
        write_beside(stage, loaded, serving, record)
    return ExportResult(
        output, "onnx", meta["strategy"], meta["base_model"], merged, quantize, opset, size, check, seconds
    )


def serving_module(task: Any, loaded: Any, inputs: list[Any], target: str, echo: Echo) -> tuple[Any, Any, Any]:
    """The strategy's serving model, a sample batch of two of ``inputs`` (the exporter's example
    inputs) and the module the graph is exported from (ending in the label probabilities), said
    to be exported to ``target`` (words: "ONNX opset 18")."""
    strategy, meta = loaded.strategy, loaded.metadata
    serving = strategy.serving_model(loaded.model)
    sample = task.serving_batch(loaded.tokenizer, meta, inputs[:2] if len(inputs) > 1 else inputs * 2)
    echo(
        f"exporting {meta['strategy']} ({'merged into the base' if strategy.merges else 'its modules in the graph'}) "
        f"to {target} ..."
    )
    return serving, sample, probabilities_module(strategy, serving, list(sample))


def _refusals(
    adapter_dir: str,
    output: str,
    overwrite: bool,
    quantize: str | None,
    opset: int,
    gate: tuple[float | None, float | None],
) -> Any:
    """What ``export_onnx`` refuses before loading anything (the settings, missing libraries, an
    existing ``output``, a task that is no classifier); returns the adapter's task."""
    check_export_settings("onnx", quantize, opset, gate[1], gate[0])
    require_onnx()
    check_output_dir(output, overwrite, flag="--output")
    return classifier_task(adapter_dir, "onnx")


def classifier_task(adapter_dir: str, fmt: str) -> Any:
    """The task of the adapter in ``adapter_dir``, read from its metadata; refused in one line
    where it is no classifier (one forward pass to label probabilities), which ``fmt`` needs."""
    task = adapter_task(adapter_dir)
    if not task.exports_onnx:
        hint = ": use --format gguf" if task.generates else ""
        raise PeftkitError(f"--format {fmt} exports classifiers; this adapter is a {task.name} adapter{hint}")
    return task


def write_beside(stage: str, loaded: Any, serving: Any, record: dict[str, Any]) -> None:
    """Beside the graph in ``stage``: the processor, the model config and ``peftkit_export.json``."""
    processor = getattr(loaded.tokenizer, "processor", loaded.tokenizer)
    processor.save_pretrained(stage)
    _model_config(serving).save_pretrained(stage)  # an image processor reads its channels from it
    with open(os.path.join(stage, EXPORT_METADATA), "w") as f:
        json.dump(record, f, indent=2)


def pytorch_probabilities(task: Any, loaded: Any, inputs: list[Any]) -> Any:
    """PyTorch's label probabilities (numpy, examples x labels) for ``inputs``: what the export is
    checked against."""
    import numpy as np

    return np.concatenate(
        [loaded.probabilities(b).numpy() for b in batches(task, loaded.tokenizer, loaded.metadata, inputs)]
    )


def export_record(
    fmt: str,
    adapter_dir: str,
    opset: int,
    quantize: str | None,
    task: Any,
    loaded: Any,
    merged: bool,
    inputs: list[str],
    check: dict[str, Any],
) -> dict[str, Any]:
    """What ``peftkit_export.json`` says of an export in format ``fmt``: the adapter and base it
    came from, its inputs, what was checked and the versions."""
    meta = loaded.metadata
    return {
        "format": fmt,
        "opset": opset,
        "quantize": quantize,
        "task": task.name,
        "strategy": meta["strategy"],
        "merged": merged,
        "base_model": meta["base_model"],
        "base_fingerprint": meta.get("base_fingerprint"),
        "label_names": loaded.label_names,
        "max_length": meta.get("max_length"),
        "inputs": inputs,
        "output": "probabilities",
        "adapter": os.path.abspath(adapter_dir),
        "check": check,
        "versions": export_versions(),
    }


def _check_fp32(path: str, task: Any, loaded: Any, data: CheckData, reference: Any, echo: Echo) -> dict[str, Any]:
    """The fp32 graph at ``path`` against PyTorch's ``reference`` on the first
    ``FP32_CHECK_EXAMPLES`` check examples: what was checked (the export's ``check`` record), or
    refused (nothing written) where a probability differs by more than ``FP32_TOLERANCE``."""
    diff = _fp32_difference(path, task, loaded, data.inputs[:FP32_CHECK_EXAMPLES], reference)
    return fp32_verdict(diff, data, echo)


def fp32_verdict(diff: float, data: CheckData, echo: Echo, runtime: str = "") -> dict[str, Any]:
    """The fp32 check of every export format, from ``diff``, the largest difference in any
    probability from PyTorch's on the first ``FP32_CHECK_EXAMPLES`` of ``data``: what was checked
    (the export's ``check`` record), or refused (nothing written) above ``FP32_TOLERANCE``.
    ``runtime``: words after "fp32 check" (how it was run)."""
    n = min(len(data.inputs), FP32_CHECK_EXAMPLES)
    if not diff <= FP32_TOLERANCE:  # a NaN fails too
        raise PeftkitError(
            f"the exported model differs from PyTorch by up to {diff:.2e} in a probability "
            f"(allowed {FP32_TOLERANCE:g}) on {n} examples; nothing was written"
        )
    echo(
        f"fp32 check{runtime}: max abs difference {diff:.1e} from PyTorch on {n} examples (allowed {FP32_TOLERANCE:g})"
    )
    return {"checked_on": data.described, "fp32_examples": n, "max_abs_diff": diff, "fp32_tolerance": FP32_TOLERANCE}


def _fp32_difference(path: str, task: Any, loaded: Any, inputs: list[Any], reference: Any) -> float:
    """The largest difference in any probability between the graph at ``path`` (ONNX Runtime) and
    PyTorch's ``reference`` (whose first rows are ``inputs``' probabilities); NaN where one is NaN."""
    import numpy as np

    got = onnx_probabilities(_session(path), task, loaded.tokenizer, loaded.metadata, inputs)
    return float(np.abs(got - reference[: len(inputs)]).max())


def _check_int8(
    path: str,
    task: Any,
    loaded: Any,
    data: CheckData,
    reference: Any,
    gate: tuple[float | None, float | None],
    echo: Echo,
) -> dict[str, Any]:
    """Quantize the fp32 file at ``path`` in place and check it against PyTorch on every check
    example with ``int8_gate`` (``gate``: its ``max_accuracy_drop`` and ``min_agreement``).
    What is quantized is the fastest of ``int8_sources`` that still gives PyTorch's probabilities
    within ``FP32_TOLERANCE`` on the fp32 check examples."""

    fp32_inputs = data.inputs[:FP32_CHECK_EXAMPLES]
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as work:
        tried = []
        for graph, source in int8_sources(path, work):
            try:
                diff = _fp32_difference(source, task, loaded, fp32_inputs, reference)
            except Exception:  # noqa: BLE001 - a fused graph ONNX Runtime refuses is not used
                tried.append(f"{graph}: ONNX Runtime refused it")
                continue
            if diff <= FP32_TOLERANCE:
                break
            tried.append(f"{graph}: differs by {diff:.1e}")
        else:  # ONNX Runtime's own optimizer changed the function: quantize the checked export itself
            graph, source = "the export, unfused", path
        if tried:
            echo(f"int8: faster graphs were not used, as they did not match PyTorch ({'; '.join(tried)})")
        quantized = os.path.join(work, "int8.onnx")
        quantize_int8(source, quantized)
        os.replace(quantized, path)
    got = onnx_probabilities(_session(path), task, loaded.tokenizer, loaded.metadata, data.inputs)
    return int8_gate(got, reference, data.labels, *gate, "onnx") | {"int8_graph": graph}


def _model_config(module: Any) -> Any:
    """The transformers config of ``module`` or of the first of its submodules that has one (a
    pooled head holds its backbone, whose config it is)."""
    from transformers import PretrainedConfig

    for sub in module.modules():
        if isinstance(getattr(sub, "config", None), PretrainedConfig):
            return sub.config
    raise PeftkitError("the model to export has no transformers config")  # every loaded base has one


def export_versions() -> dict[str, str]:
    """The version table of an export or a serving figure: ``package_versions()`` and the ONNX
    libraries."""
    onnx = {k: v for k, v in package_versions(("onnx", "onnxscript", "onnxruntime")).items() if k != "python"}
    return package_versions() | onnx


# -- serving an export: peftkit predict --onnx ------------------------------------------------------
@dataclass
class OnnxModel:
    """An exported model loaded into ONNX Runtime; answers ``Task.predict`` as an adapter on its
    base does (``label_names``, ``metadata``, ``tokenizer``, ``probabilities``)."""

    session: Any
    tokenizer: Any  # the task's processor, as on a LoadedAdapter
    metadata: dict[str, Any]
    task: Any

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata["label_names"])

    def probabilities(self, batch: dict[str, Any]) -> Any:
        return self.session.run(None, _onnx_feed(self.session, batch))[0]


def read_export_metadata(directory: str, fmt: str = "onnx") -> dict[str, Any]:
    """``peftkit_export.json`` of an export directory in format ``fmt`` (onnx, openvino: what
    ``predict --onnx`` / ``--openvino`` was given); refused in one line if it is not one, naming
    the flag that serves an export of the other format."""
    path, flag, model_file = os.path.join(directory, EXPORT_METADATA), f"--{fmt}", MODEL_FILES[fmt]
    if not os.path.isdir(directory):
        raise PeftkitError(f"{flag} {directory!r} is not a directory (give what peftkit export --output wrote)")
    if not os.path.isfile(path):
        raise PeftkitError(
            f"{flag} {directory!r} holds no peftkit export ({EXPORT_METADATA} and {model_file}); "
            "give what peftkit export --output wrote"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise PeftkitError(f"cannot read {path!r}: {first_line(exc)}") from None
    if not isinstance(meta, dict) or "label_names" not in meta:
        raise PeftkitError(f"{path!r} is not a peftkit export's metadata (no label_names)")
    written = meta.get("format") or "onnx"  # the first exports were all ONNX
    if written != fmt:
        served = f"serve it with --{written}" if written in MODEL_FILES else "predict serves onnx and openvino"
        raise PeftkitError(f"{flag} {directory!r} holds a {written} export; {served}")
    if not os.path.isfile(os.path.join(directory, model_file)):
        raise PeftkitError(f"{flag} {directory!r} holds no {model_file}; give what peftkit export --output wrote")
    return meta


def load_onnx(directory: str, threads: int | None = None) -> OnnxModel:
    """The export in ``directory`` (``peftkit export --output``) in an ONNX Runtime session on
    the CPU, with its processor, ready for ``Task.predict``."""
    require_onnx()
    meta = read_export_metadata(directory)
    task = get_task(meta.get("task") or "sequence-classification")
    processor = task.load_processor(directory)
    return OnnxModel(_session(os.path.join(directory, ONNX_FILE), threads), processor, meta, task)
