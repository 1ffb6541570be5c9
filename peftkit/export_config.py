"""What ``peftkit merge`` and ``peftkit export`` were asked (a field per flag): ``api.merge`` takes a
``MergeConfig``, ``api.export`` an ``ExportConfig``, as ``api.predict`` takes a ``PredictConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PeftkitError
from .settings import setting


@dataclass
class MergeConfig:
    """Merge an adapter (``adapter``: an adapter directory, or a run directory: its ``adapter/``) into
    its base (``model`` instead of the one its metadata names; from Python also a loaded model, as
    ``RunConfig.model`` takes one) and write a plain transformers model directory to ``output``."""

    adapter: str = setting("merge:adapter")
    output: str = setting("output")
    model: str | object | None = setting("base_model")
    force: bool = setting("force")
    overwrite: bool = setting("overwrite")


@dataclass
class ExportConfig:
    """Export an adapter on its base (``model`` overrides the base; from Python also a loaded model,
    as ``RunConfig.model`` takes one) as a model that serves without
    PyTorch, into the directory ``output``: ``format`` "onnx" (``model.onnx``, the tokenizer or image
    processor, ``peftkit_export.json``), "openvino" (the same as OpenVINO IR, ``model.xml``; see
    ``peftkit.openvino_export``) or "gguf", for a causal-lm adapter on a Llama-architecture
    base (``model.gguf``, merged, float32; see ``peftkit.gguf_export``; ``lora_only``: a lora
    adapter alone as llama.cpp's LoRA file ``lora.gguf`` beside ``base.gguf``, ``peftkit.gguf_lora``;
    ``gguf_pre``: the tokenizer's llama.cpp pre-tokenizer name where it is not recognised). Merged
    where the strategy merges (lora, full, gradual_unfreeze), its own modules in the graph
    otherwise. ``quantize`` "int8": ONNX Runtime's dynamic quantization (openvino: NNCF's,
    calibrated on the adapter's validation split). ``opset``: the ONNX opset (default 18; onnx only).

    Checked before anything is written, on the adapter's own test split (or every example of
    ``dataset``, read with ``text_column`` / ``label_column``): fp32 probabilities within 1e-4 of
    PyTorch's; int8 an accuracy at most 0.5 points below PyTorch's (``max_accuracy_drop``; without
    labels, the agreement that bounds it), and PyTorch's label on ``min_agreement`` of the
    examples where given; a GGUF file by llama.cpp itself (``xllamacpp``; else transformers' GGUF
    reader): prompt token ids and greedy tokens the same as PyTorch's, no llama.cpp warning."""

    adapter: str = setting("export:adapter")
    output: str = setting("export:output")
    format: str = setting("export:format")
    model: str | object | None = setting("base_model")
    quantize: str | None = setting("export:quantize")
    opset: int | None = setting("export:opset")
    dataset: str | None = setting("export:dataset")
    text_column: str | None = setting("text_column")
    label_column: str | None = setting("label_column")
    min_agreement: float | None = setting("export:min_agreement")
    max_accuracy_drop: float | None = setting("export:max_accuracy_drop")
    force: bool = setting("force")
    overwrite: bool = setting("overwrite")
    gguf_pre: str | None = setting("export:gguf_pre")
    lora_only: bool = setting("export:lora_only")

    def validate(self) -> None:
        """Refuse the check data's settings for a GGUF export and the GGUF settings for another
        format (the format, quantization, opset and agreement are checked by
        ``exporter.check_export_settings``)."""
        gguf_only = [flag for flag, value in (("--gguf-pre", self.gguf_pre), ("--lora-only", self.lora_only)) if value]
        if self.format != "gguf" and gguf_only:
            raise PeftkitError(
                f"{', '.join(gguf_only)}: for --format gguf only (llama.cpp's tokenizer name and LoRA file)"
            )
        if self.format == "gguf" and (
            self.dataset is not None or self.text_column is not None or self.label_column is not None
        ):
            raise PeftkitError(
                "--dataset, --text-column, --label-column: for --format onnx or openvino only (a GGUF export is "
                "checked on greedy generations of fixed prompts)"
            )
