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
   quantization) the same label on at least ``INT8_AGREEMENT`` of the examples.

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
from .inference import adapter_task, load_adapter
from .onnx_graph import export_graph, int8_sources, quantize_int8
from .rundir import check_output_dir, staged_dir
from .settings import EXPORT_FORMATS, EXPORT_QUANTIZATIONS
from .tasks import get_task

ONNX_FILE = "model.onnx"
EXPORT_METADATA = "peftkit_export.json"
# the closed sets of --format and --quantize, defined with the settings
FORMATS = EXPORT_FORMATS  # gguf: peftkit.gguf_export
QUANTIZATIONS = EXPORT_QUANTIZATIONS
DEFAULT_OPSET = 18
# torch's dynamo exporter writes opset 18 and newer; older opsets go through a converter that
# fails on the ops transformers' attention uses. 23: the newest ONNX Runtime 1.32 runs.
OPSETS = range(18, 24)
FP32_TOLERANCE = 1e-4
"""Largest difference in any probability between ONNX Runtime (fp32) and PyTorch: float32 kernels
in another order differ by ~1e-7; 1e-4 catches a wrong graph while allowing any kernel order."""
INT8_AGREEMENT = 0.99
"""Share of the checked examples on which the int8 model must give PyTorch's label."""
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_onnx() -> None:
    """Refuse in one line, before anything loads, where the export libraries are not installed."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise PeftkitError(f"ONNX export needs {', '.join(missing)}, which is not installed: {EXPORT_EXTRA}")


def check_export_settings(
    fmt: str, quantize: str | None, opset: int | None, min_agreement: float | None = None
) -> None:
    """Refuse a format, quantization, opset or agreement the exporter does not take, naming what it
    does. ``opset`` None: the default."""
    if fmt not in FORMATS:
        raise PeftkitError(f"--format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
    if fmt != "onnx":
        given = [
            flag
            for flag, value in (("--quantize", quantize), ("--opset", opset), ("--min-agreement", min_agreement))
            if value is not None
        ]
        if given:
            raise PeftkitError(
                f"{', '.join(given)}: for --format onnx only (a GGUF file is written in float32; "
                "quantize it with llama.cpp's llama-quantize)"
            )
        return
    opset = DEFAULT_OPSET if opset is None else opset
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise PeftkitError(f"--quantize {quantize!r} is not supported for ONNX; supported: {', '.join(QUANTIZATIONS)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise PeftkitError(f"--opset {opset!r} is not supported; accepted: {OPSETS.start} to {OPSETS.stop - 1}")
    if min_agreement is not None:
        if quantize is None:
            raise PeftkitError("--min-agreement applies to --quantize int8 (an fp32 export must match PyTorch)")
        if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0 < min_agreement <= 1:
            raise PeftkitError(f"--min-agreement {min_agreement!r} is not a fraction; give one in (0, 1], e.g. 0.98")


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
    cfg = RunConfig(
        strategy=metadata["strategy"],
        task=task.name,
        model=metadata.get("base_model"),
        dataset=source,
        text_column=text_column,
        label_column=label_column,
        seed=seed,
        max_length=metadata.get("max_length") or task.default_max_length,
    )
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


def _batches(task: Any, processor: Any, metadata: dict[str, Any], inputs: list[Any]) -> Any:
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
        [session.run(None, _onnx_feed(session, b))[0] for b in _batches(task, processor, metadata, inputs)]
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
    echo: Echo = lambda _: None,
) -> ExportResult:
    """Export the adapter in ``adapter_dir`` (on its base, or ``model``) to ONNX in the directory
    ``output``, checked against PyTorch on ``dataset`` (default: the adapter's own test split);
    see the module's docstring. ``min_agreement``: the share of examples on which int8 must give
    PyTorch's label (default ``INT8_AGREEMENT``). Refused in one line: a task that is not a
    classifier, missing libraries, an existing ``output`` (unless ``overwrite``), a failed check
    (nothing written)."""

    task, required = _refusals(adapter_dir, output, overwrite, quantize, opset, min_agreement)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    echo(f"loading adapter {adapter_dir!r} ...")
    loaded = load_adapter(adapter_dir, model, force=force)
    meta, strategy = loaded.metadata, loaded.strategy
    data = check_data(task, meta, dataset, text_column, label_column)
    fp32_inputs = data.inputs[:FP32_CHECK_EXAMPLES]
    checked = data.inputs if quantize else fp32_inputs
    echo(f"checking on {len(checked):,} examples of {data.described}: PyTorch's answers ...")
    reference = _pytorch_probabilities(task, loaded, checked)
    seconds["load_and_reference"] = time.perf_counter() - clock

    clock = time.perf_counter()
    serving, sample, module = _serving_module(task, loaded, fp32_inputs, opset, echo)
    merged = strategy.merges
    with staged_dir(output, overwrite, flag="--output") as stage:
        path = os.path.join(stage, ONNX_FILE)
        export_graph(module, sample, task.serving_axes, opset, path)
        seconds["export"] = time.perf_counter() - clock

        clock = time.perf_counter()
        check = _check_fp32(path, task, loaded, data, reference, echo)
        if quantize:
            check.update(_check_int8(path, task, loaded, data, reference, required, echo))
            _echo_int8(check, required, echo)
        seconds["check"] = time.perf_counter() - clock
        size = os.path.getsize(path)
        record = _export_record(adapter_dir, opset, quantize, task, loaded, merged, list(sample), check)
        _write_beside(stage, loaded, serving, record)
    return ExportResult(
        output, "onnx", meta["strategy"], meta["base_model"], merged, quantize, opset, size, check, seconds
    )


def _serving_module(task: Any, loaded: Any, inputs: list[Any], opset: int, echo: Echo) -> tuple[Any, Any, Any]:
    """The strategy's serving model, a sample batch of two of ``inputs`` (the exporter's example
    inputs) and the module the graph is exported from (ending in the label probabilities)."""
    strategy, meta = loaded.strategy, loaded.metadata
    serving = strategy.serving_model(loaded.model)
    sample = task.serving_batch(loaded.tokenizer, meta, inputs[:2] if len(inputs) > 1 else inputs * 2)
    echo(
        f"exporting {meta['strategy']} ({'merged into the base' if strategy.merges else 'its modules in the graph'}) "
        f"to ONNX opset {opset} ..."
    )
    return serving, sample, probabilities_module(strategy, serving, list(sample))


def _refusals(
    adapter_dir: str, output: str, overwrite: bool, quantize: str | None, opset: int, min_agreement: float | None
) -> tuple[Any, float]:
    """What ``export_onnx`` refuses before loading anything (the settings, missing libraries, an
    existing ``output``, a task that is no classifier); returns the adapter's task and the int8
    agreement required."""
    check_export_settings("onnx", quantize, opset, min_agreement)
    required = INT8_AGREEMENT if min_agreement is None else float(min_agreement)
    require_onnx()
    check_output_dir(output, overwrite, flag="--output")
    task = adapter_task(adapter_dir)
    if not task.exports_onnx:
        hint = ": use --format gguf" if task.generates else ""
        raise PeftkitError(f"--format onnx exports classifiers; this adapter is a {task.name} adapter{hint}")
    return task, required


def _write_beside(stage: str, loaded: Any, serving: Any, record: dict[str, Any]) -> None:
    """Beside the graph in ``stage``: the processor, the model config and ``peftkit_export.json``."""
    processor = getattr(loaded.tokenizer, "processor", loaded.tokenizer)
    processor.save_pretrained(stage)
    _model_config(serving).save_pretrained(stage)  # an image processor reads its channels from it
    with open(os.path.join(stage, EXPORT_METADATA), "w") as f:
        json.dump(record, f, indent=2)


def _pytorch_probabilities(task: Any, loaded: Any, inputs: list[Any]) -> Any:
    """PyTorch's label probabilities (numpy, examples x labels) for ``inputs``: what the export is
    checked against."""
    import numpy as np

    return np.concatenate(
        [loaded.probabilities(b).numpy() for b in _batches(task, loaded.tokenizer, loaded.metadata, inputs)]
    )


def _export_record(
    adapter_dir: str,
    opset: int,
    quantize: str | None,
    task: Any,
    loaded: Any,
    merged: bool,
    inputs: list[str],
    check: dict[str, Any],
) -> dict[str, Any]:
    """What ``peftkit_export.json`` says of an export: its format, the adapter and base it came
    from, its inputs, what was checked and the versions."""
    meta = loaded.metadata
    return {
        "format": "onnx",
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
    fp32_inputs = data.inputs[:FP32_CHECK_EXAMPLES]
    diff = _fp32_difference(path, task, loaded, fp32_inputs, reference)
    check: dict[str, Any] = {
        "checked_on": data.described,
        "fp32_examples": len(fp32_inputs),
        "max_abs_diff": diff,
        "fp32_tolerance": FP32_TOLERANCE,
    }
    if not diff <= FP32_TOLERANCE:  # a NaN fails too
        raise PeftkitError(
            f"the exported model differs from PyTorch by up to {diff:.2e} in a probability "
            f"(allowed {FP32_TOLERANCE:g}) on {len(fp32_inputs)} examples; nothing was written"
        )
    echo(
        f"fp32 check: max abs difference {diff:.1e} from PyTorch on {len(fp32_inputs)} examples "
        f"(allowed {FP32_TOLERANCE:g})"
    )
    return check


def _echo_int8(check: dict[str, Any], required: float, echo: Echo) -> None:
    """The int8 check's line: the graph quantized, the agreement with PyTorch, and accuracy where known."""
    echo(
        f"int8 check ({check['int8_graph']}): the same label as PyTorch on {check['agreed']:,} of "
        f"{check['examples']:,} examples ({check['agreement']:.2%}; required {required:.1%})"
        + (
            f"; accuracy {check['accuracy_onnx']:.4f} vs {check['accuracy_pytorch']:.4f} in PyTorch"
            if "accuracy_onnx" in check
            else ""
        )
    )


def _fp32_difference(path: str, task: Any, loaded: Any, inputs: list[Any], reference: Any) -> float:
    """The largest difference in any probability between the graph at ``path`` (ONNX Runtime) and
    PyTorch's ``reference`` (whose first rows are ``inputs``' probabilities); NaN where one is NaN."""
    import numpy as np

    got = onnx_probabilities(_session(path), task, loaded.tokenizer, loaded.metadata, inputs)
    return float(np.abs(got - reference[: len(inputs)]).max())


def _check_int8(
    path: str, task: Any, loaded: Any, data: CheckData, reference: Any, required: float, echo: Echo
) -> dict[str, Any]:
    """Quantize the fp32 file at ``path`` in place and compare its labels with PyTorch's on every
    check example; refuse (nothing written) where they agree on less than ``required`` of them.
    What is quantized is the fastest of ``int8_sources`` that still gives PyTorch's probabilities
    within ``FP32_TOLERANCE`` on the fp32 check examples."""
    import numpy as np

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
    same = got.argmax(-1) == reference.argmax(-1)
    out: dict[str, Any] = {
        "examples": len(same),
        "agreed": int(same.sum()),
        "agreement": float(same.mean()),
        "int8_required": required,
        "int8_max_abs_diff": float(np.abs(got - reference).max()),
        "int8_graph": graph,
    }
    if data.labels is not None:
        labels = np.asarray(data.labels)
        out["accuracy_pytorch"] = float((reference.argmax(-1) == labels).mean())
        out["accuracy_onnx"] = float((got.argmax(-1) == labels).mean())
    if out["agreement"] < required:
        accuracy = (
            f"; accuracy {out['accuracy_onnx']:.4f} vs {out['accuracy_pytorch']:.4f} in PyTorch"
            if "accuracy_onnx" in out
            else ""
        )
        raise PeftkitError(
            f"the int8 model gives PyTorch's label on {out['agreed']:,} of {out['examples']:,} examples "
            f"({out['agreement']:.2%}), under the required {required:.1%}{accuracy}; nothing was "
            "written (export without --quantize for the fp32 model, or accept less with "
            "--min-agreement)"
        )
    return out


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


def read_export_metadata(directory: str) -> dict[str, Any]:
    """``peftkit_export.json`` of an export directory; refused in one line if it is not one."""
    path = os.path.join(directory, EXPORT_METADATA)
    if not os.path.isdir(directory):
        raise PeftkitError(f"--onnx {directory!r} is not a directory (give what peftkit export --output wrote)")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, ONNX_FILE)):
        raise PeftkitError(
            f"--onnx {directory!r} holds no peftkit export ({EXPORT_METADATA} and {ONNX_FILE}); "
            "give what peftkit export --output wrote"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise PeftkitError(f"cannot read {path!r}: {first_line(exc)}") from None
    if not isinstance(meta, dict) or "label_names" not in meta:
        raise PeftkitError(f"{path!r} is not a peftkit export's metadata (no label_names)")
    return meta


def load_onnx(directory: str, threads: int | None = None) -> OnnxModel:
    """The export in ``directory`` (``peftkit export --output``) in an ONNX Runtime session on
    the CPU, with its processor, ready for ``Task.predict``."""
    require_onnx()
    meta = read_export_metadata(directory)
    task = get_task(meta.get("task") or "sequence-classification")
    processor = task.load_processor(directory)
    return OnnxModel(_session(os.path.join(directory, ONNX_FILE), threads), processor, meta, task)
