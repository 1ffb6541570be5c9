"""Whether the Hugging Face hub can be reached, and what of it this machine has cached.

Offline, ``from_pretrained`` and ``load_dataset`` retry a hub they cannot reach for half a minute
or more, printing a line per retry, before failing. Asked first, the answer takes milliseconds:
``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) set, or no TCP
connection to the hub (or the HTTPS proxy) within ``PROBE_TIMEOUT_S``. Once the hub is known to be
out of reach the libraries are switched to offline mode (``use_offline_mode``), so that what the
cache holds is used without a single request.

Only the standard library at import; ``huggingface_hub.constants`` (milliseconds) when the cache's
location is needed.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import sys
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
"""How long a connection to the hub may take before it counts as unreachable."""
_TRUE = ("1", "ON", "YES", "TRUE")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
# what the hub accepts as a repository id: [namespace/]name, letters, digits, '-', '_', '.'
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def offline_requested() -> str | None:
    """The variable that asks for offline mode (``HF_HUB_OFFLINE=1``, ...), or None."""
    return next((v for v in _OFFLINE_VARIABLES if os.environ.get(v, "").upper() in _TRUE), None)


def _endpoint() -> tuple[str, int]:
    """Host and port a hub request connects to first: the HTTPS proxy if one is set, else the hub."""
    proxy = next((os.environ[v] for v in _PROXY_VARIABLES if os.environ.get(v)), None)
    if proxy:
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    else:
        url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """Why a TCP connection to the hub fails (None: it succeeds). Once per process: the answer
    does not change within a command."""
    host, port = _endpoint()
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:  # no DNS, refused, unreachable, timed out
        return f"no connection to {host}:{port}"
    return None


def unreachable_reason() -> str | None:
    """Why the hub cannot be used now ("HF_HUB_OFFLINE is set", "no connection to
    huggingface.co:443"), or None when it can."""
    variable = offline_requested()
    return f"{variable} is set" if variable else _probe()


def use_offline_mode() -> None:
    """Make transformers, datasets and huggingface_hub use only their caches, without a request:
    for this process and the processes it starts (a bench's workers)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    # the libraries read the variable at import; those already imported are told directly
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


def is_repo_id(name: str) -> bool:
    """Whether ``name`` is spelled as a hub repository id can be (``owner/name`` or ``name``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".")


def looks_like_path(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a local path rather than a hub id: it starts with ``.``, ``/``
    or ``~``, is no valid hub id (``a/b/c``, a backslash), ends with one of ``suffixes`` (``.csv``),
    or its first component exists here (``data/train`` beside a ``data`` folder)."""
    first = name.split("/", 1)[0]
    return (
        name.startswith((".", "/", "~"))
        or not is_repo_id(name)
        or name.lower().endswith(suffixes)
        or ("/" in name and os.path.isdir(first))
    )


def cached_snapshot(repo_id: str, repo_type: str = "model") -> str | None:
    """The directory of the newest cached download of ``repo_id`` in the hub cache (what
    ``from_pretrained`` reads offline), or None if nothing of it is cached."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, f"{repo_type}s--{repo_id.replace('/', '--')}")
    try:
        with open(os.path.join(folder, "refs", "main"), encoding="utf-8") as fh:
            main = os.path.join(folder, "snapshots", fh.read().strip())
        if os.path.isdir(main):
            return main
    except OSError:
        pass
    snapshots = os.path.join(folder, "snapshots")
    found = [os.path.join(snapshots, s) for s in os.listdir(snapshots)] if os.path.isdir(snapshots) else []
    return max(found, key=os.path.getmtime) if found else None


def dataset_cached(repo_id: str) -> bool:
    """Whether ``datasets`` can load hub dataset ``repo_id`` offline: its files in the hub cache
    or a prepared copy in datasets' own cache."""
    if cached_snapshot(repo_id, "dataset"):
        return True
    from huggingface_hub import constants

    home = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
    return os.path.isdir(os.path.join(home, repo_id.replace("/", "___")))


__all__ = [
    "PROBE_TIMEOUT_S",
    "cached_snapshot",
    "dataset_cached",
    "is_repo_id",
    "looks_like_path",
    "offline_requested",
    "unreachable_reason",
    "use_offline_mode",
]
