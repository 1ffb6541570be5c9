"""Files and directories that appear whole or not at all, with the modes a user expects.

Every JSON file peftkit writes (metrics, adapter metadata, checkpoint state, bench results, worker
reports) goes through ``write_json``: a reader (another process, a resumed run, a user's script)
never sees half a file, even if the writer is killed mid-way.

Writing atomically means writing somewhere private first, and the tools for that (``mkdtemp``,
safetensors' and transformers' own temporary files) create 0700 directories and 0600 files. What
peftkit hands over (a run directory, a bench's output, a merged model, an adapter) must instead have
the mode a plain ``mkdir`` or ``open`` gives under the user's umask, or a colleague in the same
group cannot read a shared result: ``private_dir`` and ``publish_modes`` give it that.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import uuid
from typing import Any


def current_umask() -> int:
    """The process's umask. Reading it means setting it, so it is set straight back (no file is
    created in between in this thread; peftkit creates its outputs from the main thread)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(directory: bool = False, executable: bool = False) -> int:
    """The mode a plain ``mkdir`` (``directory``) or ``open`` gives under the current umask; an
    ``executable`` file keeps its execute bits, as ``cp`` would."""
    full = 0o777 if directory or executable else 0o666
    return full & ~current_umask()


def private_dir(prefix: str, parent: str) -> str:
    """A new uniquely named directory in ``parent`` (``tempfile.mkdtemp``), but with a plain
    ``mkdir``'s mode rather than mkdtemp's 0700, since it becomes the user's output when renamed."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, plain_mode(directory=True))
    return path


def publish_file(path: str) -> None:
    """Give a file written through a private temporary file (safetensors, transformers) the mode a
    plain ``open`` would have given it."""
    executable = bool(os.stat(path).st_mode & 0o111)
    os.chmod(path, plain_mode(executable=executable))


def publish_modes(root: str) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` gives under the
    current umask: called on a staged directory before it is renamed into place, so files that
    libraries wrote through private temporary files (0600) end like every other file. Symbolic
    links are left alone (their target may be anything)."""
    os.chmod(root, plain_mode(directory=True))
    for here, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, plain_mode(directory=True))
        for name in files:
            path = os.path.join(here, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                publish_file(path)


def write_json(path: str, data: Any, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically: into a temporary file in the same directory
    (so the rename never crosses a file system), then renamed over ``path``.

    Values JSON has no type for (paths, dtypes) are written as their ``str``. The temporary file is
    made with a plain ``open`` so the result has the mode the user's umask gives any new file.
    """
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
