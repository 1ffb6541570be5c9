"""Worker processes: a bench's runs and a tune's trials each run in a fresh Python process.

A worker is ``python -m MODULE SPEC.json``: it reads what to do from the spec, does it, and writes a
small JSON report where the spec says (``status``: ``ok``, ``oom``, ``failed``, ...). A fresh process
per run keeps one run's memory (caches, allocator pools) out of the next one's figures, and makes a
crash or an out-of-memory a row or a failed trial rather than the end of the suite or study.

Both sides are here, for ``peftkit.benchmark`` and ``peftkit.tuning`` alike:

- the parent's: ``start`` (in a session of its own, so a Ctrl-C at the terminal reaches only the
  parent, which stops the worker once and reports the interruption once), ``wait``, ``stop``, and
  ``read_report``, which turns a worker that died before reporting (killed by a signal, the OOM
  killer) into a ``failed`` report saying so;
- the worker's: ``failure_report``, the report of a run that raised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

from .errors import PeftkitError, first_line, library_error_line, raising_library
from .memory import is_out_of_memory


def start(module: str, spec_path: str, **popen: Any) -> subprocess.Popen:
    """Start ``python -m module spec_path`` in a session of its own, reading nothing from our stdin
    (``popen``: more of ``subprocess.Popen``'s arguments: its output, file descriptors to pass)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, spec_path], stdin=subprocess.DEVNULL, start_new_session=True, **popen
    )


def wait(proc: subprocess.Popen) -> int:
    """Wait for a worker to end and return its exit status; on Ctrl-C or SIGTERM (a
    ``KeyboardInterrupt`` here) the worker is stopped first (``stop``), then it is raised again."""
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM: the worker goes too
        stop(proc)
        raise


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a worker and wait until it is gone (SIGKILL after ``grace`` seconds, or at once
    on a second Ctrl-C), so staged output is removed only when nothing writes there any more."""
    proc.terminate()
    deadline = time.monotonic() + grace
    while proc.poll() is None:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        except KeyboardInterrupt:  # impatient: no more grace
            proc.kill()


def read_report(result_path: str, code: int, log: str) -> dict[str, Any]:
    """The report a worker wrote at ``result_path``; where it wrote none (it died first), a
    ``failed`` one whose error says how it ended (its exit ``code``) and where its ``log`` is."""
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as fh:
            return json.load(fh)
    return {"status": "failed", "error": f"worker process {ended(code)} before reporting; see {log}"}


def ended(code: int) -> str:
    """How a process with exit status ``code`` ended: ``killed by signal 9 (the system ran out of
    memory?)``, ``exited with status 1``."""
    if code < 0:
        return f"killed by signal {-code}" + (" (the system ran out of memory?)" if code == -9 else "")
    return f"exited with status {code}"


def failure_report(exc: BaseException, log_path: str) -> dict[str, Any]:
    """A worker's report of a run that raised ``exc``: ``oom`` (out of memory, or over the
    budget), else ``failed`` with one line (a library's: which one, strategy, model type, its
    message; the traceback appended to ``log_path``). Called inside the ``except`` block."""
    if is_out_of_memory(exc):
        return {"status": "oom", "error": first_line(exc)}
    if isinstance(exc, PeftkitError):
        return {"status": "failed", "error": str(exc)}
    # one line, as the command line reports it: the library, strategy, model type, message
    library = raising_library(exc)
    what = library_error_line(exc, library) if library else f"{type(exc).__name__}: {first_line(exc)}"
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        traceback.print_exc(file=fh)
    return {"status": "failed", "error": f"{what} (traceback in {log_path})"}


__all__ = ["ended", "failure_report", "read_report", "start", "stop", "wait"]
