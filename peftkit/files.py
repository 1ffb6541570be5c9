"""Files that appear whole or not at all.

Every JSON file peftkit writes (metrics, adapter metadata, checkpoint state, bench results, worker
reports) goes through ``write_json``: a reader (another process, a resumed run, a user's script)
never sees half a file, even if the writer is killed mid-way.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any


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
